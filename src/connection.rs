//! One accepted connection up to its session: the PROXY header, the rate
//! limit, TLS, the upgrade request, Origin, the client's place and session
//! key, the caps, the first dial (before the client gets its answer) and
//! the 101. Every way this can end without a session is an
//! [`Answer`]; the session itself is [`crate::session`]'s.
//!
//! One deadline (`listener.handshake_timeout`) covers the PROXY header, the
//! TLS handshake and the upgrade request.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::answer::{self, Answer};
use crate::config::{Config, SessionKeySource};
use crate::handshake::{self, HandshakeError, Request, UpgradeRequest};
use crate::limits::Admission;
use crate::metrics::{self as m, PollResult, UpgradeResult};
use crate::proxy_protocol;
use crate::session::{Arrival, Router, Session};
use crate::socketio::polling::Polling;
use crate::socketio::{self, Connects, EngineIo};
use crate::tls::ClientStream;
use crate::upstream::dialer::{Connected, Dialer, Placement};
use crate::upstream::{self, Upstream};
use crate::wire::peer::Peer;

/// Serve one accepted connection to completion.
pub async fn serve_connection(router: Router, stream: TcpStream, peer: SocketAddr) {
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
            session.run(upstream, Arrival::Accepted).await;
        }
    }
    .instrument(span)
    .await
}

/// Everything before the relay. `None` when the connection was answered or
/// dropped instead.
async fn establish(
    router: Router,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(Box<Session>, Upstream)> {
    let config = router.config();
    let deadline = Instant::now() + config.listener.handshake_timeout;
    // Behind an L4 balancer that speaks PROXY protocol, its header names
    // the client; from anyone else a PROXY line is just a bad request.
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
        let answer = Answer::refused(refused);
        if router.tls.is_none() {
            answer.send(&mut stream).await;
        }
        return None;
    }
    let mut stream = open_client(&router, stream, deadline).await?;
    let request = match read_request(&config, &mut stream, deadline).await {
        Ok(Request::Upgrade(request)) => request,
        Ok(Request::Http { method, request }) => {
            // engine.io long-polling: HTTP to the end of this connection.
            let client_ip = handshake::client_ip(peer.ip(), &request, &config.trusted_proxies);
            if peer_is_proxy && let Err(refused) = router.limits.check_rate(client_ip) {
                PollResult::Rejected.count();
                Answer::refused(refused).write_to(&mut stream).await;
                return None;
            }
            let polling = Polling {
                config: &config,
                backends: &router.backends,
                limits: &router.limits,
                sids: &router.sids,
                peer,
                tls: stream.is_tls(),
                shutdown: router.shutdown.clone(),
            };
            polling.serve(&mut stream, (method, request)).await;
            return None;
        }
        Err(answer) => {
            answer.send(&mut stream).await;
            return None;
        }
    };
    let accepted = match upgrade(&router, &config, &mut stream, request, peer, peer_is_proxy).await
    {
        Ok(accepted) => accepted,
        Err(answer) => {
            answer.send(&mut stream).await;
            return None;
        }
    };
    let Accepted {
        engineio,
        mut dialer,
        connected: Connected { upstream, slot },
        admission,
        websocket_key,
        leftover,
        key_cookie,
    } = accepted;
    tracing::Span::current().record("backend", slot.backend().id.as_str());
    dialer.agree_subprotocol(upstream.subprotocol.clone());
    let head = answer::switching_protocols(
        &websocket_key,
        upstream.subprotocol.as_deref(),
        &upstream.set_cookies,
        key_cookie.as_deref(),
    );
    // TLS holds written bytes in its buffer until a flush.
    if stream.write_all(&head).await.is_err() || stream.flush().await.is_err() {
        UpgradeResult::ClientGone.count();
        return None;
    }
    UpgradeResult::Ok.count();
    metrics::counter!(m::SESSIONS_TOTAL, "region" => slot.backend().region_name.clone())
        .increment(1);
    // The client's first frames may have come right behind its request.
    let client = Peer::client(stream, config.relay.max_message_bytes, leftover);
    if engineio.is_some() {
        metrics::counter!(m::SOCKETIO_SESSIONS_TOTAL).increment(1);
    }
    let acknowledges = upstream.acknowledges;
    let session = Session::start(
        router,
        client,
        slot,
        dialer,
        admission,
        engineio,
        acknowledges,
    );
    Some((session, upstream))
}

