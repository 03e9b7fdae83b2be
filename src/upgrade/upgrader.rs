//! The old process's side of an upgrade: start the successor, send it the
//! listeners and the carried state, wait for it to serve, then ship it the
//! sessions that offer themselves and hand each its answer.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use super::channel::{Channel, Rendezvous};
use super::{
    CLAIMED_VERSION_ENV, CarriedState, HANDOVER_VERSION, Role, START_TIMEOUT, ToNew, ToOld,
    UPGRADE_SOCKET_ENV,
};
use crate::operator::Operator;
use crate::session::handover::{Offer, Refusal};
use crate::socketio::SidTable;

/// Why an upgrade did not happen. The old process keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("this router was not started by the wsrouter binary; it cannot start its successor")]
    Unavailable,
    #[error("an upgrade is already under way")]
    Busy,
    #[error("cannot start {exe}: {error}")]
    Start { exe: String, error: io::Error },
    #[error("the new process refused the hand-over: {0}")]
    Refused(String),
    #[error("the new process exited before it was ready ({0})")]
    Exited(String),
    #[error("the new process was not ready within {0:?}")]
    Timeout(Duration),
    #[error("the hand-over channel failed: {0}")]
    Channel(io::Error),
}

impl UpgradeError {
    /// The `result` label of `wsrouter_process_upgrades_total`.
    pub fn as_label(&self) -> &'static str {
        match self {
            UpgradeError::Unavailable => "unavailable",
            UpgradeError::Busy => "busy",
            UpgradeError::Start { .. } => "start_failed",
            UpgradeError::Refused(_) => "refused",
            UpgradeError::Exited(_) => "exited",
            UpgradeError::Timeout(_) => "timeout",
            UpgradeError::Channel(_) => "channel_failed",
        }
    }
}

/// How this process was started, to start its successor the same way.
#[derive(Debug, Clone)]
pub struct Relaunch {
    /// The executable's path as it was at start: a new binary put there
    /// since is what runs.
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Relaunch {
    /// This process's executable and arguments. The executable is the path
    /// it was started by (`argv[0]`, made absolute against the working
    /// directory, or found on `PATH`), not where that path pointed then:
    /// deployments that switch a symlink to a new version upgrade to the
    /// new version, as NGINX's binary upgrade does.
    pub fn this_process() -> io::Result<Relaunch> {
        let mut args = std::env::args_os();
        let started_as = args.next().map(PathBuf::from);
        let search_path = std::env::var_os("PATH");
        let exe = started_as
            .and_then(|argv0| {
                let cwd = std::env::current_dir().ok()?;
                started_from(&argv0, &cwd, search_path.as_deref())
            })
            .map_or_else(std::env::current_exe, Ok)?;
        Ok(Relaunch {
            exe,
            args: args.collect(),
        })
    }
}

/// The executable `argv0` names: a path with a slash, against `cwd`; a bare
/// name, the first match on `search_path`. Symbolic links are left as they
/// are.
fn started_from(argv0: &Path, cwd: &Path, search_path: Option<&OsStr>) -> Option<PathBuf> {
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.components().count() > 1 || argv0.is_absolute() {
        return Some(cwd.join(argv0));
    }
    std::env::split_paths(search_path?)
        .map(|dir| cwd.join(dir).join(argv0))
        .find(|candidate| candidate.is_file())
}

/// The old process's side: starts a successor and hands it the listeners.
/// Cheap to clone.
#[derive(Clone)]
pub struct Upgrader(Arc<UpgraderInner>);

struct UpgraderInner {
    relaunch: Option<Relaunch>,
    /// Whose run-time state (drains, attack mode) the new process keeps.
    operator: Operator,
    sids: SidTable,
    /// True while an upgrade runs, and for good once one succeeded.
    busy: AtomicBool,
    /// Duplicates of every listening socket, registered once serving.
    listeners: Mutex<Vec<(Role, OwnedFd)>>,
    /// Becomes true when a new process took over.
    handed_over: watch::Sender<bool>,
    /// The channel to the new process, once it took over, until the
    /// sessions are shipped.
    successor: Mutex<Option<Channel>>,
}

impl Upgrader {
    /// `relaunch`: how to start the successor; `None` refuses upgrades
    /// (a router run inside another program).
    pub fn new(relaunch: Option<Relaunch>, operator: Operator, sids: SidTable) -> Upgrader {
        Upgrader(Arc::new(UpgraderInner {
            relaunch,
            operator,
            sids,
            busy: AtomicBool::new(false),
            listeners: Mutex::new(Vec::new()),
            handed_over: watch::Sender::new(false),
            successor: Mutex::new(None),
        }))
    }

