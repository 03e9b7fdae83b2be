//! Dialing a backend's WebSocket: the forwarded request, the X-Wsrouter-*
//! headers, the dial timeout, and what a failure means.
//!
//! The router dials before it answers the client, so the backend's answer
//! (its subprotocol, its cookies, or its refusal) can be handed back. The
//! HTTP/1.1 upgrade is written and read here (httparse), so that bytes the
//! backend sends right after its 101 stay with the session's frame reader. Only
//! configured backends are ever dialed: the destination comes from the
//! backend's URL, and the client contributes nothing but the path and query
//! that are appended to it.

pub(crate) mod dialer;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::backend::Backend;
use crate::handshake::UpgradeRequest;
use crate::metrics as m;
use crate::tls::{BackendStream, connect_backend};
use crate::wire::peer::Peer;

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

/// Most bytes of a backend's response head.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Most headers in a backend's response.
const MAX_RESPONSE_HEADERS: usize = 64;

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

/// A backend's HTTP answer: its status line and headers (names in lower
/// case), and for a refusal its body (at most `MAX_REFUSAL_BODY` bytes).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// Every value of header `name` (lower case).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn header_str<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.header_values(name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    pub fn is_server_error(&self) -> bool {
        (500..600).contains(&self.status)
    }
}

/// A dial that did not produce a WebSocket.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect or, for `wss://`, the TLS handshake (certificate
    /// included) failed.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("dial timed out")]
    Timeout,
    /// `steering.max_concurrent_dials` dials to the backend were already in
    /// flight for the whole dial timeout: the router's queue, not the
    /// backend's fault.
    #[error("too many dials in flight to this backend")]
    Busy,
    /// The backend answered the upgrade with an HTTP status. 4xx answers are
    /// the application's verdict and go back to the client.
    #[error("backend refused the upgrade with status {}", .0.status)]
    Refused(Box<Response>),
    /// The connection failed while the upgrade was exchanged.
    #[error("connection failed during the upgrade: {0}")]
    Io(io::Error),
    /// The backend's 101 broke the WebSocket handshake rules.
    #[error("invalid upgrade answer: {0}")]
    BadHandshake(&'static str),
}

impl DialError {
    /// A failure of this machine, not of the backend: out of file
    /// descriptors, memory, buffers or local ports. It must not count
    /// against the backend's passive health.
    pub fn is_local(&self) -> bool {
        let io = match self {
            DialError::Connect(e) | DialError::Io(e) => Some(e),
            _ => None,
        };
        // ENOMEM, ENFILE, EMFILE, EADDRNOTAVAIL, ENOBUFS
        matches!(self, DialError::Busy)
            || io
                .and_then(io::Error::raw_os_error)
                .is_some_and(|code| matches!(code, 12 | 23 | 24 | 99 | 105))
    }

    /// Whether the next candidate should be tried: yes for anything that
    /// says the backend is broken or busy, no for a client-level refusal.
    pub fn try_next(&self) -> bool {
        match self {
            DialError::Refused(r) => r.is_server_error(),
            _ => true,
        }
    }
}

/// A connected backend: the socket at the frame level, and what its 101
/// chose.
/// The 101 response header by which a backend opts in to acknowledging
/// client messages (README, "Exactly once for backends that acknowledge").
pub const ACK_HEADER: &str = "x-wsrouter-ack";

pub struct Upstream {
    pub peer: Peer<BackendStream>,
    /// The subprotocol the backend chose.
    pub subprotocol: Option<String>,
    /// Set-Cookie values of the 101, handed to the client with its own 101.
    pub set_cookies: Vec<Vec<u8>>,
    /// The backend acknowledges the client messages it has finished with
    /// (its 101 said `X-Wsrouter-Ack: pong`; never passed to the client).
    pub acknowledges: bool,
}

