//! X-Forwarded-For / Forwarded walking (`handshake::client_ip`): never
//! panics; an untrusted peer's headers are ignored; behind a trusted peer the
//! answer is the peer or an address written in the headers; and once the
//! walk finds an untrusted address, an entry a client adds on the left (a
//! spoofing attempt) does not change it.
//!
//! Input: one flag byte, then lines. Line i becomes an X-Forwarded-For
//! header, or a Forwarded header when bit i of the flag byte is set, so both
//! headers, repeated headers, and Forwarded alone are all reached.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use wsrouter::handshake::{UpgradeRequest, client_ip, httparse_owned, is_trusted_proxy, validate};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if text.contains('\r') {
        return;
    }
    let headers: Vec<(&str, &str)> = text
        .split('\n')
        .take(8)
        .enumerate()
        .map(|(i, line)| {
            let name = if flags & (1 << i) != 0 {
                "Forwarded"
            } else {
                "X-Forwarded-For"
            };
            (name, line)
        })
        .collect();
    let Some(request) = upgrade(&headers) else {
        return;
    };
    let trusted = [
        "127.0.0.0/8".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];

    let outsider: IpAddr = "203.0.113.9".parse().unwrap();
    assert_eq!(
        client_ip(outsider, &request, &trusted),
        outsider,
        "an untrusted peer's headers were believed"
    );

    let peer: IpAddr = "127.0.0.1".parse().unwrap();
    let ip = client_ip(peer, &request, &trusted);
    assert!(
        ip == peer || mentioned(text).contains(&ip),
        "{ip} is neither the peer nor in the headers"
    );

    if !is_trusted_proxy(ip, &trusted) {
        // The client is found: whatever is written left of it is not believed.
        let uses_xff = headers.iter().any(|(name, _)| *name == "X-Forwarded-For");
        let spoof = if uses_xff {
            ("X-Forwarded-For", "6.6.6.6")
        } else {
            ("Forwarded", "for=6.6.6.6")
        };
        let spoofed: Vec<(&str, &str)> = std::iter::once(spoof)
            .chain(headers.iter().copied())
            .collect();
        if let Some(request) = upgrade(&spoofed) {
            assert_eq!(
                client_ip(peer, &request, &trusted),
                ip,
                "a spoofed left-most entry changed the answer"
            );
        }
    }
});

/// A valid upgrade request carrying `headers`, parsed as the router does.
fn upgrade(headers: &[(&str, &str)]) -> Option<UpgradeRequest> {
    let mut raw = String::from(
        "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    );
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    let (head, len) = httparse_owned::parse(raw.as_bytes()).ok()??;
    validate(head, raw.as_bytes()[len..].to_vec(), &["/chat".to_string()]).ok()
}

/// Every address written anywhere in the header values, however wrapped:
/// bare, bracketed, with a port, quoted, after `for=`.
fn mentioned(text: &str) -> Vec<IpAddr> {
    text.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '=' | '"'))
        .filter_map(|token| {
            if let Ok(ip) = token.parse::<IpAddr>() {
                return Some(ip.to_canonical());
            }
            if let Some(rest) = token.strip_prefix('[') {
                return rest
                    .split(']')
                    .next()?
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| ip.to_canonical());
            }
            let (host, _) = token.rsplit_once(':')?;
            host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
        })
        .collect()
}
