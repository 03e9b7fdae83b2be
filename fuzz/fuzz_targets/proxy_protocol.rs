//! PROXY protocol v1/v2 header parsing: never panics, never claims more
//! bytes than it was given, and a complete header parses the same with
//! trailing bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrouter::proxy_protocol::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, len))) = parse(data) {
        assert!(len <= data.len());
        let mut longer = data[..len].to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&longer), Ok(Some((header, len))));
    }
});
