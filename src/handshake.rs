//! The client side of the HTTP/1.1 upgrade: read the request under a size
//! bound, check it is a WebSocket upgrade on a configured path, and work out
//! the client's address and session key.
//!
//! Everything here is about what the client sent; nothing it sends chooses a
//! destination (the request target must be origin-form, and the Host header
//! is only forwarded). Each refusal is a [`HandshakeError`] that maps to one
//! HTTP status and one bounded metric reason. Reading under the deadline and
//! writing answers belong to the session module.

use std::net::IpAddr;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::{SessionKeySource, SocketIoConfig};

/// Most headers a request may carry.
const MAX_HEADERS: usize = 64;
/// Longest session key accepted from a client.
pub const MAX_SESSION_KEY_LEN: usize = 128;

/// A parsed WebSocket upgrade request.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// Path and query exactly as the client sent them (origin-form).
    pub target: String,
    /// Every header, names lower-cased, values as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes the client sent after the request head (the first frames).
    pub leftover: Vec<u8>,
}

/// Why a request does not upgrade; each maps to one status and reason label.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head larger than the limit")]
    HeadTooLarge,
    #[error("no WebSocket endpoint at this path")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("this path needs a WebSocket upgrade")]
    UpgradeRequired,
    #[error("unsupported WebSocket version")]
    UnsupportedVersion,
    #[error("the client closed the connection before finishing its request")]
    ClientGone,
    #[error("the client did not finish its request in time")]
    Timeout,
}

impl HandshakeError {
    /// The HTTP status answered, or `None` when no answer is possible.
    pub fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            HandshakeError::Malformed(_) => Some((400, "Bad Request")),
            HandshakeError::HeadTooLarge => Some((431, "Request Header Fields Too Large")),
            HandshakeError::NotFound => Some((404, "Not Found")),
            HandshakeError::MethodNotAllowed => Some((405, "Method Not Allowed")),
            HandshakeError::UpgradeRequired | HandshakeError::UnsupportedVersion => {
                Some((426, "Upgrade Required"))
            }
            HandshakeError::Timeout => Some((408, "Request Timeout")),
            HandshakeError::ClientGone => None,
        }
    }

    /// Extra response headers the status calls for.
    pub fn extra_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            HandshakeError::UpgradeRequired => &[("Upgrade", "websocket")],
            HandshakeError::UnsupportedVersion => {
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
            }
            HandshakeError::MethodNotAllowed => &[("Allow", "GET")],
            _ => &[],
        }
    }

    /// `wsrouter_rejected_connections_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Malformed(_) => "bad_request",
            HandshakeError::HeadTooLarge => "header_too_large",
            HandshakeError::NotFound => "not_found",
            HandshakeError::MethodNotAllowed => "method_not_allowed",
            HandshakeError::UpgradeRequired | HandshakeError::UnsupportedVersion => {
                "upgrade_required"
            }
            HandshakeError::ClientGone => "client_gone",
            HandshakeError::Timeout => "handshake_timeout",
        }
    }
}

/// Read one request head from `stream`, at most `max_bytes` of it.
pub async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_bytes: usize,
) -> Result<(httparse_owned::Head, Vec<u8>), HandshakeError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HandshakeError::ClientGone)?;
        if n == 0 {
            return Err(HandshakeError::ClientGone);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((head, len)) = httparse_owned::parse(&buf)? {
            if len > max_bytes {
                return Err(HandshakeError::HeadTooLarge);
            }
            let leftover = buf.split_off(len);
            return Ok((head, leftover));
        }
        if buf.len() > max_bytes {
            return Err(HandshakeError::HeadTooLarge);
        }
    }
}

/// Owned results of `httparse`, so the buffer can be reused.
pub mod httparse_owned {
    use super::{HandshakeError, MAX_HEADERS};

