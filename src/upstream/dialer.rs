//! Which backend to dial for a session, and dialing it: the ranked
//! candidates, a session slot on each before its dial, passive health told
//! of each failure, and the rounds with backoff of a move. The session's
//! first dial ([`Dialer::first`]) and every re-dial ([`Dialer::moved`]) go
//! through one [`Dialer`], built once per session from its [`Placement`].
//!
//! Owns the dial policy; leaves the HTTP exchange of one dial to
//! [`crate::upstream`], and what the client is told when no backend takes
//! it to the caller ([`DialFailure`] says why).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::backend::control::Control;
use crate::backend::{Backend, Backends, SessionSlot};
use crate::config::Config;
use crate::geo::Location;
use crate::handshake::UpgradeRequest;
use crate::upstream::{self, ClientInfo, DialError, Response, Upstream};

/// The pause between dial rounds of a move, and before each move of a
/// chain after the first, doubles from this...
pub(crate) const FIRST_REDIAL_PAUSE: Duration = Duration::from_millis(50);
/// ...to this.
pub(crate) const LAST_REDIAL_PAUSE: Duration = Duration::from_secs(1);

/// Who and where the client is: everything a dial for it needs.
#[derive(Clone)]
pub(crate) struct Placement {
    /// The client's request: its target, and the headers a backend is
    /// sent ([`upstream::keep_forwarded_headers`]).
    pub request: UpgradeRequest,
    pub client_ip: IpAddr,
    pub location: Location,
    pub key: String,
    /// The subprotocol the first backend chose; a new backend must agree.
    pub subprotocol: Option<String>,
    /// The client came over TLS (X-Forwarded-Proto: https).
    pub tls: bool,
}

impl Placement {
    /// The session key's hash, for log lines (never the key itself).
    pub fn key_hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.key.as_bytes())
    }
}

/// A backend that took the session: its WebSocket and the session's claim
/// on it.
pub(crate) struct Connected {
    pub upstream: Upstream,
    pub slot: SessionSlot,
}

/// Why no backend took the session.
#[derive(Debug)]
pub(crate) enum DialFailure {
    /// Steering found no candidate.
    NoBackend,
    /// A backend answered the first dial with a 4xx: the application's
    /// verdict on this client, handed to it.
    Refused(Box<Response>),
    /// The last candidate tried did not answer in time.
    Timeout,
    /// Every candidate had `steering.max_concurrent_dials` dials in flight.
    Busy,
    /// Every candidate was at its session cap.
    Full,
    /// The candidates failed otherwise (connect, handshake).
    Failed,
}

impl DialFailure {
    /// After every candidate was tried: the last one's error decides.
    fn after(last: Option<DialError>) -> DialFailure {
        match last {
            None => DialFailure::Full,
            Some(DialError::Timeout) => DialFailure::Timeout,
            Some(DialError::Busy) => DialFailure::Busy,
            Some(_) => DialFailure::Failed,
        }
    }
}

/// A move's facts, for the dial rounds and the new backend's headers.
pub(crate) struct Move {
    /// Every backend the session left in its chain of moves, the one it
    /// leaves now first.
    pub avoid: Vec<String>,
    /// How many messages the new backend will get again
    /// (`X-Wsrouter-Replayed`).
    pub replayed: usize,
    /// A planned move (drain, removal) with nowhere to go gives up at once:
    /// the session stays where it is.
    pub planned: bool,
    /// Wait this long before the first round (a chain's later moves crawl).
    pub first_pause: Duration,
    /// Give up when this passes.
    pub deadline: Instant,
}

/// Dials backends for one session. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Dialer {
    config: Arc<ArcSwap<Config>>,
    backends: Backends,
    placement: Arc<Placement>,
    session_id: u64,
    /// Registered with the backend of each slot, so the router can ask
    /// this session to move.
    control: Arc<Control>,
}

