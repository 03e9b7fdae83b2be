//! Upgrading the router in place: SIGUSR2 or `POST /api/upgrade` starts
//! the executable at the path this process was started from, with the same
//! arguments, and hands it the listening sockets over a Unix socket
//! ([`channel`]), so no port is ever unbound and nothing in an accept
//! queue is lost.
//!
//! The old process ([`Upgrader`]): start the new one, naming the socket to
//! connect to in `WSROUTER_UPGRADE_SOCKET`, send `Hello` (the
//! hand-over version, and every listening socket: each session thread's
//! public one and the admin one), and wait for `Ready` or `Refused`. On
//! `Ready` it stops accepting and lets its sessions finish for
//! `[upgrade] old_process_timeout`, as at a shutdown; on anything else it
//! keeps serving as before, and says why.
//!
//! The new process ([`Inherited`]): load and check the configuration (a bad
//! one is `Refused`, with the reason), check the version, take the
//! sockets whose addresses its configuration still names, start serving,
//! then answer `Ready`; from then on it writes the pid file and is the one
//! systemd is told about.

pub mod channel;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use self::channel::{Channel, Rendezvous};
use crate::config::Config;
use crate::listener::{Listeners, public_listener};
use crate::operator::Operator;
use crate::session::handover::{self, Offer, SessionState};
use crate::session::{Arrival, Router};
use crate::socketio::SidTable;

/// The hand-over format this build speaks. A new process refuses any other.
pub const HANDOVER_VERSION: u32 = 1;

/// The environment variable that names the old process's socket to a new
/// one.
pub const UPGRADE_SOCKET_ENV: &str = "WSROUTER_UPGRADE_SOCKET";

/// For tests only: the version the old process claims in its `Hello`
/// (a new process must refuse one it does not speak).
const CLAIMED_VERSION_ENV: &str = "WSROUTER_TEST_HANDOVER_VERSION";

/// How long the old process waits for the new one's answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What a listening socket handed over is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Role {
    Public,
    Admin,
}

/// Old process to new.
#[derive(Debug, Serialize, Deserialize)]
enum ToNew {
    /// The descriptors attached are these listeners, in order; `state` is
    /// what operators set at run time, which the new process keeps.
    Hello {
        version: u32,
        listeners: Vec<Role>,
        state: CarriedState,
    },
    /// A session: its state, its buffers as the raw bytes, its client's and
    /// backend's sockets as the descriptors.
    Session { id: u64, state: Box<SessionState> },
    /// Every session that could move was offered; nothing more follows.
    Done,
}

/// What operators set at run time (admin API) and what the router learned
/// (engine.io sids), carried to the new process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CarriedState {
    /// Backends drained (their sessions keep moving away there).
    drained: Vec<String>,
    /// The "under attack" switch.
    under_attack: bool,
    /// engine.io sessions and their backends (for Socket.IO clients
    /// without a session key).
    sids: Vec<(String, String, Vec<Vec<u8>>)>,
}

impl CarriedState {
    fn of(operator: &Operator, sids: &SidTable) -> CarriedState {
        CarriedState {
            sids: sids.export(),
            drained: operator
                .backends()
                .load()
                .backends
                .iter()
                .filter(|backend| backend.is_draining())
                .map(|backend| backend.id.clone())
                .collect(),
            under_attack: operator.limits().is_under_attack(),
        }
    }
}

