//! X-Forwarded-For / Forwarded walking: never panics, and the answer is
//! always the peer or an address that appears in the headers.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use wsrouter::handshake::{client_ip, httparse_owned, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (xff, forwarded) = text.split_once('\n').unwrap_or((text, ""));
    if xff.contains('\r') || forwarded.contains(['\r', '\n']) {
        return;
    }
    let raw = format!(
        "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: {xff}\r\nForwarded: {forwarded}\r\n\r\n"
    );
    let Ok(Some((head, len))) = httparse_owned::parse(raw.as_bytes()) else { return };
    let Ok(request) = validate(head, raw.as_bytes()[len..].to_vec(), &["/chat".to_string()]) else {
        return;
    };
    let peer: IpAddr = "127.0.0.1".parse().unwrap();
    let trusted = ["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
    let ip = client_ip(peer, &request, &trusted);
    assert!(ip == peer || mentioned(text).contains(&ip), "{ip} is neither the peer nor in the headers");
});

/// Every address written anywhere in the header values, however wrapped.
fn mentioned(text: &str) -> Vec<IpAddr> {
    text.split([',', ';', ' ', '\n'])
        .filter_map(|token| {
            let token = token.trim().trim_matches('"');
            let token = match token.split_once('=') {
                Some((key, value)) if key.trim().eq_ignore_ascii_case("for") => value.trim_matches('"'),
                _ => token,
            };
            if let Ok(ip) = token.parse::<IpAddr>() {
                return Some(ip.to_canonical());
            }
            if let Some(rest) = token.strip_prefix('[') {
                return rest.split(']').next()?.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
            }
            let (host, _) = token.rsplit_once(':')?;
            host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
        })
        .collect()
}