impl Dialer {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        backends: Backends,
        placement: Placement,
        session_id: u64,
    ) -> Dialer {
        Dialer {
            config,
            backends,
            placement: Arc::new(placement),
            session_id,
            control: Arc::new(Control::default()),
        }
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The session's id (registry keys, never exported).
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Record the subprotocol the first backend chose: every later backend
    /// must choose it too.
    pub fn agree_subprotocol(&mut self, subprotocol: Option<String>) {
        Arc::make_mut(&mut self.placement).subprotocol = subprotocol;
    }

    /// Dial later backends with `target` instead of the client's request
    /// target (a Socket.IO session opens a new engine.io session there).
    pub fn set_target(&mut self, target: String) {
        Arc::make_mut(&mut self.placement).request.target = target;
    }

    /// The session's first backend: the ranked candidates in order, within
    /// `steering.max_dial_attempts`, or only `pinned` (a backend id) when
    /// the session must go where it started (an engine.io session's
    /// upgrade). A backend's 4xx ends the search: it is the application's
    /// answer to this client.
    pub async fn first(&self, pinned: Option<&str>) -> Result<Connected, DialFailure> {
        let config = self.config.load_full();
        let candidates = match pinned {
            Some(id) => {
                let set = self.backends.load();
                set.get(id)
                    .filter(|b| b.accepts_sessions())
                    .cloned()
                    .into_iter()
                    .collect()
            }
            None => self.rank(&config, &[], false),
        };
        if candidates.is_empty() {
            tracing::warn!("no backend available");
            return Err(DialFailure::NoBackend);
        }
        let mut last_error = None;
        for backend in &candidates {
            match self.try_backend(&config, backend, None).await {
                Ok(connected) => return Ok(connected),
                Err(Some(DialError::Refused(response))) if !response.is_server_error() => {
                    return Err(DialFailure::Refused(response));
                }
                Err(Some(error)) => {
                    tracing::warn!(backend = %backend.id, %error, "dial failed; trying the next backend");
                    last_error = Some(error);
                }
                Err(None) => {}
            }
        }
        Err(DialFailure::after(last_error))
    }

    /// Dial rounds with backoff, after `first_pause`, until a backend the
    /// session is not leaving accepts it with the same subprotocol, or the
    /// deadline passes.
    pub async fn moved(&self, plan: Move) -> Option<Connected> {
        let rounds = async {
            tokio::time::sleep(plan.first_pause).await;
            let mut pause = FIRST_REDIAL_PAUSE;
            loop {
                match self.move_round(&plan).await {
                    Ok(connected) => return Some(connected),
                    // A planned move with nowhere to go stays put at once,
                    // rather than hold the client's messages while it hopes.
                    Err(DialFailure::NoBackend) if plan.planned => return None,
                    Err(_) => {}
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LAST_REDIAL_PAUSE);
            }
        };
        tokio::time::timeout_at(plan.deadline, rounds)
            .await
            .ok()
            .flatten()
    }

    /// One round of a move. It avoids every backend the session left in
    /// its chain while another is available, and then only the one it
    /// leaves; it would rather try a backend that passive health ejected
    /// than have nowhere to go. A candidate that refuses, or picks another
    /// subprotocol, is skipped.
    async fn move_round(&self, plan: &Move) -> Result<Connected, DialFailure> {
        let config = self.config.load_full();
        let leaving = &plan.avoid[..plan.avoid.len().min(1)];
        let mut candidates = self.rank(&config, &plan.avoid, false);
        if candidates.is_empty() {
            candidates = self.rank(&config, leaving, false);
        }
        if candidates.is_empty() {
            candidates = self.rank(&config, leaving, true);
        }
        if candidates.is_empty() {
            return Err(DialFailure::NoBackend);
        }
        let mut last_error = None;
        for backend in &candidates {
            match self.try_backend(&config, backend, Some(plan)).await {
                Ok(connected) if connected.upstream.subprotocol != self.placement.subprotocol => {
                    tracing::warn!(backend = %backend.id, "backend chose another subprotocol; not moving there");
                }
                Ok(connected) => return Ok(connected),
                Err(Some(error)) => {
                    // Thousands of sessions moving at once would each log
                    // this: a move's failures are debug, metrics count them.
                    tracing::debug!(backend = %backend.id, %error, "dial failed; trying the next backend");
                    last_error = Some(error);
                }
                Err(None) => {}
            }
        }
        Err(DialFailure::after(last_error))
    }

    /// The candidates for this client, best first, at most
    /// `steering.max_dial_attempts`.
    fn rank(&self, config: &Config, exclude: &[String], last_resort: bool) -> Vec<Arc<Backend>> {
        self.backends.load().rank(
            &self.placement.location,
            &self.placement.key,
            exclude,
            config.steering.max_dial_attempts as usize,
            last_resort,
        )
    }

    /// A session slot on `backend`, then the dial; passive health hears how
    /// it went. `Err(None)`: the backend is at its session cap.
    async fn try_backend(
        &self,
        config: &Config,
        backend: &Arc<Backend>,
        moving: Option<&Move>,
    ) -> Result<Connected, Option<DialError>> {
        let slot = backend
            .try_acquire(self.session_id, &self.control)
            .ok_or(None)?;
        let placement = &*self.placement;
        let client = ClientInfo {
            ip: placement.client_ip,
            tls: placement.tls,
            session_key: placement.key.clone(),
            region: backend.region_name.clone(),
            country: placement.location.country.map(|c| c.as_str().to_string()),
            migrated_from: moving.map(|m| m.avoid[0].clone()),
            replayed: moving.map(|m| m.replayed),
        };
        let dialed = upstream::dial(
            backend,
            &placement.request,
            &client,
            config.relay.max_message_bytes,
            config.steering.dial_timeout,
            config.upstream_tls.as_ref(),
        )
        .await;
        match dialed {
            Ok(upstream) => {
                backend.report_success();
                Ok(Connected { upstream, slot })
            }
            Err(error) => {
                if error.try_next() && !error.is_local() {
                    backend.report_failure(&config.passive_health);
                }
                Err(Some(error))
            }
        }
    }
}