/// New process to old.
#[derive(Debug, Serialize, Deserialize)]
enum ToOld {
    /// Serving: accepting on every listener, the admin API up.
    Ready { pid: u32 },
    /// Not taking over; the old process keeps serving.
    Refused { reason: String },
    /// Session `id` runs here now, or was refused (and stays there).
    SessionAnswer { id: u64, refused: Option<String> },
}

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
    /// This process's executable and arguments.
    pub fn this_process() -> io::Result<Relaunch> {
        Ok(Relaunch {
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
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
    /// each its answer; `Done` once `offers` ends (blocking threads).
    pub fn ship_sessions(&self, mut offers: mpsc::UnboundedReceiver<Offer>) {
        let Some(channel) = self.0.successor.lock().take() else {
            return;
        };
        let pending: Arc<Mutex<HashMap<u64, AnswerSender>>> = Arc::default();
        match channel.try_clone() {
            Ok(reader) => {
                let pending = Arc::clone(&pending);
                std::thread::spawn(move || hear_answers(reader, &pending));
            }
            Err(error) => {
                tracing::error!(%error, "upgrade: cannot read the new process's answers; sessions stay here");
                return;
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
                        let _ = answer.send(Err(error.to_string()));
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
        });
    }
}

type AnswerSender = tokio::sync::oneshot::Sender<Result<(), String>>;

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
        let _ = answer.send(Err("the new process went away".into()));
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

/// The new process's side: its channel to the old one.
#[derive(Debug)]
pub struct Inherited {
    channel: Channel,
}

impl Inherited {
    /// Connect to the old process, when this one was started by an
    /// upgrade (its socket is named in the environment).
    pub fn from_env() -> io::Result<Option<Inherited>> {
        let Some(name) = std::env::var_os(UPGRADE_SOCKET_ENV) else {
            return Ok(None);
        };
        let name = name.to_string_lossy();
        let channel = Channel::connect(&name)
            .map_err(|e| io::Error::new(e.kind(), format!("{UPGRADE_SOCKET_ENV}={name}: {e}")))?;
        Ok(Some(Inherited { channel }))
    }

    /// Tell the old process this one will not take over, and why.
    pub fn refuse(mut self, reason: &str) {
        // Its Hello is read first: a socket closed with unread data resets
        // the connection, and the old process would not read the reason.
        let _ = self.channel.set_read_timeout(Some(START_TIMEOUT));
        let _ = self.channel.receive::<ToNew>();
        self.refuse_after_hello(reason);
    }

    fn refuse_after_hello(self, reason: &str) {
        let refused = ToOld::Refused {
            reason: reason.to_string(),
        };
        if let Err(error) = self.channel.send(&refused, &[]) {
            tracing::warn!(%error, "could not tell the old process why the upgrade was refused");
        }
    }

    /// Receive the old process's listeners, and make of them the ones
    /// `config` names; an address no socket received has is bound afresh.
    /// A hand-over version this build does not speak is refused.
    pub async fn listeners(mut self, config: &Config) -> Result<(Listeners, Successor), String> {
        let (hello, mut fds) = self
            .channel
            .receive::<ToNew>()
            .map_err(|e| format!("reading the hand-over: {e}"))?;
        let ToNew::Hello {
            version,
            listeners,
            state,
        } = hello
        else {
            return Err("the hand-over did not start with Hello".into());
        };
        if version != HANDOVER_VERSION {
            let reason = format!(
                "hand-over version {version} is not the version this build speaks ({HANDOVER_VERSION})"
            );
            self.refuse_after_hello(&reason);
            return Err(reason);
        }
        if fds.len() != listeners.len() {
            let reason = format!(
                "the hand-over named {} listeners and carried {}",
                listeners.len(),
                fds.len()
            );
            self.refuse_after_hello(&reason);
            return Err(reason);
        }
        let mut public = Vec::new();
        let mut admin = None;
        for (role, fd) in listeners.into_iter().zip(fds.drain(..)) {
            let listener = std::net::TcpListener::from(fd);
            let wanted = match role {
                Role::Public => config.listener.public,
                Role::Admin => config.admin.listen,
            };
            if !same_address(&listener, wanted) {
                tracing::info!(?role, %wanted, "the configuration names another address; binding it afresh");
                continue;
            }
            match role {
                Role::Public => public.push(listener),
                Role::Admin => admin = Some(listener),
            }
        }
        let bound = async {
            let public = match public.is_empty() {
                true => vec![public_listener(config.listener.public)?.into_std()?],
                false => public,
            };
            let admin = match admin {
                Some(admin) => admin,
                None => std::net::TcpListener::bind(config.admin.listen)?,
            };
            admin.set_nonblocking(true)?;
            for listener in &public {
                listener.set_nonblocking(true)?;
            }
            Listeners::from_std(public, admin)
        };
        match bound.await {
            Ok(listeners) => Ok((
                listeners,
                Successor {
                    inherited: self,
                    state,
                },
            )),
            Err(error) => {
                let reason = format!("cannot serve the listeners: {error}");
                self.refuse_after_hello(&reason);
                Err(reason)
            }
        }
    }
}

/// A new process that has its listeners, before it told the old one it
/// serves.
#[derive(Debug)]
pub struct Successor {
    inherited: Inherited,
    state: CarriedState,
}

impl Successor {
    /// Set what the old process's operators had set (drains, attack mode)
    /// and the engine.io sessions it knew.
    pub fn keep_state(&self, operator: &Operator, sids: &SidTable) {
        sids.import(self.state.sids.clone());
        for id in &self.state.drained {
            if operator.drain(id).is_none() {
                tracing::info!(backend = %id, "upgrade: a drained backend is not in this configuration");
            }
        }
        operator.limits().set_under_attack(self.state.under_attack);
    }

    /// Tell the old process this one serves; then take the sessions it
    /// hands over, each resumed on one of `threads` (the session threads'
    /// runtimes, in turn), until it is done (blocking thread).
    pub fn ready(self, router: Router, threads: Vec<Handle>) {
        let mut channel = self.inherited.channel;
        let ready = ToOld::Ready {
            pid: std::process::id(),
        };
        std::thread::spawn(move || {
            if let Err(error) = channel.send(&ready, &[]) {
                tracing::error!(%error, "could not tell the old process this one is ready");
                return;
            }
            let writer = match channel.try_clone() {
                Ok(writer) => Arc::new(Mutex::new(writer)),
                Err(error) => {
                    tracing::error!(%error, "upgrade: cannot answer the old process");
                    return;
                }
            };
            let mut received = 0usize;
            loop {
                match channel.receive_with_bytes::<ToNew>() {
                    Ok((ToNew::Session { id, state }, raw, fds)) => {
                        let thread = &threads[received % threads.len().max(1)];
                        received += 1;
                        let writer = Arc::clone(&writer);
                        thread.spawn(take_session(router.clone(), writer, id, state, raw, fds));
                    }
                    Ok((ToNew::Done, _, _)) => {
                        tracing::info!(
                            sessions = received,
                            "upgrade: the old process handed everything over"
                        );
                        break;
                    }
                    Ok((ToNew::Hello { .. }, _, _)) => {
                        tracing::warn!("upgrade: a second Hello, ignored")
                    }
                    Err(error) => {
                        tracing::warn!(%error, "upgrade: the old process left before the hand-over ended");
                        break;
                    }
                }
            }
        });
    }
}

/// Resume one session handed over, answer the old process, and run it.
async fn take_session(
    router: Router,
    writer: Arc<Mutex<Channel>>,
    id: u64,
    state: Box<SessionState>,
    raw: Vec<u8>,
    fds: Vec<OwnedFd>,
) {
    let resumed = handover::resume(&router, state, &raw, fds);
    let label = resumed
        .as_ref()
        .map_or_else(|e| e.as_label(), |_| "received");
    let refused = resumed.as_ref().err().map(|e| e.to_string());
    metrics::counter!(crate::metrics::HANDOVER_SESSIONS_TOTAL, "result" => label).increment(1);
    if let Some(reason) = &refused {
        tracing::warn!(%reason, "upgrade: a session handed over was refused; it stays in the old process");
    }
    let answer = ToOld::SessionAnswer { id, refused };
    if let Err(error) = writer.lock().send(&answer, &[]) {
        tracing::warn!(%error, "upgrade: could not answer the old process");
    }
    if let Ok((session, upstream)) = resumed {
        session.run(upstream, Arrival::HandedOver).await;
    }
}

fn same_address(listener: &std::net::TcpListener, wanted: SocketAddr) -> bool {
    listener
        .local_addr()
        .is_ok_and(|bound| bound == wanted || (wanted.port() == 0 && bound.ip() == wanted.ip()))
}

/// Write this process's pid to `path` (the process that holds the
/// listeners does).
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, format!("{}\n", std::process::id()))?;
    std::fs::rename(&temporary, path)
}

/// Remove the pid file if it still names this process.
pub fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Tell systemd (when it started this process with `NOTIFY_SOCKET`) that
/// this process is the service's main process and ready.
pub fn notify_systemd_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("MAINPID={}\nREADY=1\n", std::process::id());
    if let Err(error) = send_notify(&socket, message.as_bytes()) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

fn send_notify(socket: &std::ffi::OsStr, message: &[u8]) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let bytes = socket.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name)?,
        None => UnixAddr::from_pathname(Path::new(socket))?,
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.send_to_addr(message, &address)?;
    Ok(())
}