/// Dial `backend` for `request`, within `timeout`, waiting first (within the
/// same timeout) for one of the backend's dial permits. `tls` is the client
/// for `wss://` backends (`Config::upstream_tls`). Messages from the backend
/// larger than `max_message` break the protocol.
pub async fn dial(
    backend: &Backend,
    request: &UpgradeRequest,
    client: &ClientInfo,
    max_message: usize,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Upstream, DialError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, backend.dials.acquire()).await else {
        return Err(DialError::Busy);
    };
    let started = tokio::time::Instant::now();
    let result = tokio::time::timeout_at(deadline, async {
        let key = generate_key();
        let head = build_request(backend, request, client, &key);
        let mut stream = connect_backend(&backend.url, tls)
            .await
            .map_err(DialError::Connect)?;
        stream.write_all(&head).await.map_err(DialError::Io)?;
        stream.flush().await.map_err(DialError::Io)?;
        let (mut response, leftover) = read_response(&mut stream).await?;
        if response.status != 101 {
            response.body = read_body(&mut stream, &response, leftover).await;
            return Err(DialError::Refused(Box::new(response)));
        }
        let subprotocol = check_upgrade(&response, &key, request)?;
        let set_cookies = response
            .header_values("set-cookie")
            .map(<[u8]>::to_vec)
            .collect();
        let acknowledges = response
            .header_values(ACK_HEADER)
            .any(|value| value.trim_ascii().eq_ignore_ascii_case(b"pong"));
        Ok(Upstream {
            peer: Peer::backend(stream, max_message, leftover),
            subprotocol,
            set_cookies,
            acknowledges,
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

/// Drop every request header a backend is never sent, and shrink what is
/// left: a session keeps its request for re-dials, for its whole life.
pub fn keep_forwarded_headers(request: &mut UpgradeRequest) {
    request
        .headers
        .retain(|(name, _)| FORWARDED_HEADERS.contains(&name.as_str()));
    request.headers.shrink_to_fit();
    request.target.shrink_to_fit();
}

/// A header value that can be written as it is: visible ASCII, spaces and
/// tabs (never CR or LF).
fn is_plain_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// The upgrade request for the backend.
fn build_request(
    backend: &Backend,
    request: &UpgradeRequest,
    client: &ClientInfo,
    key: &str,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let mut header = |name: &str, value: &[u8]| {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    };
    let authority = backend.url.authority();
    header("Host", authority.as_bytes());
    header("Connection", b"Upgrade");
    header("Upgrade", b"websocket");
    header("Sec-WebSocket-Version", b"13");
    header("Sec-WebSocket-Key", key.as_bytes());
    for (name, value) in &request.headers {
        if FORWARDED_HEADERS.contains(&name.as_str()) && is_plain_value(value) {
            header(name, value);
        }
    }
    // X-Forwarded-For and X-Real-IP carry the one client address we settled
    // on (see handshake::client_ip), never the chain as received, so a
    // backend cannot be fooled by entries a client wrote itself.
    let client_ip = client.ip.to_string();
    header("X-Forwarded-For", client_ip.as_bytes());
    header("X-Real-IP", client_ip.as_bytes());
    header(
        "X-Forwarded-Proto",
        if client.tls { b"https" } else { b"http" },
    );
    header("X-Wsrouter-Session", client.session_key.as_bytes());
    header("X-Wsrouter-Region", client.region.as_bytes());
    if let Some(country) = &client.country {
        header("X-Wsrouter-Client-Country", country.as_bytes());
    }
    if let Some(from) = &client.migrated_from {
        header("X-Wsrouter-Migrated-From", from.as_bytes());
    }
    if let Some(replayed) = client.replayed {
        header("X-Wsrouter-Replayed", replayed.to_string().as_bytes());
    }
    let mut out = format!("GET {}{} HTTP/1.1\r\n", backend.url.prefix, request.target).into_bytes();
    out.extend_from_slice(&head);
    out.extend_from_slice(b"\r\n");
    out
}

/// Read the backend's response head; returns it and the bytes after it.
async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Response, Vec<u8>), DialError> {
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await.map_err(DialError::Io)?;
        if n == 0 {
            return Err(DialError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let response = Response {
                    status: parsed.code.unwrap_or(0),
                    reason: parsed.reason.unwrap_or("").to_string(),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                        .collect(),
                    body: Vec::new(),
                };
                return Ok((response, buf.split_off(len)));
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(DialError::BadHandshake("response head too large"));
            }
            Err(_) => return Err(DialError::BadHandshake("malformed HTTP response")),
        }
    }
}

/// A refusal's body, as far as Content-Length says (bounded); without one,
/// what came with the head.
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    response: &Response,
    mut body: Vec<u8>,
) -> Vec<u8> {
    let length = response
        .header_str("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    let Some(length) = length else {
        body.truncate(MAX_REFUSAL_BODY);
        return body;
    };
    let want = length.min(MAX_REFUSAL_BODY);
    while body.len() < want {
        let mut chunk = [0u8; 2048];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(want);
    body
}

/// Check a 101 against RFC 6455 (4.1): the upgrade headers, the accept key,
/// a subprotocol the client offered, and no extension. Returns the
/// subprotocol.
fn check_upgrade(
    response: &Response,
    key: &str,
    request: &UpgradeRequest,
) -> Result<Option<String>, DialError> {
    let has_token = |name: &str, token: &str| {
        response.header_values(name).any(|v| {
            std::str::from_utf8(v)
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token("upgrade", "websocket") {
        return Err(DialError::BadHandshake("no Upgrade: websocket"));
    }
    if !has_token("connection", "upgrade") {
        return Err(DialError::BadHandshake("no Connection: upgrade"));
    }
    if response.header_str("sec-websocket-accept")
        != Some(derive_accept_key(key.as_bytes()).as_str())
    {
        return Err(DialError::BadHandshake("wrong Sec-WebSocket-Accept"));
    }
    if response
        .header_values("sec-websocket-extensions")
        .next()
        .is_some()
    {
        return Err(DialError::BadHandshake("an extension nobody asked for"));
    }
    let Some(chosen) = response.header_str("sec-websocket-protocol") else {
        return Ok(None);
    };
    let offered = request
        .headers
        .iter()
        .filter(|(name, _)| name == "sec-websocket-protocol")
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == chosen);
    if !offered {
        return Err(DialError::BadHandshake(
            "a subprotocol the client did not offer",
        ));
    }
    Ok(Some(chosen.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(protocols: Option<&str>) -> UpgradeRequest {
        UpgradeRequest {
            target: "/chat".into(),
            headers: protocols
                .map(|p| vec![("sec-websocket-protocol".to_string(), p.as_bytes().to_vec())])
                .unwrap_or_default(),
            leftover: Vec::new(),
        }
    }

    fn answer(extra: &[(&str, &str)]) -> Response {
        let mut headers = vec![
            ("upgrade".to_string(), b"websocket".to_vec()),
            ("connection".to_string(), b"Upgrade".to_vec()),
            (
                "sec-websocket-accept".to_string(),
                derive_accept_key(KEY.as_bytes()).into_bytes(),
            ),
        ];
        for (name, value) in extra {
            headers.retain(|(n, _)| n != name);
            headers.push((name.to_string(), value.as_bytes().to_vec()));
        }
        Response {
            status: 101,
            reason: "Switching Protocols".into(),
            headers,
            body: Vec::new(),
        }
    }

    #[test]
    fn a_good_101_passes_with_the_subprotocol_the_client_offered() {
        assert_eq!(
            check_upgrade(&answer(&[]), KEY, &request(None)).unwrap(),
            None
        );
        let chosen = answer(&[("sec-websocket-protocol", "chat.v2")]);
        assert_eq!(
            check_upgrade(&chosen, KEY, &request(Some("chat.v1, chat.v2"))).unwrap(),
            Some("chat.v2".to_string())
        );
    }

    #[test]
    fn a_101_that_breaks_the_handshake_rules_is_refused() {
        let cases = [
            (answer(&[("upgrade", "h2c")]), request(None)),
            (answer(&[("connection", "keep-alive")]), request(None)),
            (answer(&[("sec-websocket-accept", "AAAA")]), request(None)),
            (
                answer(&[("sec-websocket-extensions", "permessage-deflate")]),
                request(None),
            ),
            (
                answer(&[("sec-websocket-protocol", "other")]),
                request(Some("chat.v1")),
            ),
            (
                answer(&[("sec-websocket-protocol", "chat.v1")]),
                request(None),
            ),
        ];
        for (response, request) in cases {
            assert!(
                matches!(
                    check_upgrade(&response, KEY, &request),
                    Err(DialError::BadHandshake(_))
                ),
                "{response:?}"
            );
        }
    }

    #[test]
    fn the_request_forwards_only_plain_values_of_listed_headers() {
        let mut request = request(None);
        request.headers = vec![
            ("origin".into(), b"https://example.com".to_vec()),
            ("x-evil".into(), b"1".to_vec()),
            ("cookie".into(), b"a=1\r\nX-Injected: 1".to_vec()),
        ];
        keep_forwarded_headers(&mut request);
        assert_eq!(request.headers.len(), 2);
        assert!(request.headers.iter().all(|(n, _)| n != "x-evil"));
        assert!(!is_plain_value(b"a=1\r\nX-Injected: 1"));
        assert!(is_plain_value(b"a=1; b=\t2"));
    }
}
