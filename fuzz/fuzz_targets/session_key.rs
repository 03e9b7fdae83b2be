//! Session key extraction from a query, a header or a cookie: never panics,
//! and a key it returns is 1 to 128 visible ASCII characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrouter::config::SessionKeySource;
use wsrouter::handshake::{MAX_SESSION_KEY_LEN, httparse_owned, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (query, cookie) = text.split_once('\n').unwrap_or((text, ""));
    if query.contains([' ', '\r', '#']) || cookie.contains(['\r', '\n']) {
        return;
    }
    let raw = format!(
        "GET /chat?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: {cookie}\r\nX-Session: {cookie}\r\n\r\n"
    );
    let Ok(Some((head, len))) = httparse_owned::parse(raw.as_bytes()) else { return };
    let Ok(request) = validate(head, raw.as_bytes()[len..].to_vec(), &["/chat".to_string()]) else {
        return;
    };
    for source in [
        SessionKeySource::Query("session".into()),
        SessionKeySource::Header("x-session".into()),
        SessionKeySource::Cookie("sid".into()),
    ] {
        if let Ok(Some(key)) = request.session_key(&source) {
            assert!(!key.is_empty() && key.len() <= MAX_SESSION_KEY_LEN);
            assert!(key.bytes().all(|b| b.is_ascii_graphic()));
        }
    }
});
