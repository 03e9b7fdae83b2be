//! One client connection from accept to close: the upgrade under its
//! deadline, GeoIP and steering, the backend dial (before the client gets its
//! answer), the 101, the relay, and moving the session to another backend
//! when its backend fails, drains or is removed.
//!
//! Each connection is one task that owns its state (`Session`). It talks
//! to the rest of the router through the shared [`Router`] handle and its
//! own control cell, registered with whichever backend it is on. Its
//! [`SessionSlot`] keeps the backend's session count exact whichever way the
//! task ends.

pub mod migrate;
pub mod relay;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::Instrument;

use crate::backend::control::{Control, MigrationReason};
use crate::backend::{Backends, SessionSlot};
use crate::config::{Config, SessionKeySource};
use crate::geo::Location;
use crate::handshake::{self, HandshakeError, UpgradeRequest, plain_response};
use crate::limits::{Admission, Limits, MessageBudget, Refused};
use crate::memory::{MemoryBudget, SessionMemory};
use crate::metrics::{self as m, CloseReason};
use crate::proxy_protocol;
use crate::tls::{ClientStream, Terminator};
use crate::upstream::{self, ClientInfo, DialError, Upstream};
use crate::wire::close::{self as code, Fault};
use crate::wire::frame::{self, Unit};
use crate::wire::peer::{Peer, ReadEnd, close};
use migrate::{MoveChain, PendingQueue, ReplayWindow};
use relay::{RelayContext, RelayEnd, TrafficCounters};

/// Room a moving session must find in the memory budget before each read
/// from its client: what one read may add to its buffer (see
/// [`Peer::read_growth`]).
const MOVE_READ_RESERVE: usize = 64 * 1024;

/// Response headers of a backend refusal that are handed to the client.
const REFUSAL_HEADERS: &[&str] = &[
    "set-cookie",
    "www-authenticate",
    "retry-after",
    "content-type",
];

/// What every session needs from the router; cheap to clone.
#[derive(Clone)]
pub struct Router {
    /// The current configuration; a reload swaps it.
    pub config: Arc<ArcSwap<Config>>,
    pub backends: Backends,
    /// Becomes true when sessions must close (after the shutdown grace).
    pub shutdown: watch::Receiver<bool>,
    /// Held by every session; the router knows all sessions ended when
    /// every clone is dropped.
    pub session_done: mpsc::Sender<()>,
    pub counters: TrafficCounters,
    /// Source of session ids (registry keys, never exported).
    pub next_session_id: Arc<AtomicU64>,
    /// Edge limits shared by every connection.
    pub limits: Limits,
    /// Set when the public listener speaks TLS (`[tls]`).
    pub tls: Option<Terminator>,
    /// What sessions hold in memory, against `limits.max_buffered_bytes`.
    pub memory: MemoryBudget,
}

impl Router {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }
}

impl Placement {
    /// The session key's hash, for log lines (never the key itself).
    fn key_hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.key.as_bytes())
    }
}

/// Everything needed to (re)dial a backend for this client.
struct Placement {
    /// The client's request (path, query, forwarded headers).
    request: UpgradeRequest,
    client_ip: IpAddr,
    location: Location,
    key: String,
    /// The subprotocol the first backend chose; a new backend must agree.
    subprotocol: Option<String>,
    /// The client came over TLS (X-Forwarded-Proto: https).
    tls: bool,
}

/// Serve one accepted connection to completion.
pub async fn serve_connection(router: Router, stream: TcpStream, peer: SocketAddr) {
    let _done = router.session_done.clone();
    let span =
        tracing::debug_span!("session", client.addr = %peer, backend = tracing::field::Empty);
    async move {
        let _ = stream.set_nodelay(true);
        // Boxed: the handshake and the dial need far more state than the
        // relay, and a task is as big as its biggest moment. Boxing the
        // start keeps every idle session's task the size of its relay. The
        // session is boxed too: a value moved out of a local still takes
        // its room in the task, and a box is 8 bytes.
        if let Some((session, upstream)) = Box::pin(establish(router, stream, peer)).await {
            session.run(upstream).await;
        }
    }
    .instrument(span)
    .await
}

