//! One client connection from accept to close: the upgrade under its
//! deadline, GeoIP and steering, the backend dial (before the client gets its
//! answer), the 101, and the relay.
//!
//! Each connection is one task that owns its state. It talks to the rest of
//! the router only through the shared [`Router`] handle: the backend set
//! snapshot, the configuration, and the shutdown signal. Its
//! [`SessionSlot`](crate::backend::SessionSlot) keeps the backend's session
//! count exact whichever way the task ends.

pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

use crate::backend::{Backends, SessionSlot};
use crate::config::{Config, SessionKeySource};
use crate::handshake::{self, HandshakeError, UpgradeRequest, plain_response};
use crate::metrics as m;
use crate::upstream::{self, ClientInfo, DialError, Upstream};
use relay::{RelayEnd, TrafficCounters};

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
    pub config: Arc<Config>,
    pub backends: Backends,
    /// True once the router is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Held by every session; the router knows all sessions ended when
    /// every clone is dropped.
    pub session_done: mpsc::Sender<()>,
    pub counters: TrafficCounters,
}

impl Router {
    /// tungstenite settings for both hops.
    fn ws_config(&self) -> WebSocketConfig {
        let max = self.config.relay.max_message_bytes;
        WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
    }
}

/// Serve one accepted connection to completion.
pub async fn serve_connection(router: Router, mut stream: TcpStream, peer: SocketAddr) {
    let _done = router.session_done.clone();
    let span =
        tracing::debug_span!("session", client.addr = %peer, backend = tracing::field::Empty);
    async move {
        let _ = stream.set_nodelay(true);
        let request = match read_upgrade(&router, &mut stream).await {
            Ok(request) => request,
            Err(e) => {
                reject(&mut stream, &e).await;
                return;
            }
        };
        match connect(&router, &request, peer).await {
            Ok((upstream, slot, key_cookie)) => {
                tracing::Span::current().record("backend", slot.backend().id.as_str());
                let Some(client) = answer_upgrade(&router, stream, &request, &upstream, key_cookie).await else {
                    metrics::counter!(m::UPGRADES_TOTAL, "result" => "client_gone").increment(1);
                    return;
                };
                metrics::counter!(m::UPGRADES_TOTAL, "result" => "ok").increment(1);
                metrics::counter!(m::SESSIONS_TOTAL, "region" => slot.backend().region_name.clone()).increment(1);
                run_relay(&router, client, upstream.ws).await;
                drop(slot);
            }
            Err(refusal) => {
                metrics::counter!(m::UPGRADES_TOTAL, "result" => refusal.result).increment(1);
                let _ = stream.write_all(&refusal.response).await;
                let _ = stream.shutdown().await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Read and check the upgrade request under the handshake deadline.
async fn read_upgrade(
    router: &Router,
    stream: &mut TcpStream,
) -> Result<UpgradeRequest, HandshakeError> {
    let listener = &router.config.listener;
    let (head, leftover) = tokio::time::timeout(
        listener.handshake_timeout,
        handshake::read_request(stream, listener.max_request_header_bytes),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout))?;
    handshake::validate(head, leftover, &listener.paths)
}

/// Answer a request that will not upgrade, and count it.
async fn reject(stream: &mut TcpStream, error: &HandshakeError) {
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

/// A dial that ended in an HTTP answer for the client instead of a session.
struct Refusal {
    /// `wsrouter_upgrades_total{result}`.
    result: &'static str,
    response: Vec<u8>,
}

/// Place the client and dial backends until one accepts, within the
/// configured number of attempts. Returns the connected backend, its slot,
/// and a Set-Cookie line when the router generated a cookie session key.
async fn connect(
    router: &Router,
    request: &UpgradeRequest,
    peer: SocketAddr,
) -> Result<(Upstream, SessionSlot, Option<String>), Refusal> {
    let config = &router.config;
    let client_ip = handshake::client_ip(peer.ip(), request, &config.trusted_proxies);
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
                result: "rejected",
                response: plain_response(400, "Bad Request", &[], &format!("{e}\n")),
            });
        }
    };

    let set = router.backends.load();
    let candidates = set.rank(&location, &key);
    if candidates.is_empty() {
        tracing::warn!("no backend available");
        return Err(Refusal {
            result: "no_backend",
            response: plain_response(
                503,
                "Service Unavailable",
                &[("Retry-After", "5")],
                "no backend available\n",
            ),
        });
    }

    let mut last_error = None;
    for backend in candidates
        .iter()
        .take(config.steering.max_dial_attempts as usize)
    {
        let Some(slot) = backend.try_acquire() else {
            continue;
        };
        let client = ClientInfo {
            ip: client_ip,
            tls: false,
            session_key: key.clone(),
            region: backend.region_name.clone(),
            country: location.country.map(|c| c.as_str().to_string()),
        };
        match upstream::dial(
            backend,
            request,
            &client,
            router.ws_config(),
            config.steering.dial_timeout,
        )
        .await
        {
            Ok(upstream) => return Ok((upstream, slot, key_cookie)),
            Err(e) if e.try_next() => {
                tracing::warn!(backend = %backend.id, error = %e, "dial failed; trying the next backend");
                last_error = Some(e);
            }
            Err(DialError::Refused(response)) => {
                return Err(Refusal {
                    result: "upstream_refused",
                    response: refusal_response(&response),
                });
            }
            Err(e) => last_error = Some(e),
        }
    }
    let timed_out = matches!(last_error, Some(DialError::Timeout));
    Err(Refusal {
        result: if timed_out {
            "upstream_timeout"
        } else {
            "upstream_failed"
        },
        response: if timed_out {
            plain_response(504, "Gateway Timeout", &[], "no backend answered in time\n")
        } else if last_error.is_none() {
            plain_response(
                503,
                "Service Unavailable",
                &[("Retry-After", "5")],
                "every backend is full\n",
            )
        } else {
            plain_response(
                502,
                "Bad Gateway",
                &[],
                "no backend accepted the connection\n",
            )
        },
    })
}

