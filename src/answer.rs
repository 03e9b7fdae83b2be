//! Every HTTP answer a client gets on the public listener: the 101 that
//! opens a session, and [`Answer`], each way an upgrade can end without
//! one (a bad request, an edge limit, no backend, a backend's refusal),
//! with its status, headers, body and its `wsrouter_upgrades_total`
//! result. The sites that decide an outcome build an `Answer`; nothing
//! else writes HTTP to a client.

use std::borrow::Cow;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::handshake::HandshakeError;
use crate::limits::Refused;
use crate::metrics::{self as m, UpgradeResult};
use crate::upstream::Response;
use crate::upstream::dialer::DialFailure;

/// Response headers of a backend's refusal that are handed to the client.
const REFUSAL_HEADERS: &[&str] = &[
    "set-cookie",
    "www-authenticate",
    "retry-after",
    "content-type",
];

/// How an upgrade ended without a session, and what the client is sent.
#[derive(Debug)]
pub(crate) struct Answer {
    /// `wsrouter_upgrades_total{result}`.
    pub result: UpgradeResult,
    /// `None`: nothing is written (the client took too long to be worth
    /// an answer).
    pub status: Option<u16>,
    phrase: Cow<'static, str>,
    headers: Vec<(Cow<'static, str>, Vec<u8>)>,
    body: Vec<u8>,
}

impl Answer {
    /// A plain-text answer.
    fn plain(result: UpgradeResult, status: u16, phrase: &'static str, body: String) -> Answer {
        Answer {
            result,
            status: Some(status),
            phrase: Cow::Borrowed(phrase),
            headers: Vec::new(),
            body: body.into_bytes(),
        }
        .header("Content-Type", "text/plain; charset=utf-8")
    }

    fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Answer {
        self.headers.push((Cow::Borrowed(name), value.into()));
        self
    }

    /// A request that will not upgrade (counted by reason). A client that
    /// left gets no answer.
    pub fn bad_request(error: &HandshakeError) -> Answer {
        metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => error.reason()).increment(1);
        let result = if *error == HandshakeError::Timeout {
            UpgradeResult::Timeout
        } else {
            UpgradeResult::Rejected
        };
        let Some((status, phrase)) = error.status() else {
            return Answer {
                result,
                status: None,
                phrase: Cow::Borrowed(""),
                headers: Vec::new(),
                body: Vec::new(),
            };
        };
        let mut answer = Answer::plain(result, status, phrase, format!("{error}\n"));
        // The content type stays last, as clients have always seen it.
        let content_type = answer.headers.pop();
        for (name, value) in error.extra_headers() {
            answer = answer.header(name, *value);
        }
        answer.headers.extend(content_type);
        answer
    }

    /// An edge limit's answer (counted by reason).
    pub fn refused(refused: Refused) -> Answer {
        metrics::counter!(m::REJECTED_CONNECTIONS_TOTAL, "reason" => refused.reason()).increment(1);
        let (status, phrase) = refused.status();
        let answer = Answer::plain(
            UpgradeResult::Rejected,
            status,
            phrase,
            format!("{refused}\n"),
        );
        if status == 403 {
            answer
        } else {
            answer.retry_after("1")
        }
    }

    /// No backend took the session.
    pub fn dial_failed(failure: DialFailure) -> Answer {
        let unavailable = |result, body: &str| {
            Answer::plain(result, 503, "Service Unavailable", body.to_string())
        };
        match failure {
            DialFailure::NoBackend => {
                unavailable(UpgradeResult::NoBackend, "no backend available\n").retry_after("5")
            }
            DialFailure::Refused(response) => Answer::from_backend(&response),
            DialFailure::Timeout => Answer::plain(
                UpgradeResult::UpstreamTimeout,
                504,
                "Gateway Timeout",
                "no backend answered in time\n".to_string(),
            ),
            DialFailure::Busy => {
                unavailable(UpgradeResult::UpstreamBusy, "every backend is busy\n").retry_after("1")
            }
            DialFailure::Full => {
                unavailable(UpgradeResult::UpstreamFailed, "every backend is full\n")
                    .retry_after("5")
            }
            DialFailure::Failed => Answer::plain(
                UpgradeResult::UpstreamFailed,
                502,
                "Bad Gateway",
                "no backend accepted the connection\n".to_string(),
            ),
        }
    }

    /// `Retry-After`, ahead of the content type.
    fn retry_after(mut self, seconds: &'static str) -> Answer {
        let at = self.headers.len().saturating_sub(1);
        self.headers
            .insert(at, (Cow::Borrowed("Retry-After"), seconds.into()));
        self
    }