/// Everything before the relay: PROXY header, rate limit, TLS, the upgrade
/// request, Origin, placement, caps, the dial and the 101. `None` when the
/// connection was answered or dropped instead.
async fn establish(
    router: Router,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(Box<Session>, Upstream)> {
    let config = router.config();
    // Behind an L4 balancer that speaks PROXY protocol, its header names
    // the client; from anyone else a PROXY line is just a bad request.
    // One deadline covers it, the TLS handshake and the upgrade request.
    let deadline = Instant::now() + config.listener.handshake_timeout;
    let mut peer = peer;
    if handshake::is_trusted_proxy(peer.ip(), &config.listener.proxy_protocol_from) {
        match tokio::time::timeout_at(deadline, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(proxy_protocol::Header::Proxied { source })) => peer = source,
            Ok(Ok(proxy_protocol::Header::Local)) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "PROXY protocol header refused");
                metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => "proxy_protocol")
                    .increment(1);
                return None;
            }
            Err(_) => {
                metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => "handshake_timeout")
                    .increment(1);
                return None;
            }
        }
    }
    // A peer that is not a trusted proxy is rate-limited before we
    // read a byte (or spend a TLS handshake on it); behind a trusted
    // proxy, once we know the client.
    let peer_is_proxy = handshake::is_trusted_proxy(peer.ip(), &config.trusted_proxies);
    if !peer_is_proxy && let Err(refused) = router.limits.check_rate(peer.ip().to_canonical()) {
        let refusal = Refusal::from(refused);
        if router.tls.is_none() {
            refusal.send(&mut stream).await;
        }
        return None;
    }
    let mut stream = open_client(&router, stream, deadline).await?;
    let request = match read_upgrade(&config, &mut stream, deadline).await {
        Ok(request) => request,
        Err(e) => {
            reject(&mut stream, &e).await;
            return None;
        }
    };
    if let Err(refused) = router.limits.check_origin(request.header("origin")) {
        {
            Refusal::from(refused).send(&mut stream).await;
            return None;
        }
    }
    let (mut placement, key_cookie) = match place(&config, request, peer, stream.is_tls()) {
        Ok(placed) => placed,
        Err(refusal) => {
            refusal.send(&mut stream).await;
            return None;
        }
    };
    if peer_is_proxy && let Err(refused) = router.limits.check_rate(placement.client_ip) {
        {
            Refusal::from(refused).send(&mut stream).await;
            return None;
        }
    }
    let admission = match router.limits.admit(placement.client_ip) {
        Ok(admission) => admission,
        Err(refused) => {
            Refusal::from(refused).send(&mut stream).await;
            return None;
        }
    };
    let id = router.next_session_id.fetch_add(1, Ordering::Relaxed);
    let control = Arc::new(Control::default());
    let (upstream, slot) =
        match dial_candidates(&router, &config, &placement, None, id, &control).await {
            Ok(connected) => connected,
            Err(refusal) => {
                refusal.send(&mut stream).await;
                return None;
            }
        };
    tracing::Span::current().record("backend", slot.backend().id.as_str());
    placement.subprotocol = upstream.subprotocol.clone();
    let Some(client) = answer_upgrade(
        &config,
        stream,
        &mut placement.request,
        &upstream,
        key_cookie,
    )
    .await
    else {
        metrics::counter!(m::UPGRADES_TOTAL, "result" => "client_gone").increment(1);
        return None;
    };
    metrics::counter!(m::UPGRADES_TOTAL, "result" => "ok").increment(1);
    metrics::counter!(m::SESSIONS_TOTAL, "region" => slot.backend().region_name.clone())
        .increment(1);
    // Re-dials need only what is forwarded to a backend.
    upstream::keep_forwarded_headers(&mut placement.request);
    let mut window = ReplayWindow::new(
        config.migration.replay_max_messages,
        config.migration.replay_max_bytes,
        config.migration.replay_max_age,
    );
    window.set_ping_interval(config.migration.watermark_interval);
    window.start_connection(upstream.acknowledges);
    let session = Box::new(Session {
        budget: router.limits.message_budget(),
        _admission: admission,
        window,
        memory: router.memory.open(id),
        moves: MoveChain::default(),
        router,
        client,
        slot,
        placement: Arc::new(placement),
        id,
        control,
    });
    Some((session, upstream))
}

/// The TLS handshake, when the listener speaks TLS, under the handshake
/// deadline. A failed one (plaintext, TLS below 1.2, no shared cipher or
/// ALPN) is counted and the socket dropped: there is no channel to answer on.
async fn open_client(
    router: &Router,
    stream: TcpStream,
    deadline: Instant,
) -> Option<ClientStream> {
    let Some(tls) = &router.tls else {
        return Some(ClientStream::Plain(stream));
    };
    match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => "tls_handshake")
                .increment(1);
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => HandshakeError::Timeout.reason())
                .increment(1);
            metrics::counter!(m::UPGRADES_TOTAL, "result" => "timeout").increment(1);
            None
        }
    }
}