/// An upgrade a backend accepted, before the client has its 101.
struct Accepted {
    /// A Socket.IO session, with the sid its client long-polled with (if
    /// it did, through this router).
    engineio: Option<EngineIo>,
    dialer: Dialer,
    connected: Connected,
    /// The session's place under the per-IP and global caps.
    admission: Admission,
    websocket_key: String,
    /// Bytes the client sent right behind its request (its first frames).
    leftover: Vec<u8>,
    /// The router's own session cookie, when it made the key.
    key_cookie: Option<String>,
}

/// From the upgrade request to a backend that accepts the session:
/// Origin, the client's place and key, the caps, the first dial.
async fn upgrade(
    router: &Router,
    config: &Config,
    stream: &mut ClientStream,
    mut request: UpgradeRequest,
    peer: SocketAddr,
    peer_is_proxy: bool,
) -> Result<Accepted, Answer> {
    router
        .limits
        .check_origin(request.header("origin"))
        .map_err(Answer::refused)?;
    let websocket_key = request
        .header("sec-websocket-key")
        .unwrap_or_default()
        .trim()
        .to_string();
    let leftover = std::mem::take(&mut request.leftover);
    let engineio = config.socketio.matches(path_of(&request.target));
    let (pinned, polled_as) = match engineio {
        true => engineio_backend(router, config, &request)?,
        false => (None, None),
    };
    let fresh_target = engineio.then(|| socketio::fresh_target(&request.target));
    let (placement, key_cookie) = place(config, request, peer, stream.is_tls())?;
    if peer_is_proxy {
        router
            .limits
            .check_rate(placement.client_ip)
            .map_err(Answer::refused)?;
    }
    let admission = router
        .limits
        .admit(placement.client_ip)
        .map_err(Answer::refused)?;
    let id = router.next_session_id.fetch_add(1, Ordering::Relaxed);
    let mut dialer = Dialer::new(
        router.config.clone(),
        router.backends.clone(),
        placement,
        id,
    );
    let connected = dialer
        .first(pinned.as_deref())
        .await
        .map_err(Answer::dial_failed)?;
    if let Some(target) = fresh_target {
        dialer.set_target(target);
    }
    Ok(Accepted {
        engineio: engineio.then_some(EngineIo {
            connects: Connects::default(),
            polled_as,
        }),
        dialer,
        connected,
        admission,
        websocket_key,
        leftover,
        key_cookie,
    })
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
            UpgradeResult::Timeout.count();
            None
        }
    }
}

/// The upgrade of an engine.io session that started with long-polling
/// (its request carries the `sid`) goes to the backend that holds it, when
/// this router saw its handshake: that backend's id, and the sid. Without a
/// session key, a `sid` it does not know gets engine.io's "Session ID
/// unknown", so the client starts over.
fn engineio_backend(
    router: &Router,
    config: &Config,
    request: &UpgradeRequest,
) -> Result<(Option<String>, Option<String>), Answer> {
    let Some(sid) = request.query_param("sid") else {
        return Ok((None, None));
    };
    match router.sids.backend_of(&sid) {
        Some(backend) => Ok((Some(backend), Some(sid))),
        None if matches!(request.session_key(&config.session_key), Ok(Some(_))) => Ok((None, None)),
        None => Err(Answer::unknown_sid()),
    }
}

/// The path of a request target, without its query.
fn path_of(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or("/")
}

/// Read the request under the handshake deadline: an upgrade, or an
/// HTTP request on a Socket.IO path.
async fn read_request(
    config: &Config,
    stream: &mut ClientStream,
    deadline: Instant,
) -> Result<Request, Answer> {
    let listener = &config.listener;
    let read = tokio::time::timeout_at(
        deadline,
        handshake::read_request(stream, listener.max_request_header_bytes),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout));
    read.and_then(|(head, leftover)| {
        handshake::classify(head, leftover, &listener.paths, &config.socketio)
    })
    .map_err(|error| {
        tracing::debug!(%error, "request refused");
        Answer::bad_request(&error)
    })
}

/// Work out who and where the client is and its session key. Returns the
/// placement and a Set-Cookie value when the router generated a cookie key.
fn place(
    config: &Config,
    mut request: UpgradeRequest,
    peer: SocketAddr,
    tls: bool,
) -> Result<(Placement, Option<String>), Answer> {
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
        Err(error) => return Err(Answer::bad_request(&error)),
    };
    // A session keeps its request for re-dials, for its whole life: only
    // what a backend is sent.
    upstream::keep_forwarded_headers(&mut request);
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
