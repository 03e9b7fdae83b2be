//! What the router knows of engine.io and Socket.IO: where an engine.io
//! session (`sid`) lives when the client brings no session key, and how to
//! read the `sid` out of a backend's OPEN packet. The long-polling proxy
//! is [`polling`].
//!
//! Without a session key, every long-polling request and the WebSocket
//! upgrade of one engine.io session carry its `sid` (engine.io puts it in
//! the query); the backend that answered the handshake named it, and the
//! router remembers which backend that was. The table is per router
//! process and bounded: several router instances need the session key
//! (Socket.IO's `query` option sends it on every request; README,
//! "Socket.IO").

pub mod polling;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Most engine.io sessions remembered at once.
const SID_TABLE_CAPACITY: usize = 100_000;

/// A sid not used for this long is forgotten (engine.io closes a session
/// whose client was silent for its ping interval plus timeout, 45 s by
/// default).
const SID_IDLE: Duration = Duration::from_secs(120);

/// Longest sid accepted (engine.io's are 20 characters).
const MAX_SID_LEN: usize = 64;

/// engine.io sessions and the backend each lives on; cheap to clone.
#[derive(Clone, Default)]
pub struct SidTable {
    entries: Arc<Mutex<HashMap<String, (String, Instant)>>>,
}

impl SidTable {
    /// Remember that `sid` lives on `backend`. When the table is full of
    /// sessions still in use, it is not remembered (the client then needs
    /// a session key) and `false` comes back.
    pub fn insert(&self, sid: &str, backend: &str) -> bool {
        if !is_sid(sid) {
            return false;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries.len() >= SID_TABLE_CAPACITY && !entries.contains_key(sid) {
            entries.retain(|_, (_, used)| now.duration_since(*used) < SID_IDLE);
            if entries.len() >= SID_TABLE_CAPACITY {
                return false;
            }
        }
        entries.insert(sid.to_string(), (backend.to_string(), now));
        true
    }

    /// The backend of `sid`, if it is known and was used lately.
    pub fn backend_of(&self, sid: &str) -> Option<String> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        let (backend, used) = entries.get_mut(sid)?;
        if now.duration_since(*used) >= SID_IDLE {
            entries.remove(sid);
            return None;
        }
        *used = now;
        Some(backend.clone())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// A sid as engine.io makes them: base64url-ish, bounded.
fn is_sid(sid: &str) -> bool {
    !sid.is_empty()
        && sid.len() <= MAX_SID_LEN
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The `sid` of an engine.io OPEN packet at the start of a long-polling
/// response body (v4: `0{"sid":...}`; v3: `<length>:0{"sid":...}`).
pub fn open_packet_sid(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let packet = match text.split_once(':') {
        Some((length, rest))
            if !length.is_empty() && length.bytes().all(|b| b.is_ascii_digit()) =>
        {
            rest.get(..length.parse::<usize>().ok()?)?
        }
        _ => text,
    };
    let json = packet.strip_prefix('0')?;
    let end = json.find('\u{1e}').unwrap_or(json.len());
    let open: serde_json::Value = serde_json::from_str(&json[..end]).ok()?;
    let sid = open.get("sid")?.as_str()?;
    is_sid(sid).then(|| sid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sid_is_read_from_v4_and_v3_open_packets() {
        let v4 = br#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        assert_eq!(open_packet_sid(v4).as_deref(), Some("lv_VI97HAXpY6yYWAAAC"));
        let open = r#"0{"sid":"abc-DEF_123","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":5000}"#;
        let v3 = format!("{}:{open}2:40", open.len());
        assert_eq!(
            open_packet_sid(v3.as_bytes()).as_deref(),
            Some("abc-DEF_123")
        );
        for bad in [
            &b"ok"[..],
            b"0{}",
            b"0{\"sid\":\"../../etc\"}",
            b"4hello",
            b"",
        ] {
            assert_eq!(
                open_packet_sid(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sid_is_forgotten_after_it_idles() {
        let table = SidTable::default();
        assert!(table.insert("abc", "eu-1"));
        assert!(!table.insert("no/slashes", "eu-1"));
        assert_eq!(table.backend_of("abc").as_deref(), Some("eu-1"));
        tokio::time::advance(SID_IDLE - Duration::from_secs(1)).await;
        assert_eq!(
            table.backend_of("abc").as_deref(),
            Some("eu-1"),
            "a use keeps it"
        );
        tokio::time::advance(SID_IDLE).await;
        assert_eq!(table.backend_of("abc"), None);
        assert_eq!(table.len(), 0);
    }
}