    #[derive(Debug, Clone)]
    pub struct Head {
        pub method: String,
        pub target: String,
        /// 0 for HTTP/1.0, 1 for HTTP/1.1.
        pub version: u8,
        pub headers: Vec<(String, Vec<u8>)>,
    }

    /// `Ok(None)` while the head is incomplete.
    pub fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Partial) => Ok(None),
            Ok(httparse::Status::Complete(len)) => {
                let head = Head {
                    method: req.method.unwrap_or_default().to_string(),
                    target: req.path.unwrap_or_default().to_string(),
                    version: req.version.unwrap_or(1),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                        .collect(),
                };
                Ok(Some((head, len)))
            }
            Err(httparse::Error::TooManyHeaders) => Err(HandshakeError::HeadTooLarge),
            Err(e) => Err(HandshakeError::Malformed(e.to_string())),
        }
    }
}

/// What a request on the public listener asks for.
#[derive(Debug)]
pub enum Request {
    /// A WebSocket upgrade, on a WebSocket path or a Socket.IO path.
    Upgrade(UpgradeRequest),
    /// An HTTP request on a Socket.IO path (engine.io long-polling, or a
    /// CORS preflight): proxied as HTTP. `leftover` holds the start of
    /// its body.
    Http {
        method: String,
        request: UpgradeRequest,
    },
}

/// Sort a parsed head: an upgrade on one of `paths` or under one of the
/// `socketio` prefixes, or an HTTP request under a `socketio` prefix.
pub fn classify(
    head: httparse_owned::Head,
    leftover: Vec<u8>,
    paths: &[String],
    socketio: &SocketIoConfig,
) -> Result<Request, HandshakeError> {
    let path = head
        .target
        .split(['?', '#'])
        .next()
        .unwrap_or("/")
        .to_string();
    if !head.target.starts_with('/') || !socketio.matches(&path) {
        return validate(head, leftover, paths).map(Request::Upgrade);
    }
    let wants_upgrade = head
        .headers
        .iter()
        .any(|(name, value)| name == "upgrade" && value.eq_ignore_ascii_case(b"websocket"));
    if wants_upgrade {
        return validate(head, leftover, std::slice::from_ref(&path)).map(Request::Upgrade);
    }
    if head.version != 1 {
        return Err(HandshakeError::Malformed("Socket.IO needs HTTP/1.1".into()));
    }
    if !matches!(head.method.as_str(), "GET" | "POST" | "OPTIONS") {
        return Err(HandshakeError::MethodNotAllowed);
    }
    let request = UpgradeRequest {
        target: head.target,
        headers: head.headers,
        leftover,
    };
    if request.header("host").is_none() {
        return Err(HandshakeError::Malformed("missing Host header".into()));
    }
    Ok(Request::Http {
        method: head.method,
        request,
    })
}

/// Check that a parsed head is a WebSocket upgrade on one of `paths`.
/// Order matters: an unknown path is 404 whatever else is wrong with it.
pub fn validate(
    head: httparse_owned::Head,
    leftover: Vec<u8>,
    paths: &[String],
) -> Result<UpgradeRequest, HandshakeError> {
    if !head.target.starts_with('/') {
        // Absolute-form ("http://other/...") or authority-form targets would
        // let a client name a destination: refused outright.
        return Err(HandshakeError::Malformed(
            "the request target must be a path (origin-form)".into(),
        ));
    }
    let path = head.target.split(['?', '#']).next().unwrap_or("/");
    if !paths.iter().any(|p| p == path) {
        return Err(HandshakeError::NotFound);
    }
    if head.version != 1 {
        return Err(HandshakeError::Malformed("WebSocket needs HTTP/1.1".into()));
    }
    if head.method != "GET" {
        return Err(HandshakeError::MethodNotAllowed);
    }
    let request = UpgradeRequest {
        target: head.target,
        headers: head.headers,
        leftover,
    };
    let has_token = |name: &str, token: &str| {
        request
            .header_values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(HandshakeError::UpgradeRequired);
    }
    if request.header("host").is_none() {
        return Err(HandshakeError::Malformed("missing Host header".into()));
    }
    if request.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    match request.header("sec-websocket-key").map(str::trim) {
        Some(key) if is_websocket_key(key) => {}
        _ => {
            return Err(HandshakeError::Malformed(
                "missing or invalid Sec-WebSocket-Key".into(),
            ));
        }
    }
    Ok(request)
}

