//! The client's upgrade request: HTTP head parsing and WebSocket checks
//! never panic on any bytes; a complete head's strict prefixes are
//! "incomplete", never an error (`read_request` parses after every read, so
//! a request split across reads must not be refused); and a request that
//! validates is a GET in origin-form on a configured path with Host,
//! version 13 and a well-formed key, so no client can name a destination.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrouter::handshake::{HandshakeError, httparse_owned, validate};

const PATHS: [&str; 2] = ["/chat", "/"];

fuzz_target!(|data: &[u8]| {
    let (head, len) = match httparse_owned::parse(data) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return,
        Err(e) => {
            assert!(matches!(
                e,
                HandshakeError::Malformed(_) | HandshakeError::HeadTooLarge
            ));
            assert!(e.status().is_some());
            return;
        }
    };
    assert!(len > 0 && len <= data.len());
    // Cut points: just before the end, the middle, and one the input picks.
    let pick = usize::from(data[0]) * len / 256;
    for cut in [len - 1, len / 2, pick] {
        assert!(
            matches!(httparse_owned::parse(&data[..cut]), Ok(None)),
            "a {cut}-byte prefix of a {len}-byte head is not 'incomplete'"
        );
    }
    let paths: Vec<String> = PATHS.iter().map(|p| p.to_string()).collect();
    let method = head.method.clone();
    let version = head.version;
    match validate(head, data[len..].to_vec(), &paths) {
        Ok(request) => {
            assert_eq!(method, "GET");
            assert_eq!(version, 1);
            assert!(
                request.target.starts_with('/'),
                "target {:?}",
                request.target
            );
            let path = request.target.split(['?', '#']).next().unwrap();
            assert!(PATHS.contains(&path), "path {path:?}");
            assert!(request.header("host").is_some());
            assert_eq!(
                request.header("sec-websocket-version").map(str::trim),
                Some("13")
            );
            let key = request.header("sec-websocket-key").unwrap().trim();
            assert!(key.len() == 24 && key.ends_with("=="), "key {key:?}");
            assert_eq!(request.leftover, &data[len..]);
        }
        Err(e) => assert!(e.status().is_some(), "{e:?} has no status"),
    }
});
