//! The PROXY protocol (v1 text and v2 binary, as HAProxy specifies it): the
//! header an L4 balancer puts in front of a connection to say who the client
//! really is.
//!
//! [`parse`] is a pure function over the bytes read so far (fuzzed and
//! unit-tested); [`read_header`] reads from a socket until a header is
//! complete, never consuming bytes past it. Whether a peer may send a header
//! at all is the listener's decision (configured source CIDRs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// Longest v2 header we accept (16-byte prelude plus addresses and TLVs).
const V2_MAX: usize = 16 + 1024;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The connection is proxied for this client.
    Proxied { source: SocketAddr },
    /// A health check or unknown protocol from the proxy itself: use the
    /// connection's own peer address.
    Local,
}

/// A header that is not valid PROXY protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PROXY protocol header: {0}")]
pub struct InvalidHeader(pub &'static str);

/// Parse the start of `buf`: `Ok(None)` while more bytes are needed, else
/// the header and its length in bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, InvalidHeader> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == V2_SIGNATURE[0] {
        let n = buf.len().min(V2_SIGNATURE.len());
        if buf[..n] != V2_SIGNATURE[..n] {
            return Err(InvalidHeader("bad v2 signature"));
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Err(InvalidHeader("neither a v1 nor a v2 header"));
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, InvalidHeader> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(InvalidHeader("v1 line too long"));
        }
        return Ok(None);
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(InvalidHeader("v1 line too long"));
    }
    let line =
        std::str::from_utf8(&buf[..end]).map_err(|_| InvalidHeader("v1 line is not text"))?;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    let header = match parts.next() {
        Some("UNKNOWN") => Header::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [src, _dst, sport, _dport] = fields[..] else {
                return Err(InvalidHeader("v1 needs source, destination and two ports"));
            };
            let ip: IpAddr = src
                .parse()
                .map_err(|_| InvalidHeader("v1 source address"))?;
            if ip.is_ipv4() != (family == "TCP4") {
                return Err(InvalidHeader("v1 address does not match its family"));
            }
            let port = parse_port(sport)?;
            if parse_port(_dport).is_err() || _dst.parse::<IpAddr>().is_err() {
                return Err(InvalidHeader("v1 destination"));
            }
            Header::Proxied {
                source: SocketAddr::new(ip, port),
            }
        }
        _ => return Err(InvalidHeader("v1 protocol must be TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Some((header, len)))
}

/// A decimal port without sign or leading zeros.
fn parse_port(text: &str) -> Result<u16, InvalidHeader> {
    if text.is_empty() || text.len() > 5 || (text.len() > 1 && text.starts_with('0')) {
        return Err(InvalidHeader("v1 port"));
    }
    text.parse().map_err(|_| InvalidHeader("v1 port"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, InvalidHeader> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(InvalidHeader("v2 version"));
    }
    let family = buf[13];
    let body_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body_len;
    if len > V2_MAX {
        return Err(InvalidHeader("v2 header too long"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[16..len];
    let header = match version_command & 0x0f {
        0x0 => Header::Local,
        0x1 => match family {
            // TCP over IPv4: src(4) dst(4) sport(2) dport(2)
            0x11 => {
                let a = body
                    .get(..12)
                    .ok_or(InvalidHeader("v2 IPv4 addresses truncated"))?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Header::Proxied {
                    source: SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])),
                }
            }
            // TCP over IPv6: src(16) dst(16) sport(2) dport(2)
            0x21 => {
                let a = body
                    .get(..36)
                    .ok_or(InvalidHeader("v2 IPv6 addresses truncated"))?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[..16]);
                let ip = Ipv6Addr::from(octets);
                Header::Proxied {
                    source: SocketAddr::new(IpAddr::V6(ip), u16::from_be_bytes([a[32], a[33]])),
                }
            }
            // UDP, unix sockets, unspecified: not a client address we can use.
            _ => Header::Local,
        },
        _ => return Err(InvalidHeader("v2 command")),
    };
    Ok(Some((header, len)))
}

/// Read a PROXY header from `stream`, and not one byte more: what follows
/// is the client's TLS handshake or HTTP request, which other code reads.
/// A v2 header takes two reads; a v1 line is read a byte at a time after
/// its first 8 bytes (it has no length field; at most 107 bytes, once per
/// connection from the balancer).
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Header, ReadError> {
    let mut buf = vec![0u8; 8];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|_| ReadError::Closed)?;
    loop {
        let wanted = match parse(&buf).map_err(ReadError::Invalid)? {
            Some((header, _)) => return Ok(header),
            // v2: the prelude, then exactly the length it announces.
            None if buf[0] == V2_SIGNATURE[0] && buf.len() < 16 => 16,
            None if buf[0] == V2_SIGNATURE[0] => {
                16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
            }
            // v1: up to the CRLF, byte by byte.
            None => buf.len() + 1,
        };
        let start = buf.len();
        buf.resize(wanted, 0);
        stream
            .read_exact(&mut buf[start..])
            .await
            .map_err(|_| ReadError::Closed)?;
    }
}

/// Why no PROXY header could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Invalid(InvalidHeader),
    #[error("the connection closed before a PROXY header was complete")]
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LINE: &[u8] = b"PROXY TCP4 81.2.69.142 10.0.0.1 56324 443\r\n";

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let with_request = [LINE, b"GET /"].concat();
        let (h, len) = parse(&with_request).unwrap().unwrap();
        assert_eq!(
            h,
            Header::Proxied {
                source: "81.2.69.142:56324".parse().unwrap()
            }
        );
        assert_eq!(len, LINE.len());
        let (h, _) = parse(b"PROXY TCP6 2001:218::1 ::1 1 2\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            h,
            Header::Proxied {
                source: "[2001:218::1]:1".parse().unwrap()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().0,
            Header::Local
        );
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4").unwrap(), None);
    }

    #[test]
    fn v1_garbage_is_refused() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 1\r\n",
            b"PROXY SCTP 1.2.3.4 5.6.7.8 1 1\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'x'].repeat(20)).is_err());
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn v2_ipv4_ipv6_local_and_tlvs() {
        let mut body = vec![81, 2, 69, 142, 10, 0, 0, 1, 0x1f, 0x90, 0x01, 0xbb];
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]); // a TLV, skipped
        let bytes = v2(1, 0x11, &body);
        let (h, len) = parse(&bytes).unwrap().unwrap();
        assert_eq!(
            h,
            Header::Proxied {
                source: "81.2.69.142:8080".parse().unwrap()
            }
        );
        assert_eq!(len, bytes.len());
        let mut body6 = "2001:218::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        body6.extend_from_slice(&[0u8; 16]);
        body6.extend_from_slice(&[0, 80, 0, 81]);
        assert_eq!(
            parse(&v2(1, 0x21, &body6)).unwrap().unwrap().0,
            Header::Proxied {
                source: "[2001:218::1]:80".parse().unwrap()
            }
        );
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap().unwrap().0, Header::Local);
        assert_eq!(parse(&bytes[..20]).unwrap(), None);
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err());
        assert!(parse(&v2(7, 0x11, &body)).is_err());
    }

    proptest! {
        #[test]
        fn never_panics_and_never_claims_more_than_it_has(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, len))) = parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        #[test]
        fn a_prefix_of_a_valid_header_is_incomplete_not_invalid(cut in 0usize..LINE.len()) {
            prop_assert_eq!(parse(&LINE[..cut]), Ok(None));
        }
    }
}
