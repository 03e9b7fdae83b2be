//! PROXY protocol v1/v2 header parsing: never panics, never claims more
//! bytes than it was given, a complete header parses the same with trailing
//! bytes, and every strict prefix of a complete header is "need more"
//! (`Ok(None)`), never an error: `read_header` reads a v1 line byte by byte
//! and would refuse a good header if a prefix of it were called invalid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrouter::proxy_protocol::{Header, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, len))) = parse(data) else {
        return;
    };
    assert!(
        len > 0 && len <= data.len(),
        "claimed {len} of {} bytes",
        data.len()
    );
    let mut longer = data[..len].to_vec();
    longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert_eq!(parse(&longer), Ok(Some((header, len))));
    for cut in 0..len {
        assert_eq!(parse(&data[..cut]), Ok(None), "prefix of {cut} bytes");
    }
    if let Header::Proxied { source } = header {
        // A v1 header carries the address as text: it must be the one read.
        if data.starts_with(b"PROXY ") {
            let line = std::str::from_utf8(&data[..len]).unwrap();
            let src = line.split(' ').nth(2).unwrap();
            assert_eq!(src.parse::<std::net::IpAddr>().ok(), Some(source.ip()));
        }
    }
});