/// Read and check the upgrade request under the handshake deadline.
async fn read_upgrade(
    config: &Config,
    stream: &mut ClientStream,
    deadline: Instant,
) -> Result<UpgradeRequest, HandshakeError> {
    let listener = &config.listener;
    let (head, leftover) = tokio::time::timeout_at(
        deadline,
        handshake::read_request(stream, listener.max_request_header_bytes),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout))?;
    handshake::validate(head, leftover, &listener.paths)
}

/// Answer a request that will not upgrade, and count it.
async fn reject(stream: &mut ClientStream, error: &HandshakeError) {
    tracing::debug!(%error, "request refused");
    metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => error.reason()).increment(1);
    let result = if *error == HandshakeError::Timeout {
        "timeout"
    } else {
        "rejected"
    };
    metrics::counter!(m::UPGRADES_TOTAL, "result" => result).increment(1);
    if let Some((status, reason)) = error.status() {
        let body = format!("{error}\n");
        let _ = stream
            .write_all(&plain_response(
                status,
                reason,
                error.extra_headers(),
                &body,
            ))
            .await;
        let _ = stream.shutdown().await;
    }
}

/// How an upgrade that got no session ended (`wsrouter_upgrades_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Refused at the edge: a bad request, a limit, the session key.
    Rejected,
    /// Steering found no candidate backend.
    NoBackend,
    /// A backend answered the upgrade with a 4xx, handed to the client.
    UpstreamRefused,
    UpstreamTimeout,
    /// Every candidate had `steering.max_concurrent_dials` dials in flight.
    UpstreamBusy,
    UpstreamFailed,
}

impl Outcome {
    fn as_label(self) -> &'static str {
        match self {
            Outcome::Rejected => "rejected",
            Outcome::NoBackend => "no_backend",
            Outcome::UpstreamRefused => "upstream_refused",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::UpstreamBusy => "upstream_busy",
            Outcome::UpstreamFailed => "upstream_failed",
        }
    }
}

/// A dial that ended in an HTTP answer for the client instead of a session.
struct Refusal {
    result: Outcome,
    response: Vec<u8>,
}

impl From<Refused> for Refusal {
    /// An edge limit's answer, counted by reason.
    fn from(refused: Refused) -> Refusal {
        metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => refused.reason()).increment(1);
        let (status, phrase) = refused.status();
        let extra: &[(&str, &str)] = if status == 403 {
            &[]
        } else {
            &[("Retry-After", "1")]
        };
        Refusal {
            result: Outcome::Rejected,
            response: plain_response(status, phrase, extra, &format!("{refused}\n")),
        }
    }
}

impl Refusal {
    async fn send<S: tokio::io::AsyncWrite + Unpin>(self, stream: &mut S) {
        metrics::counter!(m::UPGRADES_TOTAL, "result" => self.result.as_label()).increment(1);
        let _ = stream.write_all(&self.response).await;
        let _ = stream.shutdown().await;
    }
}

/// Work out who and where the client is and its session key. Returns the
/// placement and a Set-Cookie line when the router generated a cookie key.
fn place(
    config: &Config,
    request: UpgradeRequest,
    peer: SocketAddr,
    tls: bool,
) -> Result<(Placement, Option<String>), Refusal> {
    let client_ip = handshake::client_ip(peer.ip(), &request, &config.trusted_proxies);
    let (location, lookup) = config.geoip.db.lookup(client_ip);
    metrics::counter!(m::GEOIP_LOOKUPS_TOTAL, "result" => lookup.as_label()).increment(1);
    let (key, key_cookie) = match request.session_key(&config.session_key) {
        Ok(Some(key)) => (key, None),
        Ok(None) => {
            let key = handshake::generate_session_key();
            let cookie = match &config.session_key {
                SessionKeySource::Cookie(name) => {
                    Some(format!("{name}={key}; Path=/; HttpOnly; SameSite=Lax"))
                }
                _ => None,
            };
            (key, cookie)
        }
        Err(e) => {
            metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => e.reason()).increment(1);
            return Err(Refusal {
                result: Outcome::Rejected,
                response: plain_response(400, "Bad Request", &[], &format!("{e}\n")),
            });
        }
    };
    let placement = Placement {
        request,
        client_ip,
        location,
        key,
        subprotocol: None,
        tls,
    };
    Ok((placement, key_cookie))
}

/// A migration's facts for the new backend.
#[derive(Clone, Copy)]
struct MigrationDial<'a> {
    from: &'a str,
    /// Every backend the session left in its current chain of moves,
    /// `from` first.
    avoid: &'a [String],
    replayed: usize,
}