/// The backend's refusal, re-issued to the client with its status, the
/// headers in [`REFUSAL_HEADERS`] and its (bounded) body.
fn refusal_response(response: &upstream::RefusedResponse) -> Vec<u8> {
    let status = response.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Refused")
    )
    .into_bytes();
    for (name, value) in response.headers() {
        if REFUSAL_HEADERS.contains(&name.as_str()) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    let body = response.body().as_deref().unwrap_or_default();
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

/// Send the 101 with what the backend chose, and wrap the client socket.
async fn answer_upgrade(
    router: &Router,
    mut stream: TcpStream,
    request: &UpgradeRequest,
    upstream: &Upstream,
    key_cookie: Option<String>,
) -> Option<WebSocketStream<TcpStream>> {
    let key = request.header("sec-websocket-key")?.trim();
    let mut head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    )
    .into_bytes();
    for name in ["sec-websocket-protocol", "set-cookie"] {
        for value in upstream.response.headers().get_all(name) {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
    }
    if let Some(cookie) = key_cookie {
        head.extend_from_slice(format!("set-cookie: {cookie}\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await.ok()?;
    Some(
        WebSocketStream::from_partially_read(
            stream,
            request.leftover.clone(),
            Role::Server,
            Some(router.ws_config()),
        )
        .await,
    )
}

async fn run_relay(
    router: &Router,
    mut client: WebSocketStream<TcpStream>,
    mut upstream: WebSocketStream<TcpStream>,
) {
    let mut shutdown = router.shutdown.clone();
    let relay_config = &router.config.relay;
    let end = relay::relay(
        &mut client,
        &mut upstream,
        relay_config,
        &router.counters,
        &mut shutdown,
    )
    .await;
    metrics::counter!(m::CLOSES_TOTAL, "reason" => end.reason()).increment(1);
    // Backend-caused ends: the client has not been told yet.
    let to_client = match &end {
        RelayEnd::BackendClosed(frame) => Some(Message::Close(frame.clone())),
        RelayEnd::BackendLost => Some(relay::close_frame(1011, "backend connection lost")),
        _ => None,
    };
    if let Some(close) = to_client {
        let (mut tx, mut rx) = (&mut client).split();
        relay::finish_close(&mut tx, &mut rx, close, relay_config.close_timeout).await;
    }
    match end {
        RelayEnd::BackendLost => tracing::warn!("backend connection lost"),
        end => tracing::debug!(?end, "session ended"),
    }
}
