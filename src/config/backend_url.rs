//! A backend's `ws://` or `wss://` URL, parsed: host, port, TLS and the
//! path prefix the client's path is appended to.

/// A parsed backend URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub host: String,
    pub port: u16,
    /// `wss://`: TLS to the backend, its certificate checked for `host`.
    pub tls: bool,
    /// Path prefix without a trailing slash (may be empty).
    pub prefix: String,
    /// The original text, for display.
    pub raw: String,
}

impl BackendUrl {
    /// Parse `ws://host[:port][/prefix]` or `wss://...` (ports 80 and 443
    /// by default).
    pub fn parse(raw: &str) -> Result<BackendUrl, String> {
        let (rest, tls) = if let Some(rest) = raw.strip_prefix("ws://") {
            (rest, false)
        } else if let Some(rest) = raw.strip_prefix("wss://") {
            (rest, true)
        } else {
            return Err(format!("{raw:?} must start with ws:// or wss://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains('?') || path.contains('#') {
            return Err(format!(
                "{raw:?} must not have a query or fragment: the client's query is forwarded"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| format!("{raw:?} has an unclosed '[' in the host"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{raw:?} has no host"));
        }
        if host.contains('@') {
            return Err(format!("{raw:?} must not carry credentials"));
        }
        let port = match port {
            None | Some("") if tls => 443,
            None | Some("") => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{raw:?} has an invalid port {p:?}"))?,
        };
        Ok(BackendUrl {
            host,
            port,
            tls,
            prefix: path.trim_end_matches('/').to_string(),
            raw: raw.to_string(),
        })
    }

    /// `host:port` as it goes into a Host header or a TCP connect.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls_parse() {
        let u = BackendUrl::parse("ws://10.0.0.1:9001/chat/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("10.0.0.1", 9001, "/chat")
        );
        let u = BackendUrl::parse("ws://[::1]:9001").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.authority().as_str()),
            ("::1", 9001, "[::1]:9001")
        );
        assert_eq!(BackendUrl::parse("ws://example.com").unwrap().port, 80);
        let u = BackendUrl::parse("wss://example.com/chat").unwrap();
        assert_eq!((u.tls, u.port, u.prefix.as_str()), (true, 443, "/chat"));
        assert!(!BackendUrl::parse("ws://example.com").unwrap().tls);
        for bad in [
            "http://x:1",
            "ws://:1",
            "ws://x:0",
            "ws://x:99999",
            "ws://x:1/a?b",
            "x",
        ] {
            assert!(BackendUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