/// A Sec-WebSocket-Key is the base64 of 16 bytes: 22 characters and "==".
fn is_websocket_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

impl UpgradeRequest {
    /// The first value of a header (name lower case), if it is text.
    pub fn header<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.header_values(name).next()
    }

    /// Every value of a header (name lower case) that is text.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The query string, without the '?'.
    pub fn query(&self) -> Option<&str> {
        self.target
            .split_once('?')
            .map(|(_, q)| q.split('#').next().unwrap_or(""))
    }

    /// The first value of query parameter `name`, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k).as_deref() == Some(name))
                .then(|| percent_decode(v))
                .flatten()
        })
    }

    /// The session key the client presented, from the configured source.
    /// `Ok(None)` when absent; an error when present but unusable.
    pub fn session_key(&self, source: &SessionKeySource) -> Result<Option<String>, HandshakeError> {
        let raw: Option<String> = match source {
            SessionKeySource::Query(name) => self.query_param(name),
            SessionKeySource::Header(name) => self.header(name).map(|v| v.trim().to_string()),
            SessionKeySource::Cookie(name) => self.header_values("cookie").find_map(|line| {
                line.split(';').find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == name).then(|| v.trim_matches('"').to_string())
                })
            }),
        };
        match raw {
            None => Ok(None),
            Some(k) if k.is_empty() => Ok(None),
            Some(k)
                if k.len() > MAX_SESSION_KEY_LEN || !k.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Err(HandshakeError::Malformed(format!(
                    "the session key must be 1 to {MAX_SESSION_KEY_LEN} visible ASCII characters"
                )))
            }
            Some(k) => Ok(Some(k)),
        }
    }
}

/// Decode `%XX` escapes and `+` in a query component; `None` if the result
/// is not UTF-8 or an escape is broken.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The client's address: the peer, or, when the peer is a trusted proxy,
/// the right-most address in X-Forwarded-For (or, when that is absent, in
/// Forwarded `for=`) that is not itself a trusted proxy. Entries left of
/// that are whatever the client wrote and are never believed. An entry that
/// is not an address stops the walk at the last trusted hop.
pub fn client_ip(peer: IpAddr, request: &UpgradeRequest, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| is_trusted_proxy(*ip, trusted);
    let peer = peer.to_canonical();
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = if request.header("x-forwarded-for").is_some() {
        request
            .header_values("x-forwarded-for")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect()
    } else {
        request
            .header_values("forwarded")
            .flat_map(|v| v.split(','))
            .filter_map(forwarded_for)
            .collect()
    };
    let mut current = peer;
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(ip) => {
                current = ip;
                if !is_trusted(&ip) {
                    return ip;
                }
            }
            None => return current,
        }
    }
    current
}

/// Whether `ip` is one of the configured trusted proxies.
pub fn is_trusted_proxy(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// The `for=` value of one Forwarded element, quotes removed.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("for")
            .then(|| v.trim().trim_matches('"'))
    })
}

