//! A session handed to the router's successor at an upgrade: what it is as
//! data ([`SessionState`], with its buffers as raw bytes and its two
//! sockets as descriptors), how the old process offers it ([`Outbox`]),
//! and how the new one resumes it ([`resume`]), on the same client and
//! backend connections.
//!
//! The session stops at the end of a relay round (nothing read is
//! unforwarded but the start of a unit not yet whole, which travels as
//! bytes), offers itself, and waits: taken, it ends without a word to
//! either side (its descriptors close here, the sockets live on there);
//! refused, it relays on here. Only plain sockets move: a TLS session's
//! state stays in the process that holds it.

use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::replay::{MoveChain, ReplayWindow, WindowState};
use super::{Router, Session};
use crate::geo::{Code, Location};
use crate::handshake::UpgradeRequest;
use crate::limits::MessageBudget;
use crate::metrics as m;
use crate::socketio::{Connects, EngineIo};
use crate::tls::{BackendStream, ClientStream};
use crate::upstream::Upstream;
use crate::upstream::dialer::{Dialer, Placement};
use crate::wire::peer::Peer;

/// A session as data: everything but its two sockets (descriptors) and
/// its buffers (raw bytes, in the order of the `*_bytes` fields, then the
/// replay window's frames).
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionState {
    /// The backend id the session is connected to.
    pub backend: String,
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub client_ip: IpAddr,
    pub coordinates: Option<(f64, f64)>,
    pub country: Option<String>,
    pub continent: Option<String>,
    pub key: String,
    pub subprotocol: Option<String>,
    pub acknowledges: bool,
    /// Read from the client, not yet forwarded (a unit not yet whole).
    pub client_read_bytes: usize,
    /// Waiting to be written to the client.
    pub client_write_bytes: usize,
    pub backend_read_bytes: usize,
    pub backend_write_bytes: usize,
    pub window: WindowState,
    /// The client's rate-limit tokens left (messages, bytes), when limited.
    pub budget_tokens: Option<(f64, f64)>,
    /// A Socket.IO session's namespace CONNECTs.
    pub connects: Option<Vec<Vec<u8>>>,
    /// When the session stopped relaying (microseconds since the Unix
    /// epoch), for the pause the new process measures.
    pub paused_at_micros: u64,
}

/// Why the new process did not take a session, as the old one hears it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub reason: String,
    /// The new process does not know the session's backend (the operator
    /// removed it from the configuration): move to another, then offer
    /// again.
    pub unknown_backend: bool,
}

/// What became of a session asked to hand itself over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HandOver {
    /// The new process runs it now: this task ends without a word.
    Taken,
    /// It relays on here (for now, or for good).
    Stays,
    /// It moves to another backend first (planned, as for a removed
    /// backend); it is asked again after.
    MoveFirst,
}

/// A session offered to the successor; `answer` says whether it took it.
pub struct Offer {
    pub state: Box<SessionState>,
    pub raw: Vec<u8>,
    /// The client's socket, then the backend's.
    pub fds: [OwnedFd; 2],
    pub answer: oneshot::Sender<Result<(), Refusal>>,
}

/// Most sessions offering themselves at once. Each holds a duplicate of
/// its two sockets until the new process answers: a process near its
/// open-files limit (two per session) must not duplicate them all at once.
/// It also keeps each session's pause to its own turn.
const MAX_IN_FLIGHT: usize = 128;

/// Where sessions offer themselves during an upgrade (closed otherwise),
/// [`MAX_IN_FLIGHT`] at a time.
#[derive(Clone)]
pub struct Outbox(Arc<OutboxInner>);

struct OutboxInner {
    sender: Mutex<Option<mpsc::UnboundedSender<Offer>>>,
    in_flight: Arc<Semaphore>,
}

impl Default for Outbox {
    fn default() -> Outbox {
        Outbox(Arc::new(OutboxInner {
            sender: Mutex::new(None),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }))
    }
}

impl Outbox {
    /// Take offers from now on.
    pub fn open(&self) -> mpsc::UnboundedReceiver<Offer> {
        let (sender, offers) = mpsc::unbounded_channel();
        *self.0.sender.lock() = Some(sender);
        offers
    }

    /// Take no more (the receiver ends once the offers made are taken).
    pub fn close(&self) {
        self.0.sender.lock().take();
    }

    /// How many more sessions may offer themselves now.
    pub fn room(&self) -> usize {
        self.0.in_flight.available_permits()
    }

