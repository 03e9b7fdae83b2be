//! The client's upgrade request: HTTP head parsing and WebSocket checks
//! never panic on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrouter::handshake::{httparse_owned, validate};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, len))) = httparse_owned::parse(data) {
        assert!(len <= data.len());
        let _ = validate(head, data[len..].to_vec(), &["/chat".to_string(), "/".to_string()]);
    }
});