/// An address from a forwarding header: `1.2.3.4`, `1.2.3.4:5678`, `::1`,
/// `[::1]` or `[::1]:5678`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest
            .split(']')
            .next()?
            .parse::<IpAddr>()
            .ok()
            .map(|ip| ip.to_canonical());
    }
    let (host, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A fresh random session key for a client that did not bring one.
pub fn generate_session_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Result<UpgradeRequest, HandshakeError> {
        let (head, len) = httparse_owned::parse(raw.as_bytes())?.expect("complete");
        validate(head, raw.as_bytes()[len..].to_vec(), &["/chat".to_string()])
    }

    const UPGRADE: &str = "Host: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    fn with(extra: &str, target: &str) -> UpgradeRequest {
        request(&format!("GET {target} HTTP/1.1\r\n{UPGRADE}{extra}\r\n")).unwrap()
    }

    #[test]
    fn statuses_for_bad_requests() {
        assert_eq!(
            request("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err(),
            HandshakeError::NotFound
        );
        assert_eq!(
            request("GET /chat HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err(),
            HandshakeError::UpgradeRequired
        );
        assert_eq!(
            request(&format!("POST /chat HTTP/1.1\r\n{UPGRADE}\r\n")).unwrap_err(),
            HandshakeError::MethodNotAllowed
        );
        assert!(matches!(
            request(&format!(
                "GET http://evil:80/chat HTTP/1.1\r\n{UPGRADE}\r\n"
            )),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(matches!(
            httparse_owned::parse(b"GARBAGE\x01\r\n\r\n"),
            Err(HandshakeError::Malformed(_))
        ));
        let v8 = UPGRADE.replace("Version: 13", "Version: 8");
        assert_eq!(
            request(&format!("GET /chat HTTP/1.1\r\n{v8}\r\n")).unwrap_err(),
            HandshakeError::UnsupportedVersion
        );
        let badkey = UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
        assert!(matches!(
            request(&format!("GET /chat HTTP/1.1\r\n{badkey}\r\n")),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(request(&format!("GET /chat?x=1 HTTP/1.1\r\n{UPGRADE}\r\n")).is_ok());
    }

    #[test]
    fn session_key_sources() {
        let r = with(
            "X-Session: hdr\r\nCookie: a=1; sid=cookie-key\r\n",
            "/chat?room=a&session=q%2Dkey",
        );
        assert_eq!(
            r.session_key(&SessionKeySource::Query("session".into()))
                .unwrap()
                .as_deref(),
            Some("q-key")
        );
        assert_eq!(
            r.session_key(&SessionKeySource::Header("x-session".into()))
                .unwrap()
                .as_deref(),
            Some("hdr")
        );
        assert_eq!(
            r.session_key(&SessionKeySource::Cookie("sid".into()))
                .unwrap()
                .as_deref(),
            Some("cookie-key")
        );
        assert_eq!(
            r.session_key(&SessionKeySource::Cookie("none".into()))
                .unwrap(),
            None
        );
        let long = with("", &format!("/chat?session={}", "a".repeat(200)));
        assert!(
            long.session_key(&SessionKeySource::Query("session".into()))
                .is_err()
        );
    }

    #[test]
    fn client_address_walks_trusted_hops_from_the_right() {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let r = with(
            "X-Forwarded-For: 6.6.6.6, 81.2.69.142, 10.0.0.5\r\n",
            "/chat",
        );
        assert_eq!(
            client_ip(lo, &r, &trusted),
            "81.2.69.142".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer's header is ignored.
        let outside: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(outside, &r, &trusted), outside);
        // Forwarded, with quotes, brackets and ports.
        let r = with(
            "Forwarded: for=6.6.6.6, for=\"[2001:218::1]:4711\";proto=https\r\n",
            "/chat",
        );
        assert_eq!(
            client_ip(lo, &r, &trusted),
            "2001:218::1".parse::<IpAddr>().unwrap()
        );
        // Garbage stops the walk at the last trusted hop.
        let r = with(
            "X-Forwarded-For: 81.2.69.142, garbage, 10.0.0.5\r\n",
            "/chat",
        );
        assert_eq!(
            client_ip(lo, &r, &trusted),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
        let r = with("X-Forwarded-For: 1.2.3.4:80\r\n", "/chat");
        assert_eq!(
            client_ip(lo, &r, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
    }
}