/// Dial the ranked backends until one accepts, within the configured number
/// of attempts. A first dial hands a backend's 4xx to the client; a
/// migration skips the failed backend, and any candidate that refuses or
/// picks another subprotocol.
async fn dial_candidates(
    router: &Router,
    config: &Config,
    placement: &Placement,
    migration: Option<MigrationDial<'_>>,
    session_id: u64,
    control: &Arc<Control>,
) -> Result<(Upstream, SessionSlot), Refusal> {
    let set = router.backends.load();
    let attempts = config.steering.max_dial_attempts as usize;
    // A moving session avoids every backend it left in its chain of moves
    // while another is available, and then only the one it leaves; it
    // would rather try a backend that passive health ejected than have
    // nowhere to go.
    let (avoid_all, avoid_last): (&[String], &[String]) = match migration {
        Some(m) => (m.avoid, &m.avoid[..m.avoid.len().min(1)]),
        None => (&[], &[]),
    };
    let rank = |exclude: &[String], last_resort: bool| {
        set.rank(
            &placement.location,
            &placement.key,
            exclude,
            attempts,
            last_resort,
        )
    };
    let mut candidates = rank(avoid_all, false);
    if candidates.is_empty() && migration.is_some() {
        candidates = rank(avoid_last, false);
    }
    if candidates.is_empty() && migration.is_some() {
        candidates = rank(avoid_last, true);
    }
    if candidates.is_empty() {
        if migration.is_none() {
            tracing::warn!("no backend available");
        }
        return Err(Refusal {
            result: Outcome::NoBackend,
            response: plain_response(
                503,
                "Service Unavailable",
                &[("Retry-After", "5")],
                "no backend available\n",
            ),
        });
    }

    let mut last_error = None;
    for backend in &candidates {
        let Some(slot) = backend.try_acquire(session_id, control) else {
            continue;
        };
        let client = ClientInfo {
            ip: placement.client_ip,
            tls: placement.tls,
            session_key: placement.key.clone(),
            region: backend.region_name.clone(),
            country: placement.location.country.map(|c| c.as_str().to_string()),
            migrated_from: migration.map(|m| m.from.to_string()),
            replayed: migration.map(|m| m.replayed),
        };
        match upstream::dial(
            backend,
            &placement.request,
            &client,
            config.relay.max_message_bytes,
            config.steering.dial_timeout,
            config.upstream_tls.as_ref(),
        )
        .await
        {
            Ok(upstream)
                if migration.is_some() && upstream.subprotocol != placement.subprotocol =>
            {
                tracing::warn!(backend = %backend.id, "backend chose another subprotocol; not moving there");
            }
            Ok(upstream) => {
                backend.report_success();
                return Ok((upstream, slot));
            }
            Err(DialError::Refused(response))
                if migration.is_none() && !response.is_server_error() =>
            {
                return Err(Refusal {
                    result: Outcome::UpstreamRefused,
                    response: refusal_response(&response),
                });
            }
            Err(e) => {
                // Thousands of sessions moving at once would each log this:
                // a migration's failures are debug, the metrics count them.
                if migration.is_some() {
                    tracing::debug!(backend = %backend.id, error = %e, "dial failed; trying the next backend");
                } else {
                    tracing::warn!(backend = %backend.id, error = %e, "dial failed; trying the next backend");
                }
                if e.try_next() && !e.is_local() {
                    backend.report_failure(&config.passive_health);
                }
                last_error = Some(e);
            }
        }
    }
    let (result, response) = match last_error {
        Some(DialError::Timeout) => (
            Outcome::UpstreamTimeout,
            plain_response(504, "Gateway Timeout", &[], "no backend answered in time\n"),
        ),
        Some(DialError::Busy) => (
            Outcome::UpstreamBusy,
            plain_response(
                503,
                "Service Unavailable",
                &[("Retry-After", "1")],
                "every backend is busy\n",
            ),
        ),
        None => (
            Outcome::UpstreamFailed,
            plain_response(
                503,
                "Service Unavailable",
                &[("Retry-After", "5")],
                "every backend is full\n",
            ),
        ),
        Some(_) => (
            Outcome::UpstreamFailed,
            plain_response(
                502,
                "Bad Gateway",
                &[],
                "no backend accepted the connection\n",
            ),
        ),
    };
    Err(Refusal { result, response })
}

