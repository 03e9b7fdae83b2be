//! What the router knows of engine.io and Socket.IO: where an engine.io
//! session (`sid`) lives when the client brings no session key, how to
//! read the `sid` out of a backend's OPEN packet, the client's namespace
//! CONNECT packets a session keeps, and the packet kinds a move must
//! treat apart. The long-polling proxy is [`polling`]; how a Socket.IO
//! session resumes on a new backend is [`resume`].
//!
//! Without a session key, every long-polling request and the WebSocket
//! upgrade of one engine.io session carry its `sid` (engine.io puts it in
//! the query); the backend that answered the handshake named it, and the
//! router remembers which backend that was. The table is per router
//! process and bounded: several router instances need the session key
//! (Socket.IO's `query` option sends it on every request; README,
//! "Socket.IO").

pub mod polling;
pub mod resume;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::wire::frame::{self, OP_TEXT};

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
    entries: Arc<Mutex<HashMap<String, SidEntry>>>,
}

struct SidEntry {
    backend: String,
    used: Instant,
    /// The namespace CONNECT packets the client sent while polling.
    connects: Connects,
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
            entries.retain(|_, entry| now.duration_since(entry.used) < SID_IDLE);
            if entries.len() >= SID_TABLE_CAPACITY {
                return false;
            }
        }
        let entry = SidEntry {
            backend: backend.to_string(),
            used: now,
            connects: Connects::default(),
        };
        entries.insert(sid.to_string(), entry);
        true
    }

    /// The backend of `sid`, if it is known and was used lately.
    pub fn backend_of(&self, sid: &str) -> Option<String> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        let entry = entries.get_mut(sid)?;
        if now.duration_since(entry.used) >= SID_IDLE {
            entries.remove(sid);
            return None;
        }
        entry.used = now;
        Some(entry.backend.clone())
    }

    /// Keep the namespace CONNECT packets in a long-polling request body
    /// (engine.io v4 payload: packets separated by `\x1e`) sent for `sid`.
    pub fn note_connects(&self, sid: &str, body: &[u8]) {
        if !body.windows(2).any(|w| w == b"40") {
            return;
        }
        if let Some(entry) = self.entries.lock().get_mut(sid) {
            for packet in body.split(|&b| b == 0x1e) {
                entry.connects.note(packet);
            }
        }
    }

    /// Every engine.io session known, for a router upgrade's new process:
    /// (sid, backend, CONNECT packets).
    pub fn export(&self) -> Vec<(String, String, Vec<Vec<u8>>)> {
        self.entries
            .lock()
            .iter()
            .map(|(sid, entry)| (sid.clone(), entry.backend.clone(), entry.connects.packets()))
            .collect()
    }

    /// Take over the sessions an old process knew (as used just now).
    pub fn import(&self, sessions: Vec<(String, String, Vec<Vec<u8>>)>) {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        for (sid, backend, connects) in sessions {
            if entries.len() >= SID_TABLE_CAPACITY || !is_sid(&sid) {
                continue;
            }
            let connects = Connects::from_packets(&connects);
            let entry = SidEntry {
                backend,
                used: now,
                connects,
            };
            entries.insert(sid, entry);
        }
    }

    /// The CONNECT packets the client sent for `sid` while polling.
    pub fn connects_of(&self, sid: &str) -> Connects {
        self.entries
            .lock()
            .get(sid)
            .map(|entry| entry.connects.clone())
            .unwrap_or_default()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// Most namespaces a session's CONNECT packets are kept for.
const MAX_NAMESPACES: usize = 8;

/// Largest CONNECT packet kept (the auth payload rides in it).
const MAX_CONNECT_BYTES: usize = 8 * 1024;

/// The client's namespace CONNECT packets (`40`, `40/chat,{"token":...}`),
/// the last one per namespace: what a new backend must see before the
/// client's events, so the Socket.IO server there runs its connection
/// handler. Bounded in count and size.
#[derive(Debug, Clone, Default)]
pub struct Connects(Vec<(String, Bytes)>);

impl Connects {
    /// Keep `payload` if it is a CONNECT packet (a DISCONNECT, `41`,
    /// forgets its namespace).
    pub fn note(&mut self, payload: &[u8]) {
        let (connect, disconnect) = (payload.starts_with(b"40"), payload.starts_with(b"41"));
        if !(connect || disconnect) || payload.len() > MAX_CONNECT_BYTES {
            return;
        }
        let namespace = namespace_of(&payload[2..]);
        self.0.retain(|(kept, _)| *kept != namespace);
        if connect && self.0.len() < MAX_NAMESPACES {
            self.0.push((namespace, Bytes::copy_from_slice(payload)));
        }
    }

    /// Note the CONNECT and DISCONNECT packets among `frames`, whole
    /// client frames as the relay forwards them (checked already: this
    /// walks their headers without checking them again). Only a one-frame
    /// text message is looked into (clients send their CONNECTs whole),
    /// and only past its first two bytes when they say `40` or `41`: a few
    /// instructions a frame.
    pub fn note_in_frames(&mut self, frames: &[u8]) {
        let mut at = 0;
        while let Some(&[b0, b1]) = frames.get(at..at + 2) {
            let (len, header) = match b1 & 0x7F {
                126 => match frames.get(at + 2..at + 4) {
                    Some(len) => (u16::from_be_bytes([len[0], len[1]]) as usize, 4),
                    None => return,
                },
                127 => match frames.get(at + 2..at + 10).map(|len| len.try_into()) {
                    Some(Ok(len)) => (u64::from_be_bytes(len) as usize, 10),
                    _ => return,
                },
                short => (short as usize, 2),
            };
            let start = at + header + 4;
            let Some(end) = start.checked_add(len).filter(|&end| end <= frames.len()) else {
                return;
            };
            // FIN and text, masked (a client's), and CONNECT-sized.
            if b0 == 0x80 | OP_TEXT && (2..=MAX_CONNECT_BYTES).contains(&len) {
                let key = [
                    frames[start - 4],
                    frames[start - 3],
                    frames[start - 2],
                    frames[start - 1],
                ];
                let kind = [frames[start] ^ key[0], frames[start + 1] ^ key[1]];
                if kind == *b"40" || kind == *b"41" {
                    let mut payload = frames[start..end].to_vec();
                    frame::apply_mask(&mut payload, key, 0);
                    self.note(&payload);
                }
            }
            at = end;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The packets kept, in order (a router upgrade hands them over).
    pub fn packets(&self) -> Vec<Vec<u8>> {
        self.0.iter().map(|(_, packet)| packet.to_vec()).collect()
    }

    /// Connects kept as [`Connects::packets`] gave them.
    pub fn from_packets(packets: &[Vec<u8>]) -> Connects {
        let mut connects = Connects::default();
        for packet in packets {
            connects.note(packet);
        }
        connects
    }

    /// Add `earlier`'s packets for namespaces not kept here, before these.
    fn merge_earlier(&mut self, earlier: Connects) {
        let mut merged: Vec<_> = earlier
            .0
            .into_iter()
            .filter(|(namespace, _)| self.0.iter().all(|(kept, _)| kept != namespace))
            .collect();
        merged.truncate(MAX_NAMESPACES.saturating_sub(self.0.len()));
        merged.append(&mut self.0);
        self.0 = merged;
    }

    /// The packets to send a new backend: the kept ones, or, when none were
    /// seen (the session was opened through another router instance), a
    /// CONNECT to the main namespace.
    pub fn to_send(&self) -> Vec<Bytes> {
        if self.0.is_empty() {
            return vec![Bytes::from_static(b"40")];
        }
        self.0.iter().map(|(_, packet)| packet.clone()).collect()
    }
}

/// What a Socket.IO session keeps for its moves: its client's CONNECT
/// packets, and the engine.io `sid` it long-polled with before its upgrade
/// (whose POSTs carried the CONNECTs, and may reach the router after the
/// upgrade does).
#[derive(Debug, Default)]
pub struct EngineIo {
    pub connects: Connects,
    pub polled_as: Option<String>,
}

impl EngineIo {
    /// Take the CONNECTs the client sent while long-polling, if this router
    /// proxied them, before those seen on the WebSocket since (the same
    /// namespace seen there wins). Once found, the `sid` is done with.
    pub fn learn_from_polling(&mut self, sids: &SidTable) {
        let Some(sid) = &self.polled_as else { return };
        let polled = sids.connects_of(sid);
        if !polled.is_empty() {
            self.connects.merge_earlier(polled);
            self.polled_as = None;
        }
    }
}

/// The namespace a Socket.IO packet names after its type: `/chat,...` is
/// `/chat`; anything else is the main namespace `/`.
fn namespace_of(rest: &[u8]) -> String {
    if rest.first() != Some(&b'/') {
        return "/".into();
    }
    let end = rest.iter().position(|&b| b == b',').unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

/// What an engine.io text packet is, for a move: the router passes every
/// packet through untouched except while a session resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet {
    /// `0`: a new engine.io session (the server's first packet).
    Open,
    /// `2`, `3`, `5`, `6`: ping, pong, upgrade, noop: about one
    /// connection, never replayed to another.
    Transport,
    /// `40`: a namespace CONNECT (from the client) or its acknowledgement
    /// (from the server).
    Connect,
    /// `44`: the server refused a namespace CONNECT.
    ConnectError,
    /// Any other packet (events, acknowledgements, binary placeholders).
    Other,
}

/// The kind of an engine.io v4 text packet.
pub fn packet_kind(payload: &[u8]) -> Packet {
    match payload {
        [b'0', ..] => Packet::Open,
        [b'2' | b'3' | b'5' | b'6', ..] => Packet::Transport,
        [b'4', b'0', ..] => Packet::Connect,
        [b'4', b'4', ..] => Packet::ConnectError,
        _ => Packet::Other,
    }
}

/// The request target for the same client on another backend: a new
/// engine.io session over WebSocket (`sid` dropped, `transport=websocket`),
/// the rest of the query as the client sent it.
pub fn fresh_target(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            name != "sid" && name != "transport"
        })
        .collect();
    let mut out = format!("{path}?");
    for pair in kept {
        out.push_str(pair);
        out.push('&');
    }
    out.push_str("transport=websocket");
    out
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

    #[test]
    fn connects_are_kept_per_namespace_and_forgotten_on_disconnect() {
        let mut connects = Connects::default();
        assert_eq!(connects.to_send(), vec![Bytes::from_static(b"40")]);
        connects.note(b"42[\"chat\",\"hi\"]");
        connects.note(br#"40{"token":"a"}"#);
        connects.note(br#"40/admin,{"token":"b"}"#);
        connects.note(br#"40{"token":"c"}"#);
        assert_eq!(
            connects.to_send(),
            vec![
                Bytes::from_static(br#"40/admin,{"token":"b"}"#),
                Bytes::from_static(br#"40{"token":"c"}"#)
            ]
        );
        connects.note(b"41/admin,");
        assert_eq!(
            connects.to_send(),
            vec![Bytes::from_static(br#"40{"token":"c"}"#)]
        );
    }

    #[test]
    fn connects_are_found_among_masked_client_frames_and_polled_ones_come_first() {
        use crate::wire::frame::{OP_BINARY, OP_PING, encode};
        let masked = |opcode, payload: &[u8]| encode(opcode, payload, Some([7, 9, 1, 3]));
        let mut frames = Vec::new();
        for (opcode, payload) in [
            (OP_TEXT, &br#"42["chat","40"]"#[..]),
            (OP_PING, b"40"),
            (OP_BINARY, b"40/binary,"),
            (OP_TEXT, br#"40/desk,{"room":"front"}"#),
            (OP_TEXT, b"4"),
        ] {
            frames.extend_from_slice(&masked(opcode, payload));
        }
        let mut connects = Connects::default();
        connects.note_in_frames(&frames);
        assert_eq!(
            connects.to_send(),
            vec![Bytes::from_static(br#"40/desk,{"room":"front"}"#)]
        );
        // A cut frame at the end is left alone.
        let cut = masked(OP_TEXT, b"40/cut,");
        connects.note_in_frames(&cut[..cut.len() - 1]);
        assert_eq!(connects.to_send().len(), 1);

        let mut polled = Connects::default();
        polled.note(br#"40{"token":"t"}"#);
        polled.note(b"40/desk,");
        connects.merge_earlier(polled);
        assert_eq!(
            connects.to_send(),
            vec![
                Bytes::from_static(br#"40{"token":"t"}"#),
                Bytes::from_static(br#"40/desk,{"room":"front"}"#)
            ],
            "the WebSocket's /desk wins"
        );
    }

    #[test]
    fn a_fresh_target_drops_the_sid_and_asks_for_websocket() {
        assert_eq!(
            fresh_target("/socket.io/?EIO=4&transport=websocket&sid=abc&session=k"),
            "/socket.io/?EIO=4&session=k&transport=websocket"
        );
        assert_eq!(
            fresh_target("/socket.io/?EIO=4&transport=websocket"),
            "/socket.io/?EIO=4&transport=websocket"
        );
    }

    #[test]
    fn packet_kinds() {
        assert_eq!(packet_kind(br#"0{"sid":"x"}"#), Packet::Open);
        assert_eq!(packet_kind(b"2probe"), Packet::Transport);
        assert_eq!(packet_kind(b"5"), Packet::Transport);
        assert_eq!(packet_kind(br#"40{"sid":"y"}"#), Packet::Connect);
        assert_eq!(packet_kind(br#"44{"message":"no"}"#), Packet::ConnectError);
        assert_eq!(packet_kind(b"42[\"ev\"]"), Packet::Other);
    }

    #[test]
    fn a_polling_body_s_connects_are_kept_for_its_sid() {
        let table = SidTable::default();
        assert!(table.insert("s1", "eu-1"));
        table.note_connects("s1", b"40{\"token\":\"t\"}\x1e42[\"x\"]");
        table.note_connects("unknown", b"40");
        assert_eq!(
            table.connects_of("s1").to_send(),
            vec![Bytes::from_static(b"40{\"token\":\"t\"}")]
        );
        assert!(table.connects_of("unknown").is_empty());
    }
}
