//! Dialing a backend's WebSocket: the forwarded request, the X-Wsrouter-*
//! headers, the dial timeout, and what a failure means.
//!
//! The router dials before it answers the client, so the backend's answer
//! (its subprotocol, its cookies, or its refusal) can be handed back. Only
//! configured backends are ever dialed: the destination comes from the
//! backend's URL, and the client contributes nothing but the path and query
//! that are appended to it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response, generate_key};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::backend::Backend;
use crate::handshake::UpgradeRequest;
use crate::metrics as m;
use crate::tls::{BackendStream, connect_backend};

/// A backend's non-101 answer, with its body.
pub type RefusedResponse = Response;

/// Client request headers passed on to the backend as they are.
const FORWARDED_HEADERS: &[&str] = &[
    "origin",
    "cookie",
    "authorization",
    "user-agent",
    "sec-websocket-protocol",
    "accept-language",
];

/// Most bytes of a refusal body handed back to the client.
const MAX_REFUSAL_BODY: usize = 4096;

/// Who the client is, as the backend is told.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub ip: IpAddr,
    /// "ws" or "wss", for X-Forwarded-Proto ("http"/"https").
    pub tls: bool,
    pub session_key: String,
    pub region: String,
    pub country: Option<String>,
    /// The backend this session left (only when migrating).
    pub migrated_from: Option<String>,
    /// How many of the first messages are replays (only when migrating).
    pub replayed: Option<usize>,
}

/// A dial that did not produce a WebSocket.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect or, for `wss://`, the TLS handshake (certificate
    /// included) failed.
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("dial timed out")]
    Timeout,
    /// The backend answered the upgrade with an HTTP status. 4xx answers are
    /// the application's verdict and go back to the client.
    #[error("backend refused the upgrade with status {}", .0.status())]
    Refused(Box<RefusedResponse>),
    #[error("WebSocket handshake failed: {0}")]
    Handshake(WsError),
}

impl DialError {
    /// A failure of this machine, not of the backend: out of file
    /// descriptors, memory, buffers or local ports. It must not count
    /// against the backend's passive health.
    pub fn is_local(&self) -> bool {
        let io = match self {
            DialError::Connect(e) => Some(e),
            DialError::Handshake(WsError::Io(e)) => Some(e),
            _ => None,
        };
        // ENOMEM, ENFILE, EMFILE, EADDRNOTAVAIL, ENOBUFS
        io.and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| matches!(code, 12 | 23 | 24 | 99 | 105))
    }

    /// Whether the next candidate should be tried: yes for anything that
    /// says the backend is broken or busy, no for a client-level refusal.
    pub fn try_next(&self) -> bool {
        match self {
            DialError::Refused(r) => r.status().is_server_error(),
            _ => true,
        }
    }
}

/// A connected backend and its handshake answer.
pub struct Upstream {
    pub ws: WebSocketStream<BackendStream>,
    pub response: Response,
}

/// Dial `backend` for `request`, within `timeout`. `tls` is the client for
/// `wss://` backends (`Config::upstream_tls`).
pub async fn dial(
    backend: &Backend,
    request: &UpgradeRequest,
    client: &ClientInfo,
    ws_config: WebSocketConfig,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Upstream, DialError> {
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, async {
        let http_request = build_request(backend, request, client);
        let stream = connect_backend(&backend.url, tls)
            .await
            .map_err(DialError::Connect)?;
        tokio_tungstenite::client_async_with_config(http_request, stream, Some(ws_config))
            .await
            .map(|(ws, response)| Upstream { ws, response })
            .map_err(|e| match e {
                WsError::Http(mut response) => {
                    if let Some(body) = response.body_mut() {
                        body.truncate(MAX_REFUSAL_BODY);
                    }
                    DialError::Refused(response)
                }
                other => DialError::Handshake(other),
            })
    })
    .await
    .unwrap_or(Err(DialError::Timeout));
    if result.is_ok() {
        metrics::histogram!(m::UPSTREAM_CONNECT_SECONDS, "backend" => backend.id.clone())
            .record(started.elapsed().as_secs_f64());
    }
    result
}

fn build_request(backend: &Backend, request: &UpgradeRequest, client: &ClientInfo) -> Request {
    let uri = format!(
        "{}://{}{}{}",
        if backend.url.tls { "wss" } else { "ws" },
        backend.url.authority(),
        backend.url.prefix,
        request.target
    );
    let mut builder = Request::builder()
        .method("GET")
        .uri(uri)
        .header("Host", backend.url.authority())
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", generate_key());
    for (name, value) in &request.headers {
        if FORWARDED_HEADERS.contains(&name.as_str()) {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                if value.to_str().is_ok() {
                    builder = builder.header(name.as_str(), value);
                }
            }
        }
    }
    // X-Forwarded-For and X-Real-IP carry the one client address we settled
    // on (see handshake::client_ip), never the chain as received, so a
    // backend cannot be fooled by entries a client wrote itself.
    let client_ip = client.ip.to_string();
    builder = builder
        .header("X-Forwarded-For", &client_ip)
        .header("X-Real-IP", &client_ip)
        .header(
            "X-Forwarded-Proto",
            if client.tls { "https" } else { "http" },
        )
        .header("X-Wsrouter-Session", client.session_key.as_str())
        .header("X-Wsrouter-Region", client.region.as_str());
    if let Some(country) = &client.country {
        builder = builder.header("X-Wsrouter-Client-Country", country.as_str());
    }
    if let Some(from) = &client.migrated_from {
        builder = builder.header("X-Wsrouter-Migrated-From", from.as_str());
    }
    if let Some(replayed) = client.replayed {
        builder = builder.header("X-Wsrouter-Replayed", replayed.to_string());
    }
    builder
        .body(())
        .expect("header values were checked or built from valid parts")
}
