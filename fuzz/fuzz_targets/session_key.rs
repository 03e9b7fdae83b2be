//! Session key extraction from a query, a header or a cookie: never panics;
//! a key it returns is 1 to 128 visible ASCII characters and was written by
//! the client; and a key sent percent-encoded in the query, as a header or
//! as a plain cookie comes back exactly (absent when empty, refused when not
//! a valid key).
//!
//! Input: `QUERY\nVALUE`. First QUERY and VALUE are used raw (target
//! `/chat?QUERY`, `Cookie: VALUE`, `X-Session: VALUE`); then VALUE is sent
//! as the key itself (`/chat?session=<VALUE encoded>&QUERY`,
//! `X-Session: VALUE`, `Cookie: sid=VALUE`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrouter::config::SessionKeySource;
use wsrouter::handshake::{MAX_SESSION_KEY_LEN, UpgradeRequest, httparse_owned, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (query, value) = text.split_once('\n').unwrap_or((text, ""));
    if query.contains([' ', '\r', '\n', '#']) || value.contains(['\r', '\n']) {
        return;
    }
    let query_source = SessionKeySource::Query("session".into());
    let header_source = SessionKeySource::Header("x-session".into());
    let cookie_source = SessionKeySource::Cookie("sid".into());

    // Raw: whatever comes back is a valid key the client wrote.
    if let Some(request) = upgrade(
        &format!("/chat?{query}"),
        &[("Cookie", value), ("X-Session", value)],
    ) {
        for source in [&query_source, &header_source, &cookie_source] {
            if let Ok(Some(key)) = request.session_key(source) {
                assert!(valid(&key), "{source:?} gave {key:?}");
                let written = match source {
                    SessionKeySource::Query(_) => {
                        query.contains(['%', '+']) || query.contains(key.as_str())
                    }
                    _ => value.contains(key.as_str()),
                };
                assert!(
                    written,
                    "{source:?} gave {key:?}, which the client did not write"
                );
            }
        }
    }

    // Round trip: the key the client meant is the key extracted.
    let expected = |key: &str| {
        if key.is_empty() {
            Some(None)
        } else if valid(key) {
            Some(Some(key.to_string()))
        } else {
            None // refused
        }
    };
    let cookie_line = format!("sid={value}");
    let target = format!("/chat?session={}&{query}", encode(value));
    let Some(request) = upgrade(&target, &[("X-Session", value), ("Cookie", &cookie_line)]) else {
        return;
    };
    assert_eq!(
        request.session_key(&query_source).ok(),
        expected(value),
        "query {target:?}"
    );
    assert_eq!(
        request.session_key(&header_source).ok(),
        expected(value.trim()),
        "header {value:?}"
    );
    // A cookie value is plain cookie-octets (RFC 6265): no space, quote,
    // comma, semicolon or backslash.
    if value
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"\",;\\".contains(&b))
    {
        assert_eq!(
            request.session_key(&cookie_source).ok(),
            expected(value),
            "cookie {value:?}"
        );
    }
});

/// 1 to 128 visible ASCII characters.
fn valid(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_SESSION_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A valid upgrade request for `target` carrying `headers`.
fn upgrade(target: &str, headers: &[(&str, &str)]) -> Option<UpgradeRequest> {
    let mut raw = format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    let (head, len) = httparse_owned::parse(raw.as_bytes()).ok()??;
    validate(head, raw.as_bytes()[len..].to_vec(), &["/chat".to_string()]).ok()
}