    /// Keep these duplicates of the listening sockets to hand over: each
    /// session thread's public one, and the admin one.
    pub fn register_listeners(&self, public: Vec<OwnedFd>, admin: OwnedFd) {
        let mut held: Vec<_> = public.into_iter().map(|fd| (Role::Public, fd)).collect();
        held.push((Role::Admin, admin));
        *self.0.listeners.lock() = held;
    }

    /// Close the duplicates kept to hand over (at a shutdown: a listening
    /// socket left open would take connections nobody accepts).
    pub fn release_listeners(&self) {
        self.0.listeners.lock().clear();
    }

    /// Resolves once a new process has taken over the listeners.
    pub async fn handed_over(&self) {
        let mut watch = self.0.handed_over.subscribe();
        let _ = watch.wait_for(|done| *done).await;
    }

    /// Start the successor and hand it the listeners. `Ok(pid)` once it
    /// serves; this process must then stop accepting (see
    /// [`Upgrader::handed_over`]). On an error nothing changed.
    pub async fn upgrade(&self) -> Result<u32, UpgradeError> {
        let result = self.try_upgrade().await;
        let label = match &result {
            Ok(_) => "ok",
            Err(error) => error.as_label(),
        };
        metrics::counter!(crate::metrics::PROCESS_UPGRADES_TOTAL, "result" => label).increment(1);
        match &result {
            Ok(pid) => tracing::info!(
                new_pid = pid,
                "upgrade: the new process took over the listeners"
            ),
            Err(error) => tracing::error!(%error, "upgrade failed; this process keeps serving"),
        }
        result
    }

