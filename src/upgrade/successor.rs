//! The new process's side of an upgrade: reach the old process, take its
//! listeners (or refuse, saying why), keep what its operators set, then
//! resume each session it sends and answer for it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::runtime::Handle;

use super::channel::Channel;
use super::{
    CarriedState, HANDOVER_VERSION, Role, START_TIMEOUT, ToNew, ToOld, UPGRADE_SOCKET_ENV,
};
use crate::config::Config;
use crate::listener::{Listeners, public_listener};
use crate::operator::Operator;
use crate::session::handover::{self, SessionState};
use crate::session::{Arrival, Router};
use crate::socketio::SidTable;

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
    /// Set what the old process's operators had set (drains, attack mode),
    /// its health verdicts and the engine.io sessions it knew. Before the
    /// health checkers start.
    pub fn keep_state(&mut self, operator: &Operator, sids: &SidTable) {
        sids.import(std::mem::take(&mut self.state.sids));
        let backends = operator.backends().load();
        for id in &self.state.unhealthy {
            if let Some(backend) = backends.get(id) {
                backend.set_healthy(false);
            }
        }
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
    let refused = resumed.as_ref().err().map(|e| e.refusal());
    metrics::counter!(crate::metrics::HANDOVER_SESSIONS_TOTAL, "result" => label).increment(1);
    if let Some(refused) = &refused {
        tracing::warn!(reason = %refused.reason, "upgrade: a session handed over was refused; the old process keeps it");
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