/// The backend's refusal, re-issued to the client with its status, the
/// headers in [`REFUSAL_HEADERS`] and its (bounded) body.
fn refusal_response(response: &upstream::Response) -> Vec<u8> {
    // The reason phrase is informative only; ours is always printable.
    let reason = if response.reason.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        response.reason.as_str()
    } else {
        "Refused"
    };
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, reason).into_bytes();
    for (name, value) in &response.headers {
        if REFUSAL_HEADERS.contains(&name.as_str()) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    let body = &response.body;
    out.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// Send the 101 with what the backend chose, and wrap the client socket
/// (with any frames the client sent right behind its request).
async fn answer_upgrade(
    config: &Config,
    mut stream: ClientStream,
    request: &mut UpgradeRequest,
    upstream: &Upstream,
    key_cookie: Option<String>,
) -> Option<Peer<ClientStream>> {
    let key = request.header("sec-websocket-key")?.trim();
    let mut head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    )
    .into_bytes();
    let protocol = upstream.subprotocol.iter().map(|p| p.as_bytes());
    let headers = protocol
        .map(|v| ("sec-websocket-protocol", v))
        .chain(upstream.set_cookies.iter().map(|v| ("set-cookie", &v[..])));
    for (name, value) in headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    if let Some(cookie) = key_cookie {
        head.extend_from_slice(format!("set-cookie: {cookie}\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await.ok()?;
    // TLS holds written bytes in its buffer until a flush.
    stream.flush().await.ok()?;
    Some(Peer::client(
        stream,
        config.relay.max_message_bytes,
        std::mem::take(&mut request.leftover),
    ))
}

/// An established session: the client, its current backend, and what it
/// needs to move.
struct Session {
    router: Router,
    client: Peer<ClientStream>,
    /// The claim on the current backend (and its control registration).
    slot: SessionSlot,
    placement: Arc<Placement>,
    id: u64,
    /// Where the router asks this session to move.
    control: Arc<Control>,
    window: ReplayWindow,
    /// Per-session message and byte rates, when configured.
    budget: Option<MessageBudget>,
    /// What the session holds, against the process budget.
    memory: SessionMemory,
    /// The backends it left lately, against move loops.
    moves: MoveChain,
    /// This session's place under the per-IP and global caps.
    _admission: Admission,
}

impl Session {
    /// Relay, moving to another backend whenever the current one fails or
    /// is drained, until the session ends.
    async fn run(mut self: Box<Self>, mut upstream: Upstream) {
        let mut shutdown = self.router.shutdown.clone();
        loop {
            let config = self.router.config();
            let end = relay::relay(
                &mut self.client,
                &mut upstream.peer,
                RelayContext {
                    config: &config.relay,
                    migration: &config.migration,
                    counters: &self.router.counters,
                    shutdown: &mut shutdown,
                    control: &self.control,
                    window: &mut self.window,
                    budget: self.budget.as_mut(),
                    memory: &mut self.memory,
                },
            )
            .await;
            let reason = match end {
                RelayEnd::BackendLost => MigrationReason::UpstreamLost,
                RelayEnd::BackendClosed(Some(ref frame)) if code::is_migrating(frame.code) => {
                    MigrationReason::UpstreamClosed
                }
                RelayEnd::MigrateRequested(reason) => reason,
                RelayEnd::BackendClosed(frame) => {
                    // 1000, 1008 and the rest end the session, as the backend meant.
                    self.client
                        .finish_close(frame.as_ref(), config.relay.close_timeout)
                        .await;
                    CloseReason::BackendClose.count();
                    return;
                }
                end => {
                    tracing::debug!(?end, "session ended");
                    if let Some(reason) = end.close_reason() {
                        reason.count();
                    }
                    return;
                }
            };
            if let Err(close_reason) = self.may_move(reason, &config).await {
                close_reason.count();
                return;
            }
            // Boxed: a move is rare and its dial state is large; inline it
            // would make every idle session's task that much bigger.
            upstream = match Box::pin(self.migrate(upstream, reason, &config)).await {
                Ok(next) => next,
                Err(close_reason) => {
                    close_reason.count();
                    return;
                }
            };
        }
    }

    /// Whether the session may move on from a backend it leaves for
    /// `reason`, and the backend's share of the blame. After a failure,
    /// the client messages the backend received within [`SUSPECT_WITHIN`]
    /// get a strike; one that backends failed right after on
    /// `max_redeliveries` backends is a poison message, and is not replayed
    /// again: the client is closed with 1011. So is a session that moved
    /// `max_moves` times within `moves_window` (a loop). A failure right
    /// after a message that already broke another backend is the
    /// message's, not the backend's: passive health does not count it.
    async fn may_move(
        &mut self,
        reason: MigrationReason,
        config: &Config,
    ) -> Result<(), CloseReason> {
        let now = Instant::now();
        let failed = matches!(
            reason,
            MigrationReason::UpstreamLost
                | MigrationReason::UpstreamClosed
                | MigrationReason::Stalled
        );
        let (strikes, size) = if failed {
            self.window.strike_recent(now, SUSPECT_WITHIN)
        } else {
            (0, 0)
        };
        if !reason.is_planned() && strikes <= 1 {
            self.slot.backend().report_failure(&config.passive_health);
        }
        let migration = &config.migration;
        let (close_reason, why) = if strikes >= migration.max_redeliveries {
            tracing::warn!(
                key_hash = %format_args!("{:016x}", self.placement.key_hash()),
                backend = %self.slot.backend().id,
                message_bytes = size,
                backends_failed = strikes,
                "poison message: backends failed right after receiving it; closing the session"
            );
            (
                CloseReason::PoisonMessage,
                "message refused by the backends",
            )
        } else if self.moves.recent(now, migration.moves_window) >= migration.max_moves as usize {
            tracing::warn!(
                key_hash = %format_args!("{:016x}", self.placement.key_hash()),
                moves = migration.max_moves,
                window = ?migration.moves_window,
                "move loop: the session moved too often; closing it"
            );
            (
                CloseReason::MigrationLoop,
                "session could not be kept on any backend",
            )
        } else {
            return Ok(());
        };
        self.client
            .finish_close(
                Some(&close(code::INTERNAL_ERROR, why)),
                config.relay.close_timeout,
            )
            .await;
        Err(close_reason)
    }

    /// Move from `old` to another backend and return the new connection.
    /// Client messages that arrive meanwhile are queued; after an abrupt
    /// failure the replay window goes first. A planned move keeps `old`
    /// open until the new one is ready, and returns it when no other
    /// backend takes the session; an abrupt one drops it at once (its
    /// socket is dead, and thousands of them would hold the router's file
    /// descriptors through a failover) and closes the client with 1013
    /// when no backend takes it in time.
    async fn migrate(
        &mut self,
        old: Upstream,
        reason: MigrationReason,
        config: &Config,
    ) -> Result<Upstream, CloseReason> {
        let mut kept = reason.is_planned().then_some(old);
        let started = Instant::now();
        let from = self.slot.backend().id.clone();
        // What kind of replay this is, for the metrics: after the old
        // backend's acknowledgements, or after its watermark (the first
        // `margin` of them it had read).
        let old_acknowledges = self.window.acknowledges();
        let margin = self.window.read_len();
        // After a failure, what the backend had not read or acknowledged
        // is replayed. A planned move leaves the old backend open: it
        // replays nothing, unless the backend acknowledges, when what it
        // has not acknowledged by the end of the hand-over is replayed.
        let mut replay = if reason.replays() {
            self.window.take_fresh_struck(started)
        } else {
            if !self.window.acknowledges() {
                self.window.clear();
            }
            Vec::new()
        };
        let replayed = if reason.replays() {
            replay.len()
        } else {
            self.window.len()
        };
        // The second move of a chain and those after it wait, as dial
        // rounds do: a loop that escaped the poison check still crawls.
        let earlier = self.moves.recent(started, config.migration.moves_window);
        let first_pause = match earlier {
            0 => Duration::ZERO,
            n => FIRST_REDIAL_PAUSE
                .saturating_mul(1 << (n - 1).min(10))
                .min(LAST_REDIAL_PAUSE),
        };
        self.moves.record(started, &from);
        tracing::debug!(backend = %from, reason = reason.as_label(), replay = replay.len(), "moving session");
        let mut queue = PendingQueue::new(config.migration.queue_max_bytes);
        let deadline = started + config.migration.timeout;
        let dial = redial(
            self.router.clone(),
            Arc::clone(&self.placement),
            self.moves.backends(),
            replayed,
            deadline,
            self.id,
            Arc::clone(&self.control),
            reason.is_planned(),
            first_pause,
        );
        tokio::pin!(dial);
        let close_timeout = config.relay.close_timeout;

        // Meanwhile the client's messages queue up, and what the old
        // backend sends (a planned move keeps it open) still goes out to
        // the client, whole messages only.
        let mut old_readable = kept.is_some();
        // Once the new backend is ready, a planned move closes the old one
        // with 1001 and keeps delivering what it sends until its close
        // handshake completes (bounded by the close timeout): the client
        // gets the old backend's messages, then the new one's, none lost.
        let mut ready: Option<(Upstream, SessionSlot)> = None;
        let mut handover_until = started;
        let moved = loop {
            // The session cannot wait for room while it moves: when the
            // process budget has none for what the next read may add, the
            // session is closed.
            let held = self.client.held_bytes() + self.window.held_bytes() + queue.bytes();
            if !self.memory.may_hold(held, MOVE_READ_RESERVE) {
                break None;
            }
            let unit = tokio::select! {
                result = &mut dial, if ready.is_none() => match (result, kept.as_mut()) {
                    (Some(connected), Some(old)) if old_readable => {
                        old.peer.queue_close(&close(code::GOING_AWAY, "session moved"));
                        ready = Some(connected);
                        handover_until = Instant::now() + close_timeout;
                        continue;
                    }
                    (result, _) => break Some(result),
                },
                _ = tokio::time::sleep_until(handover_until), if ready.is_some() => break Some(ready.take()),
                unit = self.client.next_unit() => unit,
                from_old = next_from(kept.as_mut().filter(|_| old_readable)) => {
                    let old = kept.as_mut().expect("only read while kept");
                    match from_old {
                        Ok(Unit::Message { len, .. }) => self.client.queue(old.peer.reader.take(len)),
                        // What it acknowledges during the hand-over is not
                        // replayed (a bad acknowledgement is ignored: it is
                        // being left).
                        Ok(Unit::Pong { len, .. }) => {
                            if let Some(frame::Ack::Count(count)) = frame::ack_of(&old.peer.reader.take(len)) {
                                let _ = self.window.acknowledge(count, Instant::now());
                            }
                        }
                        Ok(unit @ Unit::Ping { .. }) => old.peer.reader.skip(unit.len()),
                        // Its close handshake is over: on to the new one.
                        Ok(Unit::Close { .. }) | Err(_) if ready.is_some() => break Some(ready.take()),
                        // It is being left anyway; it is closed (or found
                        // dead by the relay, if the session stays) later.
                        Ok(Unit::Close { .. }) | Err(_) => old_readable = false,
                    }
                    continue;
                }
            };
            let ended = match unit {
                Ok(Unit::Message { len, .. }) => {
                    if queue.push(self.client.reader.take(len)).is_ok() {
                        continue;
                    }
                    tracing::warn!("client sent more than the migration queue holds");
                    self.client
                        .finish_close(
                            Some(&close(code::TRY_AGAIN_LATER, "try again later")),
                            close_timeout,
                        )
                        .await;
                    CloseReason::MigrationQueueFull
                }
                // Nobody to answer a ping while there is no backend.
                Ok(unit @ (Unit::Ping { .. } | Unit::Pong { .. })) => {
                    self.client.reader.skip(unit.len());
                    continue;
                }
                Ok(Unit::Close { frame, .. }) => {
                    self.client.echo_close(frame.as_ref(), close_timeout).await;
                    if let Some(old) = kept.as_mut() {
                        old.peer.finish_close(frame.as_ref(), close_timeout).await;
                    }
                    return Err(CloseReason::ClientClose);
                }
                Err(ReadEnd::Violation(violation)) => {
                    let fault = Fault::from(violation);
                    self.client
                        .finish_close(Some(&close(fault.code(), fault.reason())), close_timeout)
                        .await;
                    fault.close_reason()
                }
                Err(ReadEnd::Lost) => CloseReason::ClientLost,
            };
            if let Some(old) = kept.as_mut() {
                old.peer
                    .finish_close(
                        Some(&close(code::GOING_AWAY, "client went away")),
                        close_timeout,
                    )
                    .await;
            }
            return Err(ended);
        };
        let Some(moved) = moved else {
            tracing::warn!("memory budget reached while the session moves; closing it");
            self.client
                .finish_close(
                    Some(&close(code::TRY_AGAIN_LATER, "try again later")),
                    close_timeout,
                )
                .await;
            if let Some(old) = kept.as_mut() {
                old.peer
                    .finish_close(
                        Some(&close(code::GOING_AWAY, "client went away")),
                        close_timeout,
                    )
                    .await;
            }
            return Err(CloseReason::MemoryPressure);
        };

        let Some((mut upstream, slot)) = moved else {
            if let Some(mut old) = kept {
                tracing::debug!(backend = %from, reason = reason.as_label(), "no other backend took the session; it stays");
                send_in_order(&mut old, &mut self.window, Vec::new(), queue.drain()).await;
                return Ok(old);
            }
            tracing::warn!(backend = %from, "no backend took the session in time");
            self.client
                .finish_close(
                    Some(&close(code::TRY_AGAIN_LATER, "no backend available")),
                    close_timeout,
                )
                .await;
            return Err(CloseReason::MigrationFailed);
        };

        self.slot = slot;
        if !reason.replays() && self.window.acknowledges() {
            replay = self.window.take_fresh_struck(Instant::now());
        }
        self.window.start_connection(upstream.acknowledges);
        // Closed above when it could still be read; else closed here, aside.
        if let Some(mut old) = kept.filter(|_| !old_readable) {
            tokio::spawn(async move {
                old.peer
                    .finish_close(
                        Some(&close(code::GOING_AWAY, "session moved")),
                        close_timeout,
                    )
                    .await;
            });
        }
        let to = self.slot.backend().id.clone();
        tracing::Span::current().record("backend", to.as_str());
        metrics::counter!(m::MIGRATIONS_TOTAL, "from" => from.clone(), "to" => to.clone(), "reason" => reason.as_label())
            .increment(1);
        let margin = margin.min(replay.len());
        let unread = if old_acknowledges {
            "unacknowledged"
        } else {
            "unread"
        };
        metrics::counter!(m::REPLAYED_MESSAGES_TOTAL, "kind" => "margin").increment(margin as u64);
        metrics::counter!(m::REPLAYED_MESSAGES_TOTAL, "kind" => unread)
            .increment((replay.len() - margin) as u64);
        metrics::histogram!(m::MIGRATION_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::debug!(from = %from, to = %to, reason = reason.as_label(), elapsed = ?started.elapsed(), "session moved");

        // Replays first, then what queued up, in order.
        send_in_order(&mut upstream, &mut self.window, replay, queue.drain()).await;
        Ok(upstream)
    }
}

/// Forward to a backend, in order, the replayed messages (each with its
/// strikes) and then the queued ones, in one write, recording each in the
/// replay window. A failed write is left for the relay to notice; the
/// window then replays these again.
async fn send_in_order(
    upstream: &mut Upstream,
    window: &mut ReplayWindow,
    replay: Vec<(Bytes, u32)>,
    queued: impl Iterator<Item = Bytes>,
) {
    let now = Instant::now();
    let mut batch = BytesMut::new();
    let mut dropped = 0;
    for (message, strikes) in replay {
        batch.extend_from_slice(&message);
        dropped += window.push_replayed(&message, strikes, now);
    }
    let replayed = batch.len();
    let mut count = 0;
    for message in queued {
        batch.extend_from_slice(&message);
        count += 1;
    }
    dropped += window.push(&batch[replayed..], count, now);
    metrics::counter!(m::REPLAY_DROPPED_TOTAL).increment(dropped as u64);
    if !batch.is_empty() {
        let _ = upstream.peer.send(batch.freeze()).await;
    }
}

/// The next unit from the backend a planned move is leaving; never, without
/// one.
async fn next_from(old: Option<&mut Upstream>) -> Result<Unit, ReadEnd> {
    match old {
        Some(old) => old.peer.next_unit().await,
        None => std::future::pending().await,
    }
}

/// The pause between dial rounds, and before each move of a chain after
/// the first, doubles from this...
const FIRST_REDIAL_PAUSE: Duration = Duration::from_millis(50);
/// ...to this.
const LAST_REDIAL_PAUSE: Duration = Duration::from_secs(1);

/// A backend that fails this soon after receiving a client message is
/// suspected of failing because of it (a poison message).
const SUSPECT_WITHIN: Duration = Duration::from_secs(1);

/// Dial rounds with backoff, after `first_pause`, until a backend not in
/// `avoid` (the backends the session left, the one it leaves first)
/// accepts, or `deadline` passes.
#[allow(clippy::too_many_arguments)]
async fn redial(
    router: Router,
    placement: Arc<Placement>,
    avoid: Vec<String>,
    replayed: usize,
    deadline: Instant,
    session_id: u64,
    control: Arc<Control>,
    planned: bool,
    first_pause: Duration,
) -> Option<(Upstream, SessionSlot)> {
    let attempt = async {
        tokio::time::sleep(first_pause).await;
        let mut pause = FIRST_REDIAL_PAUSE;
        loop {
            let config = router.config();
            let migration = MigrationDial {
                from: &avoid[0],
                avoid: &avoid,
                replayed,
            };
            match dial_candidates(
                &router,
                &config,
                &placement,
                Some(migration),
                session_id,
                &control,
            )
            .await
            {
                Ok(connected) => return Some(connected),
                // A planned move with nowhere to go stays put at once,
                // rather than holding the client's messages while it hopes.
                Err(refusal) if planned && refusal.result == Outcome::NoBackend => return None,
                Err(_) => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LAST_REDIAL_PAUSE);
        }
    };
    tokio::time::timeout_at(deadline, attempt)
        .await
        .ok()
        .flatten()
}