    async fn try_upgrade(&self) -> Result<u32, UpgradeError> {
        let relaunch = self.0.relaunch.clone().ok_or(UpgradeError::Unavailable)?;
        if self.0.busy.swap(true, Ordering::AcqRel) {
            return Err(UpgradeError::Busy);
        }
        let listeners = self
            .0
            .listeners
            .lock()
            .iter()
            .map(|(role, fd)| Ok((*role, fd.try_clone()?)))
            .collect::<io::Result<Vec<_>>>()
            .map_err(UpgradeError::Channel);
        let state = CarriedState::of(&self.0.operator, &self.0.sids);
        let started =
            tokio::task::spawn_blocking(move || start_successor(&relaunch, &listeners?, state))
                .await
                .unwrap_or_else(|e| Err(UpgradeError::Channel(io::Error::other(e))));
        match started {
            Ok((pid, channel)) => {
                // The channel is in place before anyone hears of the
                // hand-over (app ships the sessions over it at once).
                *self.0.successor.lock() = Some(channel);
                // The new process owns the sockets now; this one stops
                // accepting (app) and closes its duplicates.
                self.0.listeners.lock().clear();
                self.0.handed_over.send_replace(true);
                Ok(pid)
            }
            Err(error) => {
                self.0.busy.store(false, Ordering::Release);
                Err(error)
            }
        }
    }
}

impl Upgrader {
    /// Send the new process each session offered on `offers`, and hand
    /// each its answer; `Done` once `offers` ends (blocking threads). The
    /// receiver resolves once `Done` is sent.
    pub fn ship_sessions(
        &self,
        mut offers: mpsc::UnboundedReceiver<Offer>,
    ) -> oneshot::Receiver<()> {
        let (shipped, done) = oneshot::channel();
        let Some(channel) = self.0.successor.lock().take() else {
            return done;
        };
        let pending: Arc<Mutex<HashMap<u64, AnswerSender>>> = Arc::default();
        match channel.try_clone() {
            Ok(reader) => {
                let pending = Arc::clone(&pending);
                std::thread::spawn(move || hear_answers(reader, &pending));
            }
            Err(error) => {
                tracing::error!(%error, "upgrade: cannot read the new process's answers; sessions stay here");
                return done;
            }
        }
        std::thread::spawn(move || {
            let (mut offered, mut next_id) = (0u64, 0u64);
            while let Some(offer) = offers.blocking_recv() {
                next_id += 1;
                let Offer {
                    state,
                    raw,
                    fds,
                    answer,
                } = offer;
                pending.lock().insert(next_id, answer);
                let session = ToNew::Session { id: next_id, state };
                let borrowed = [fds[0].as_fd(), fds[1].as_fd()];
                if let Err(error) = channel.send_with_bytes(&session, &raw, &borrowed) {
                    tracing::warn!(%error, "upgrade: a session could not be sent; it stays here");
                    if let Some(answer) = pending.lock().remove(&next_id) {
                        let _ = answer.send(Err(Refusal {
                            reason: error.to_string(),
                            unknown_backend: false,
                        }));
                    }
                }
                // In flight, the descriptors are the new process's too.
                drop(fds);
                offered += 1;
            }
            if let Err(error) = channel.send(&ToNew::Done, &[]) {
                tracing::warn!(%error, "upgrade: could not tell the new process the hand-over is done");
            }
            tracing::info!(
                sessions = offered,
                "upgrade: the sessions were offered to the new process"
            );
            let _ = shipped.send(());
        });
        done
    }
}

type AnswerSender = oneshot::Sender<Result<(), Refusal>>;

/// Hand each session the new process's answer; when the channel ends,
/// the sessions still waiting stay here.
fn hear_answers(mut reader: Channel, pending: &Mutex<HashMap<u64, AnswerSender>>) {
    loop {
        match reader.receive::<ToOld>() {
            Ok((ToOld::SessionAnswer { id, refused }, _)) => {
                if let Some(answer) = pending.lock().remove(&id) {
                    let _ = answer.send(refused.map_or(Ok(()), Err));
                }
            }
            Ok((other, _)) => {
                tracing::warn!(?other, "upgrade: unexpected message from the new process")
            }
            Err(_) => break,
        }
    }
    for (_, answer) in pending.lock().drain() {
        let _ = answer.send(Err(Refusal {
            reason: "the new process went away".into(),
            unknown_backend: false,
        }));
    }
}

/// Start the successor, take its connection, send it `Hello` with
/// `listeners`, and wait for its answer (blocking).
fn start_successor(
    relaunch: &Relaunch,
    listeners: &[(Role, OwnedFd)],
    state: CarriedState,
) -> Result<(u32, Channel), UpgradeError> {
    let rendezvous = Rendezvous::open().map_err(UpgradeError::Channel)?;
    let mut child = Command::new(&relaunch.exe)
        .args(&relaunch.args)
        .env(UPGRADE_SOCKET_ENV, rendezvous.name())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|error| UpgradeError::Start {
            exe: relaunch.exe.display().to_string(),
            error,
        })?;
    let exited = |child: &mut std::process::Child| match child.try_wait() {
        Ok(Some(status)) => Some(status.to_string()),
        Ok(None) => None,
        Err(error) => Some(error.to_string()),
    };
    let mut status = None;
    let connected = rendezvous.accept_from(child.id(), START_TIMEOUT, || {
        status = exited(&mut child);
        status.is_some()
    });
    let mut channel = match connected {
        Ok(channel) => channel,
        Err(error) => {
            if let Some(status) = status {
                return Err(UpgradeError::Exited(status));
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(match error.kind() {
                io::ErrorKind::TimedOut => UpgradeError::Timeout(START_TIMEOUT),
                _ => UpgradeError::Channel(error),
            });
        }
    };
    let version = std::env::var(CLAIMED_VERSION_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HANDOVER_VERSION);
    let hello = ToNew::Hello {
        version,
        listeners: listeners.iter().map(|(role, _)| *role).collect(),
        state,
    };
    let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
    let answer = channel
        .send(&hello, &fds)
        .and_then(|()| channel.set_read_timeout(Some(START_TIMEOUT)))
        .and_then(|()| channel.receive::<ToOld>());
    match answer {
        Ok((ToOld::Ready { pid }, _)) => {
            // From here on answers come when sessions are offered.
            channel
                .set_read_timeout(None)
                .map_err(UpgradeError::Channel)?;
            Ok((pid, channel))
        }
        Ok((ToOld::Refused { reason }, _)) => {
            let _ = child.wait();
            Err(UpgradeError::Refused(reason))
        }
        Ok((ToOld::SessionAnswer { .. }, _)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(UpgradeError::Refused(
                "the new process answered a session before it was ready".into(),
            ))
        }
        Err(error) => {
            let timed_out = matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            );
            if timed_out {
                let _ = child.kill();
                let _ = child.wait();
                return Err(UpgradeError::Timeout(START_TIMEOUT));
            }
            match child.wait() {
                Ok(status) => Err(UpgradeError::Exited(status.to_string())),
                Err(_) => Err(UpgradeError::Channel(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_is_the_path_it_was_started_by_symlinks_kept() {
        let cwd = Path::new("/srv");
        let at = |argv0: &str, path: Option<&str>| {
            started_from(Path::new(argv0), cwd, path.map(OsStr::new))
        };
        assert_eq!(
            at("/usr/local/bin/wsrouter", None),
            Some(PathBuf::from("/usr/local/bin/wsrouter"))
        );
        assert_eq!(
            at("./bin/wsrouter", None),
            Some(PathBuf::from("/srv/./bin/wsrouter"))
        );
        assert_eq!(at("", Some("/bin")), None);
        // A bare name is looked up on PATH, as the shell did.
        let dir = std::env::temp_dir().join(format!("wsrouter-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("wsrouter"), b"").expect("file");
        let path = format!("/nonexistent:{}", dir.display());
        assert_eq!(at("wsrouter", Some(&path)), Some(dir.join("wsrouter")));
        assert_eq!(at("wsrouter", Some("/nonexistent")), None);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