    /// A backend's 4xx to the first dial, re-issued with its status, the
    /// headers in [`REFUSAL_HEADERS`] and its (bounded) body.
    fn from_backend(response: &Response) -> Answer {
        // The reason phrase is informative only; ours is always printable.
        let phrase = if response.reason.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            Cow::Owned(response.reason.clone())
        } else {
            Cow::Borrowed("Refused")
        };
        let headers = response
            .headers
            .iter()
            .filter(|(name, _)| REFUSAL_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (Cow::Owned(name.clone()), value.clone()))
            .collect();
        Answer {
            result: UpgradeResult::UpstreamRefused,
            status: Some(response.status),
            phrase,
            headers,
            body: response.body.clone(),
        }
    }

    /// The response as written: `Connection: close`, always with a length.
    pub fn to_bytes(&self) -> Vec<u8> {
        let Some(status) = self.status else {
            return Vec::new();
        };
        let headers = self.headers.iter().map(|(n, v)| (n.as_ref(), v.as_slice()));
        http_response(status, &self.phrase, headers, &self.body, false)
    }

    /// Count the outcome as an upgrade's, write the answer (if any) and
    /// close our side.
    pub async fn send<S: AsyncWrite + Unpin>(self, stream: &mut S) {
        self.result.count();
        self.write_to(stream).await;
    }

    /// Write the answer (if any) and close our side, counting nothing.
    pub async fn write_to<S: AsyncWrite + Unpin>(self, stream: &mut S) {
        if self.status.is_some() {
            let _ = stream.write_all(&self.to_bytes()).await;
            let _ = stream.shutdown().await;
        }
    }

    /// An engine.io `sid` this router does not know, from a client without
    /// a session key: engine.io's own answer, so its client starts over.
    pub fn unknown_sid() -> Answer {
        Answer {
            result: UpgradeResult::Rejected,
            status: Some(400),
            phrase: Cow::Borrowed("Bad Request"),
            headers: vec![(Cow::Borrowed("Content-Type"), b"application/json".to_vec())],
            body: br#"{"code":1,"message":"Session ID unknown"}"#.to_vec(),
        }
    }

    /// A request body past `limit` bytes.
    pub fn too_large(limit: usize) -> Answer {
        let body = format!("the request body is larger than {limit} bytes\n");
        Answer::plain(UpgradeResult::Rejected, 413, "Content Too Large", body)
    }

    /// A request body without a length (chunked).
    pub fn length_required() -> Answer {
        let body = "a request body needs a Content-Length\n".to_string();
        Answer::plain(UpgradeResult::Rejected, 411, "Length Required", body)
    }
}

/// An HTTP/1.1 response as written: the status line, `headers`, the
/// body's `Content-Length`, `Connection` (`keep-alive` or `close`), the body.
pub(crate) fn http_response<'a>(
    status: u16,
    phrase: &str,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {phrase}\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let length = body.len();
    out.extend_from_slice(
        format!("Content-Length: {length}\r\nConnection: {connection}\r\n\r\n").as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// The 101 that opens a session: the accept key for the client's
/// `Sec-WebSocket-Key`, the subprotocol and cookies the backend chose, and
/// the router's own session cookie when it made the key.
pub(crate) fn switching_protocols(
    websocket_key: &str,
    subprotocol: Option<&str>,
    backend_cookies: &[Vec<u8>],
    key_cookie: Option<&str>,
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(websocket_key.as_bytes())
    )
    .into_bytes();
    let protocol = subprotocol.map(|p| ("sec-websocket-protocol", p.as_bytes()));
    let cookies = backend_cookies.iter().map(|v| ("set-cookie", &v[..]));
    let own_cookie = key_cookie.map(|c| ("set-cookie", c.as_bytes()));
    for (name, value) in protocol.into_iter().chain(cookies).chain(own_cookie) {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(answer: &Answer) -> String {
        String::from_utf8(answer.to_bytes()).expect("ascii")
    }

    #[test]
    fn an_edge_limit_says_when_to_retry_except_for_origin() {
        let busy = text(&Answer::refused(Refused::RateLimited));
        assert!(busy.starts_with("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: text/plain; charset=utf-8\r\n"), "{busy}");
        let body = "too many new connections from this address\n";
        assert!(
            busy.ends_with(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )),
            "{busy}"
        );
        let origin = text(&Answer::refused(Refused::Origin));
        assert!(
            origin.starts_with("HTTP/1.1 403 Forbidden\r\nContent-Type"),
            "{origin}"
        );
    }

    #[test]
    fn dial_failures_map_to_gateway_statuses() {
        let cases = [
            (DialFailure::NoBackend, 503, UpgradeResult::NoBackend),
            (DialFailure::Timeout, 504, UpgradeResult::UpstreamTimeout),
            (DialFailure::Busy, 503, UpgradeResult::UpstreamBusy),
            (DialFailure::Full, 503, UpgradeResult::UpstreamFailed),
            (DialFailure::Failed, 502, UpgradeResult::UpstreamFailed),
        ];
        for (failure, status, result) in cases {
            let answer = Answer::dial_failed(failure);
            assert_eq!((answer.status, answer.result), (Some(status), result));
            let bytes = text(&answer);
            let body = bytes.split("\r\n\r\n").nth(1).expect("a body");
            assert!(
                bytes.contains(&format!("Content-Length: {}\r\n", body.len())),
                "{bytes}"
            );
        }
    }

    #[test]
    fn a_slow_client_gets_408_and_one_that_left_gets_nothing() {
        let slow = Answer::bad_request(&HandshakeError::Timeout);
        assert_eq!(
            (slow.status, slow.result),
            (Some(408), UpgradeResult::Timeout)
        );
        let gone = Answer::bad_request(&HandshakeError::ClientGone);
        assert_eq!((gone.status, gone.result), (None, UpgradeResult::Rejected));
        assert!(gone.to_bytes().is_empty());
    }

    #[test]
    fn a_426_names_the_protocol_before_the_content_type() {
        let answer = text(&Answer::bad_request(&HandshakeError::UnsupportedVersion));
        assert!(answer.starts_with("HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nContent-Type: text/plain; charset=utf-8\r\n"), "{answer}");
    }

    #[test]
    fn the_101_carries_the_accept_key_and_the_chosen_subprotocol() {
        // RFC 6455 section 1.3's example key and accept value.
        let head = switching_protocols(
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some("chat"),
            &[b"a=1".to_vec()],
            Some("session=k"),
        );
        let head = String::from_utf8(head).expect("ascii");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{head}"
        );
        assert!(
            head.contains(
                "sec-websocket-protocol: chat\r\nset-cookie: a=1\r\nset-cookie: session=k\r\n\r\n"
            ),
            "{head}"
        );
    }
}