    /// A turn to offer, if one is free.
    fn turn(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.0.in_flight).try_acquire_owned().ok()
    }

    /// False when no upgrade takes offers (the offer is dropped).
    fn send(&self, offer: Offer) -> bool {
        self.0
            .sender
            .lock()
            .as_ref()
            .is_some_and(|sender| sender.send(offer).is_ok())
    }
}

impl Session {
    /// Offer this session to the new process and wait for its answer: true
    /// when it took it (this task then ends without closing anything);
    /// false when the session stays here and relays on.
    pub(super) async fn hand_over(&mut self, upstream: &Upstream) -> HandOver {
        let control = Arc::clone(self.dialer.control());
        if control.stays() {
            // Refused once already (a request may have been left meanwhile).
            return HandOver::Stays;
        }
        let (ClientStream::Plain(client), BackendStream::Plain(backend)) =
            (&self.client.io, &upstream.peer.io)
        else {
            // TLS state cannot move: this session stays (README, "Upgrades").
            control.stay();
            return HandOver::Stays;
        };
        // Not this session's turn yet: it relays on and is asked again.
        let Some(_turn) = self.router.handover.turn() else {
            return HandOver::Stays;
        };
        control.set_offering(true);
        let fds = match (
            client.as_fd().try_clone_to_owned(),
            backend.as_fd().try_clone_to_owned(),
        ) {
            (Ok(client), Ok(backend)) => [client, backend],
            (Err(error), _) | (_, Err(error)) => {
                tracing::debug!(%error, "cannot hand the session over yet; it is asked again");
                control.set_offering(false);
                return HandOver::Stays;
            }
        };
        let (state, raw) = self.to_state(upstream);
        let (answer, answered) = oneshot::channel();
        let offer = Offer {
            state: Box::new(state),
            raw,
            fds,
            answer,
        };
        if !self.router.handover.send(offer) {
            control.set_offering(false);
            return HandOver::Stays;
        }
        match answered.await {
            Ok(Ok(())) => HandOver::Taken,
            Ok(Err(refusal)) => {
                control.set_offering(false);
                if refusal.unknown_backend && control.move_before_hand_over() {
                    tracing::info!(reason = %refusal.reason, "the new process does not know this backend; the session moves first");
                    return HandOver::MoveFirst;
                }
                tracing::warn!(reason = %refusal.reason, "the new process refused the session; it stays here");
                control.stay();
                HandOver::Stays
            }
            Err(_) => {
                control.set_offering(false);
                HandOver::Stays
            }
        }
    }

    fn to_state(&self, upstream: &Upstream) -> (SessionState, Vec<u8>) {
        let placement = self.dialer.placement();
        let mut raw = Vec::new();
        let mut part = |bytes: &[u8]| {
            raw.extend_from_slice(bytes);
            bytes.len()
        };
        let client_read_bytes = part(self.client.reader.unread());
        let client_write_bytes = part(self.client.unwritten());
        let backend_read_bytes = part(upstream.peer.reader.unread());
        let backend_write_bytes = part(upstream.peer.unwritten());
        let window = self.window.export(&mut raw);
        let code = |code: &Option<Code>| code.map(|c| c.as_str().to_string());
        let paused_at_micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let state = SessionState {
            backend: self.slot.backend().id.clone(),
            target: placement.request.target.clone(),
            headers: placement.request.headers.clone(),
            client_ip: placement.client_ip,
            coordinates: placement.location.coordinates,
            country: code(&placement.location.country),
            continent: code(&placement.location.continent),
            key: placement.key.clone(),
            subprotocol: upstream.subprotocol.clone(),
            acknowledges: upstream.acknowledges,
            client_read_bytes,
            client_write_bytes,
            backend_read_bytes,
            backend_write_bytes,
            window,
            budget_tokens: self.budget.as_ref().map(MessageBudget::tokens),
            connects: self
                .engineio
                .as_ref()
                .map(|engineio| engineio.connects.packets()),
            paused_at_micros,
        };
        (state, raw)
    }
}

/// Why the new process did not take a session (the old one keeps it).
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("backend {0} is not in this process's configuration")]
    UnknownBackend(String),
    #[error("backend {0} is at its session cap")]
    BackendFull(String),
    #[error("the client's limits refuse it: {0}")]
    Limits(crate::limits::Refused),
    #[error("the session's state does not add up: {0}")]
    BadState(String),
    #[error("its sockets cannot be used here: {0}")]
    Socket(std::io::Error),
}

impl ResumeError {
    /// The answer the old process hears.
    pub fn refusal(&self) -> Refusal {
        Refusal {
            reason: self.to_string(),
            unknown_backend: matches!(self, ResumeError::UnknownBackend(_)),
        }
    }

    /// The `result` label of `wsrouter_handover_sessions_total`.
    pub fn as_label(&self) -> &'static str {
        match self {
            ResumeError::UnknownBackend(_) => "unknown_backend",
            ResumeError::BackendFull(_) => "backend_full",
            ResumeError::Limits(_) => "limits",
            ResumeError::BadState(_) => "bad_state",
            ResumeError::Socket(_) => "socket",
        }
    }
}

/// Resume a session the old process handed over, on this thread's
/// runtime: the session and its backend connection, ready to run. An
/// error says why not (the old process then keeps it).
pub fn resume(
    router: &Router,
    state: Box<SessionState>,
    raw: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<(Box<Session>, Upstream), ResumeError> {
    let config = router.config();
    let [client_fd, backend_fd]: [OwnedFd; 2] = fds.try_into().map_err(|fds: Vec<_>| {
        ResumeError::BadState(format!("{} descriptors for a session, not 2", fds.len()))
    })?;
    let mut parts = raw;
    let mut take = |len: usize| -> Result<&[u8], ResumeError> {
        if len > parts.len() {
            return Err(ResumeError::BadState("its bytes are cut short".into()));
        }
        let (part, rest) = parts.split_at(len);
        parts = rest;
        Ok(part)
    };
    let client_read = take(state.client_read_bytes)?.to_vec();
    let client_write = Bytes::copy_from_slice(take(state.client_write_bytes)?);
    let backend_read = take(state.backend_read_bytes)?.to_vec();
    let backend_write = Bytes::copy_from_slice(take(state.backend_write_bytes)?);
    let migration = &config.migration;
    let bounds = (
        migration.replay_max_messages,
        migration.replay_max_bytes,
        migration.replay_max_age,
    );
    let mut window = ReplayWindow::import(&state.window, parts, bounds, Instant::now())
        .map_err(ResumeError::BadState)?;
    window.set_ping_interval(migration.watermark_interval);

    let backend = router
        .backends
        .load()
        .get(&state.backend)
        .cloned()
        .ok_or_else(|| ResumeError::UnknownBackend(state.backend.clone()))?;
    let admission = router
        .limits
        .admit(state.client_ip)
        .map_err(ResumeError::Limits)?;
    let location = Location {
        coordinates: state.coordinates,
        country: state.country.as_deref().and_then(Code::new),
        continent: state.continent.as_deref().and_then(Code::new),
    };
    let placement = Placement {
        request: UpgradeRequest {
            target: state.target,
            headers: state.headers,
            leftover: Vec::new(),
        },
        client_ip: state.client_ip,
        location,
        key: state.key,
        subprotocol: state.subprotocol.clone(),
        tls: false,
    };
    let id = router
        .next_session_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dialer = Dialer::new(
        Arc::clone(&router.config),
        router.backends.clone(),
        placement,
        id,
    );
    let slot = backend
        .try_acquire(id, dialer.control())
        .ok_or_else(|| ResumeError::BackendFull(state.backend.clone()))?;
    if backend.leaving_reason().is_some() {
        // Drained in the old process (and so here): it keeps moving away.
        backend.evacuate(migration.max_rate_per_backend);
    }

    let stream = |fd: OwnedFd| {
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    };
    let client = stream(client_fd).map_err(ResumeError::Socket)?;
    let backend = stream(backend_fd).map_err(ResumeError::Socket)?;
    let max_message = config.relay.max_message_bytes;
    let mut client = Peer::client(ClientStream::Plain(client), max_message, client_read);
    client.queue(client_write);
    let mut peer = Peer::backend(BackendStream::Plain(backend), max_message, backend_read);
    peer.queue(backend_write);
    let upstream = Upstream {
        peer,
        subprotocol: state.subprotocol,
        set_cookies: Vec::new(),
        acknowledges: state.acknowledges,
    };
    let engineio = state.connects.map(|packets| EngineIo {
        connects: Connects::from_packets(&packets),
        polled_as: None,
    });
    let mut budget = router.limits.message_budget();
    if let (Some(budget), Some(tokens)) = (budget.as_mut(), state.budget_tokens) {
        budget.set_tokens(tokens);
    }
    let session = Box::new(Session {
        budget,
        memory: router.memory.open(id),
        _admission: admission,
        engineio: engineio.map(Box::new),
        window,
        moves: MoveChain::default(),
        router: router.clone(),
        client,
        slot,
        dialer,
    });
    let paused = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(Duration::ZERO, |now| {
            now.saturating_sub(Duration::from_micros(state.paused_at_micros))
        });
    metrics::histogram!(m::HANDOVER_PAUSE_SECONDS).record(paused.as_secs_f64());
    Ok((session, upstream))
}
