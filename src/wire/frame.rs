//! WebSocket frames at the byte level (RFC 6455, section 5): finding where
//! whole messages end in a read buffer, checking what a relay must check,
//! and building the few frames the router writes itself.
//!
//! The relay forwards frames exactly as they arrived. A client's masked
//! frames are valid toward any server, and a server's unmasked frames toward
//! any client, so the payload is never decoded and re-encoded. What the
//! router needs is where each message begins and ends: migration replays
//! whole messages and never splits one, and limits count them. A
//! [`FrameReader`] walks frame headers in its buffer and hands out
//! [`Unit`]s: a whole data message (with any control frames sent between
//! its fragments) or a control frame on its own.
//!
//! Checks, with the close code a client gets: reserved bits, unknown
//! opcodes, a client frame without a mask (or a backend frame with one),
//! fragmented or oversized control frames, continuation out of sequence,
//! bad close payloads (1002); text that is not UTF-8 (1007, client text
//! only); a message over the size limit (1009).

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest control frame payload (RFC 6455, 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame that breaks the protocol or a limit (its close code and reason:
/// `close::Fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// 1002
    Protocol,
    /// 1007
    InvalidUtf8,
    /// 1009
    TooBig,
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Bytes of the header itself (2 to 14).
    pub header_len: usize,
    pub payload_len: usize,
}

impl Header {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Read the frame header at the start of `buf`; `Ok(None)` while it is
/// incomplete. `masked` is whether this peer must mask (a client) or must
/// not (a server); `max_payload` bounds any one frame.
pub fn parse_header(
    buf: &[u8],
    masked: bool,
    max_payload: usize,
) -> Result<Option<Header>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    // No extension is ever negotiated, so every reserved bit must be 0.
    if b0 & 0x70 != 0 {
        return Err(Violation::Protocol);
    }
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(Violation::Protocol);
    }
    if (b1 & 0x80 != 0) != masked {
        return Err(Violation::Protocol);
    }
    let short = (b1 & 0x7F) as usize;
    let (payload_len, mut header_len) = match short {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(Violation::Protocol);
            }
            (usize::try_from(len).unwrap_or(usize::MAX), 10)
        }
        len => (len, 2),
    };
    if opcode & 0x8 != 0 && (!fin || payload_len > MAX_CONTROL_PAYLOAD) {
        return Err(Violation::Protocol);
    }
    if payload_len > max_payload {
        return Err(Violation::TooBig);
    }
    let mask = if masked {
        if buf.len() < header_len + 4 {
            return Ok(None);
        }
        let key = buf[header_len..header_len + 4].try_into().expect("4 bytes");
        header_len += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len,
        payload_len,
    }))
}

/// XOR `data` with `key`, as if `data` started `offset` bytes into a payload.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let key = [
        key[offset % 4],
        key[(offset + 1) % 4],
        key[(offset + 2) % 4],
        key[(offset + 3) % 4],
    ];
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

/// Incremental UTF-8 check over a message that arrives in pieces.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Utf8Check {
    /// The start of a character cut by the end of the last piece.
    carry: [u8; 4],
    carry_len: u8,
}

impl Utf8Check {
    /// Check the next piece; false at the first invalid byte.
    pub fn feed(&mut self, mut piece: &[u8]) -> bool {
        if self.carry_len > 0 {
            let have = self.carry_len as usize;
            let width = match self.carry[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (width - have).min(piece.len());
            self.carry[have..have + take].copy_from_slice(&piece[..take]);
            piece = &piece[take..];
            if have + take < width {
                self.carry_len = (have + take) as u8;
                // Still a prefix only if every byte so far could be one.
                return match std::str::from_utf8(&self.carry[..have + take]) {
                    Err(e) => e.error_len().is_none(),
                    Ok(_) => false,
                };
            }
            self.carry_len = 0;
            if std::str::from_utf8(&self.carry[..width]).is_err() {
                return false;
            }
        }
        match std::str::from_utf8(piece) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                let rest = &piece[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.carry_len = rest.len() as u8;
                true
            }
            Err(_) => false,
        }
    }

    /// Whether the message ended on a whole character.
    pub fn finish(&self) -> bool {
        self.carry_len == 0
    }
}

/// Check a (possibly masked) payload piece as UTF-8 without copying it to
/// the heap: unmask a stack-sized chunk at a time.
fn check_utf8_piece(check: &mut Utf8Check, piece: &[u8], mask: Option<[u8; 4]>) -> bool {
    let Some(key) = mask else {
        return check.feed(piece);
    };
    let mut scratch = [0u8; 512];
    for (i, chunk) in piece.chunks(scratch.len()).enumerate() {
        let out = &mut scratch[..chunk.len()];
        out.copy_from_slice(chunk);
        apply_mask(out, key, i * 512);
        if !check.feed(out) {
            return false;
        }
    }
    true
}

/// A close frame's status code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: String,
}

/// Codes a peer may send in a close frame (RFC 6455, 7.4).
fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Read a close payload (already unmasked).
pub fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, Violation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Violation::Protocol),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_sendable_close_code(code) {
                return Err(Violation::Protocol);
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| Violation::InvalidUtf8)?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_string(),
            }))
        }
    }
}

/// One frame with `payload`, masked with `mask` when given (frames the
/// router sends to a backend, as its client).
pub fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 14);
    out.put_u8(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.put_u8(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(len as u16);
        }
        len => {
            out.put_u8(mask_bit | 127);
            out.put_u64(len as u64);
        }
    }
    let start = out.len() + if mask.is_some() { 4 } else { 0 };
    if let Some(key) = mask {
        out.put_slice(&key);
    }
    out.put_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
    out.freeze()
}

/// The data of one whole message as a [`FrameReader`] found it (`frames`:
/// its frames, masked or not, with any control frames between them):
/// its opcode and the unmasked payload of its data frames.
pub fn message_payload(frames: &[u8]) -> (u8, Vec<u8>) {
    let mut opcode = OP_CONTINUATION;
    let mut payload = Vec::new();
    let mut at = 0;
    while at + 2 <= frames.len() {
        let masked = frames[at + 1] & 0x80 != 0;
        let Ok(Some(header)) = parse_header(&frames[at..], masked, usize::MAX) else {
            break;
        };
        let start = at + header.header_len;
        let end = (start + header.payload_len).min(frames.len());
        if header.opcode & 0x8 == 0 {
            if opcode == OP_CONTINUATION {
                opcode = header.opcode;
            }
            let from = payload.len();
            payload.extend_from_slice(&frames[start..end]);
            if let Some(key) = header.mask {
                apply_mask(&mut payload[from..], key, 0);
            }
        }
        at = end;
    }
    (opcode, payload)
}

/// A close frame's payload: the code and a reason.
pub fn close_payload(close: Option<&CloseFrame>) -> Vec<u8> {
    match close {
        None => Vec::new(),
        Some(close) => {
            let mut payload = close.code.to_be_bytes().to_vec();
            // Control payloads stop at 125 bytes; cut the reason on a char.
            let mut reason = close.reason.as_str();
            while reason.len() > MAX_CONTROL_PAYLOAD - 2 {
                let mut cut = reason.len() - 1;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason = &reason[..cut];
            }
            payload.extend_from_slice(reason.as_bytes());
            payload
        }
    }
}

/// What a [`FrameReader`] found at the front of its buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// A whole text or binary message: its frames, and any control frames
    /// sent between them, `len` bytes in all; `payload` bytes of data.
    Message {
        len: usize,
        payload: usize,
    },
    Ping {
        len: usize,
    },
    /// `own` when it answers one of the router's own pings (keepalive or
    /// watermark): it is not relayed.
    Pong {
        len: usize,
        own: bool,
    },
    Close {
        len: usize,
        frame: Option<CloseFrame>,
    },
}

impl Unit {
    /// Bytes of the buffer the unit spans.
    pub fn len(&self) -> usize {
        match *self {
            Unit::Message { len, .. }
            | Unit::Ping { len }
            | Unit::Pong { len, .. }
            | Unit::Close { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`FrameScan::plain_run`] walked over.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlainRun {
    /// Bytes of the units.
    pub len: usize,
    pub messages: usize,
    /// Bytes of their payloads.
    pub payload: usize,
}

/// Whether a whole single-frame message's payload is UTF-8, given the frame
/// and its header's length (the mask key, if any, ends the header). Kept out
/// of line: the relay's per-message path stays small for binary messages.
#[inline(never)]
fn is_utf8_payload(frame: &[u8], header: usize) -> bool {
    let mask = (frame[1] & 0x80 != 0)
        .then(|| <[u8; 4]>::try_from(&frame[header - 4..header]).expect("4 bytes"));
    let mut check = Utf8Check::default();
    check_utf8_piece(&mut check, &frame[header..], mask) && check.finish()
}

/// A data message whose final frame has not arrived yet.
#[derive(Debug, Clone, Copy)]
struct Partial {
    text: bool,
    payload: usize,
    utf8: Utf8Check,
}

/// Payload of the router's keepalive pings; pongs carrying it are the
/// router's own and are not relayed.
pub const KEEPALIVE: &[u8] = b"wsrouter-keepalive";

/// A watermark ping's payload starts with this, followed by the session's
/// count of client messages forwarded when it was sent (8 bytes, big
/// endian). The backend's pong carries it back once it has read them all
/// (RFC 6455 5.5.3: a pong answers with the ping's payload, in order with
/// the data).
pub const WATERMARK_PREFIX: &[u8] = b"wsrouter-wm:";
const WATERMARK_PAYLOAD_LEN: usize = WATERMARK_PREFIX.len() + 8;

/// An acknowledging backend's unsolicited pong carries this, then the
/// count of client messages it has finished with on the connection, in
/// ASCII decimal.
pub const ACK_PREFIX: &[u8] = b"wsrouter-ack ";

/// What an acknowledgement pong says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Messages finished with on this connection, cumulative.
    Count(u64),
    /// It starts like an acknowledgement but carries no count.
    Malformed,
}

/// The acknowledgement a backend's (unmasked) pong frame carries, if it is
/// one.
pub fn ack_of(pong_frame: &[u8]) -> Option<Ack> {
    let payload = match pong_frame {
        [first, len, payload @ ..] if *first == 0x80 | OP_PONG && usize::from(*len) < 126 => {
            payload.get(..usize::from(*len))?
        }
        _ => return None,
    };
    let count = payload.strip_prefix(ACK_PREFIX)?;
    let digits = !count.is_empty() && count.len() <= 19 && count.iter().all(u8::is_ascii_digit);
    let parsed = digits
        .then(|| std::str::from_utf8(count).ok()?.parse().ok())
        .flatten();
    Some(parsed.map_or(Ack::Malformed, Ack::Count))
}

/// The payload of a watermark ping for `forwarded` client messages.
pub fn watermark_payload(forwarded: u64) -> [u8; WATERMARK_PAYLOAD_LEN] {
    let mut payload = [0u8; WATERMARK_PAYLOAD_LEN];
    payload[..WATERMARK_PREFIX.len()].copy_from_slice(WATERMARK_PREFIX);
    payload[WATERMARK_PREFIX.len()..].copy_from_slice(&forwarded.to_be_bytes());
    payload
}

/// The count a backend's (unmasked) pong frame carries back, when it
/// answers a watermark ping.
pub fn watermark_of(pong_frame: &[u8]) -> Option<u64> {
    let payload = match pong_frame {
        [first, len, payload @ ..]
            if *first == 0x80 | OP_PONG && usize::from(*len) == WATERMARK_PAYLOAD_LEN =>
        {
            payload
        }
        _ => return None,
    };
    let count = payload.strip_prefix(WATERMARK_PREFIX)?;
    Some(u64::from_be_bytes(count.try_into().ok()?))
}

/// The receiving half of one peer: bytes read but not yet handed on, and
/// where the message in progress stands.
///
/// The buffer is empty and unallocated while nothing is in flight, so an
/// idle session costs no read buffer at all. Bytes just read can also be
/// scanned where they lie ([`FrameReader::scan_fresh`]): only what is left
/// over, an unfinished frame, is copied into the buffer.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    scan: FrameScan,
}

/// Where a reader stands in the bytes it has not handed on yet: offsets
/// into them, and the message in progress. Kept apart from the buffer so it
/// can walk bytes that are not in the buffer.
#[derive(Debug)]
pub struct FrameScan {
    /// Start of the unit being parsed (everything before it is whole units
    /// the caller has not consumed yet).
    unit_start: usize,
    /// Start of the next frame to parse.
    cursor: usize,
    partial: Option<Partial>,
    /// A client's frames must be masked; a backend's must not.
    masked: bool,
    /// Check text for UTF-8 (for client messages).
    check_utf8: bool,
    max_message: usize,
}

impl FrameReader {
    /// A reader of a client's frames (masked, text checked).
    pub fn client(max_message: usize, already_read: Vec<u8>) -> FrameReader {
        FrameReader::new(true, true, max_message, already_read)
    }

    /// A reader of a backend's frames (unmasked, text passed as it is).
    pub fn backend(max_message: usize, already_read: Vec<u8>) -> FrameReader {
        FrameReader::new(false, false, max_message, already_read)
    }

    fn new(masked: bool, check_utf8: bool, max_message: usize, read: Vec<u8>) -> FrameReader {
        FrameReader {
            buf: BytesMut::from(&read[..]),
            scan: FrameScan {
                unit_start: 0,
                cursor: 0,
                partial: None,
                masked,
                check_utf8,
                max_message,
            },
        }
    }

    /// The bytes read and not yet taken (between relay rounds: the start
    /// of a unit not yet whole).
    pub fn unread(&self) -> &[u8] {
        &self.buf
    }

    /// The bytes read and not yet taken.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes still needed to complete the frame being read, once its header
    /// is known (so the caller can read straight into a buffer that size).
    pub fn wanted(&self) -> usize {
        let cursor = self.scan.cursor;
        match parse_header(&self.buf[cursor..], self.scan.masked, usize::MAX) {
            Ok(Some(h)) => (cursor + h.frame_len()).saturating_sub(self.buf.len()),
            _ => 0,
        }
    }

    /// Bytes held in the buffer.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole unit after those already returned, or `None` until
    /// more bytes arrive. A violation leaves the reader where it was.
    pub fn next_unit(&mut self) -> Result<Option<Unit>, Violation> {
        self.scan.next_unit(&self.buf)
    }

    /// Hand `walk` the bytes not yet consumed: those carried over, then
    /// `fresh` (just read). When nothing was carried over, `walk` gets
    /// `fresh` itself and nothing is copied; otherwise it also gets the
    /// bytes as [`Bytes`] with the size of the allocation they lie in, to
    /// keep slices of (a large message, say) without a copy when that
    /// pins no more than the slice. `walk` finds units with the
    /// [`FrameScan`] it is given and returns how many leading bytes (whole
    /// units it was given) it has dealt with; the rest is kept.
    pub fn scan_fresh<R>(
        &mut self,
        fresh: &[u8],
        walk: impl FnOnce(&[u8], &mut FrameScan, Option<(&Bytes, usize)>) -> (usize, R),
    ) -> R {
        if self.buf.is_empty() {
            let (used, result) = walk(fresh, &mut self.scan, None);
            self.scan.consumed(used);
            self.buf.extend_from_slice(&fresh[used..]);
            return result;
        }
        self.buf.extend_from_slice(fresh);
        let allocation = self.buf.capacity();
        // Taken whole, spare room included, so that the rest can be handed
        // back below without a copy when nothing else kept these bytes.
        let held = std::mem::take(&mut self.buf).freeze();
        let (used, result) = walk(&held, &mut self.scan, Some((&held, allocation)));
        self.scan.consumed(used);
        // The rest stays, in place (with the room reserved after it) unless
        // `walk` kept some of the bytes or the rest is small in a large
        // buffer (after a large message); an empty buffer holds no memory.
        self.buf = if used < held.len() {
            let rest = held.slice(used..);
            drop(held);
            if is_oversized(allocation, rest.len()) {
                BytesMut::from(&rest[..])
            } else {
                rest.try_into_mut()
                    .unwrap_or_else(|rest| BytesMut::from(&rest[..]))
            }
        } else {
            BytesMut::new()
        };
        result
    }

    /// The first `len` bytes, left where they are: whole units already
    /// returned, to look at before taking or leaving them.
    pub fn buffered_front(&self, len: usize) -> &[u8] {
        &self.buf[..len.min(self.buf.len())]
    }

    /// Hand over the first `len` bytes: whole units already returned.
    pub fn take(&mut self, len: usize) -> Bytes {
        self.scan.consumed(len);
        let taken = self.buf.split_to(len).freeze();
        self.release_spare();
        taken
    }

    /// Drop the first `len` bytes: whole units already returned.
    pub fn skip(&mut self, len: usize) {
        self.scan.consumed(len);
        self.buf.advance(len);
        self.release_spare();
    }

    /// Drop what is buffered, and the buffer (nothing more will be read as
    /// frames).
    pub fn clear(&mut self) {
        self.scan.unit_start = 0;
        self.scan.cursor = 0;
        self.scan.partial = None;
        self.buf = BytesMut::new();
    }

    /// Bytes of memory the buffer holds.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// An empty buffer gives its memory back (an idle session holds none),
    /// and a large one that holds little is shrunk to fit.
    fn release_spare(&mut self) {
        if self.buf.is_empty() {
            if self.buf.capacity() > 0 {
                self.buf = BytesMut::new();
            }
        } else if is_oversized(self.buf.capacity(), self.buf.len()) {
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }
}

/// A read buffer at least this big that holds under a quarter of it is
/// shrunk to fit: a large message has gone, its buffer should too.
const SHRINK_ABOVE: usize = 64 * 1024;

fn is_oversized(capacity: usize, len: usize) -> bool {
    capacity > SHRINK_ABOVE && len < capacity / 4
}

impl FrameScan {
    /// The next whole unit in `data` after those already returned, or
    /// `None` until more bytes arrive. `data` is the bytes not consumed yet,
    /// from the first: the same bytes as last time, perhaps with more after
    /// them. A violation leaves the scan where it was.
    pub fn next_unit(&mut self, data: &[u8]) -> Result<Option<Unit>, Violation> {
        loop {
            let rest = &data[self.cursor..];
            let Some(header) = parse_header(rest, self.masked, self.max_message)? else {
                return Ok(None);
            };
            if rest.len() < header.frame_len() {
                return Ok(None);
            }
            let payload = &rest[header.header_len..header.frame_len()];
            let frame_start = self.cursor;
            let unit = match header.opcode {
                OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                    let mut partial = match (header.opcode, self.partial) {
                        (OP_CONTINUATION, Some(p)) => p,
                        (OP_CONTINUATION, None) | (_, Some(_)) => {
                            return Err(Violation::Protocol);
                        }
                        (opcode, None) => Partial {
                            text: opcode == OP_TEXT,
                            payload: 0,
                            utf8: Utf8Check::default(),
                        },
                    };
                    partial.payload += header.payload_len;
                    if partial.payload > self.max_message {
                        return Err(Violation::TooBig);
                    }
                    if partial.text
                        && self.check_utf8
                        && !(check_utf8_piece(&mut partial.utf8, payload, header.mask)
                            && (!header.fin || partial.utf8.finish()))
                    {
                        return Err(Violation::InvalidUtf8);
                    }
                    if header.fin {
                        self.partial = None;
                        Some(Unit::Message {
                            len: 0,
                            payload: partial.payload,
                        })
                    } else {
                        self.partial = Some(partial);
                        None
                    }
                }
                OP_PING => Some(Unit::Ping { len: 0 }),
                OP_PONG => {
                    let mut p = [0u8; MAX_CONTROL_PAYLOAD];
                    let p = &mut p[..payload.len()];
                    p.copy_from_slice(payload);
                    if let Some(key) = header.mask {
                        apply_mask(p, key, 0);
                    }
                    let own = p == KEEPALIVE
                        || (p.len() == WATERMARK_PAYLOAD_LEN && p.starts_with(WATERMARK_PREFIX))
                        || p.starts_with(ACK_PREFIX);
                    Some(Unit::Pong { len: 0, own })
                }
                _ => {
                    let mut p = [0u8; MAX_CONTROL_PAYLOAD];
                    let p = &mut p[..payload.len()];
                    p.copy_from_slice(payload);
                    if let Some(key) = header.mask {
                        apply_mask(p, key, 0);
                    }
                    let frame = parse_close(p)?;
                    Some(Unit::Close { len: 0, frame })
                }
            };
            self.cursor = frame_start + header.frame_len();
            let Some(unit) = unit else { continue };
            if self.partial.is_some() {
                // A control frame between fragments rides with the message;
                // a close abandons it (its fragments go with the close).
                if !matches!(unit, Unit::Close { .. }) {
                    continue;
                }
                self.partial = None;
            }
            let len = self.cursor - self.unit_start;
            self.unit_start = self.cursor;
            return Ok(Some(match unit {
                Unit::Message { payload, .. } => Unit::Message { len, payload },
                Unit::Ping { .. } => Unit::Ping { len },
                Unit::Pong { own, .. } => Unit::Pong { len, own },
                Unit::Close { frame, .. } => Unit::Close { len, frame },
            }));
        }
    }

    /// Walk the run of common-case units from here: whole messages in one
    /// frame of at most 65,535 bytes that pass their checks, as long as
    /// `accept` takes each payload length. Stops at anything else, which
    /// [`FrameScan::next_unit`] then deals with (and reports, if it breaks
    /// a rule). This is the relay's per-message path: a few header bytes per
    /// message and no bookkeeping.
    #[inline]
    pub fn plain_run(&mut self, data: &[u8], mut accept: impl FnMut(usize) -> bool) -> PlainRun {
        let mut run = PlainRun::default();
        if self.partial.is_some() {
            return run;
        }
        let (mask_bit, mask_len) = if self.masked { (0x80, 4) } else { (0, 0) };
        let (check_text, max_message) = (self.check_utf8, self.max_message);
        let start = self.cursor;
        let mut at = start;
        while let Some(&[b0, b1]) = data.get(at..at + 2) {
            // FIN with text or binary, and the mask bit this side must use.
            let text = b0 == 0x80 | OP_TEXT;
            if (!text && b0 != 0x80 | OP_BINARY) || b1 & 0x80 != mask_bit {
                break;
            }
            let (payload, header) = match b1 & 0x7F {
                126 => match data.get(at + 2..at + 4) {
                    Some(&[hi, lo]) => (u16::from_be_bytes([hi, lo]) as usize, 4 + mask_len),
                    _ => break,
                },
                127 => break,
                short => (short as usize, 2 + mask_len),
            };
            let len = header + payload;
            if payload > max_message || data.len() - at < len {
                break;
            }
            if text && check_text && !is_utf8_payload(&data[at..at + len], header) {
                break;
            }
            if !accept(payload) {
                break;
            }
            at += len;
            run.messages += 1;
            run.payload += payload;
        }
        run.len = at - start;
        self.cursor = at;
        self.unit_start = at;
        run
    }

    /// The first `len` bytes (whole units already returned) are gone.
    fn consumed(&mut self, len: usize) {
        debug_assert!(len <= self.unit_start);
        self.unit_start -= len;
        self.cursor -= len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = encode(opcode, payload, Some(KEY)).to_vec();
        if !fin {
            f[0] &= 0x7F;
        }
        f
    }

    fn reader(bytes: &[u8]) -> FrameReader {
        FrameReader::client(1024, bytes.to_vec())
    }

    #[test]
    fn masking_round_trips_at_any_offset() {
        let data: Vec<u8> = (0..=40).collect();
        for offset in 0..8 {
            let mut masked = data.clone();
            apply_mask(&mut masked, KEY, offset);
            for (i, (m, d)) in masked.iter().zip(&data).enumerate() {
                assert_eq!(*m, d ^ KEY[(offset + i) % 4]);
            }
        }
    }

    #[test]
    fn a_whole_text_message_is_one_unit() {
        let f = client_frame(true, OP_TEXT, b"hello");
        let mut r = reader(&f);
        assert_eq!(
            r.next_unit(),
            Ok(Some(Unit::Message {
                len: f.len(),
                payload: 5
            }))
        );
        assert_eq!(r.next_unit(), Ok(None));
        assert_eq!(r.take(f.len()).as_ref(), &f[..]);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn fragments_and_a_ping_between_them_make_one_message() {
        let mut bytes = client_frame(false, OP_TEXT, b"hel");
        bytes.extend(client_frame(true, OP_PING, b"p"));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"lo"));
        bytes.extend(client_frame(true, OP_PONG, KEEPALIVE));
        let mut r = reader(&bytes);
        let Some(Unit::Message { len, payload: 5 }) = r.next_unit().unwrap() else {
            panic!("expected a message");
        };
        assert_eq!(
            r.next_unit(),
            Ok(Some(Unit::Pong {
                len: bytes.len() - len,
                own: true
            }))
        );
    }

    #[test]
    fn a_watermark_pong_is_the_routers_own_and_carries_its_count_back() {
        let ping = encode(OP_PING, &watermark_payload(1234), None);
        let pong = encode(OP_PONG, &ping[2..], None);
        let mut r = FrameReader::backend(1 << 20, pong.to_vec());
        assert_eq!(
            r.next_unit(),
            Ok(Some(Unit::Pong {
                len: pong.len(),
                own: true
            }))
        );
        assert_eq!(watermark_of(&pong), Some(1234));
        assert_eq!(watermark_of(&encode(OP_PONG, KEEPALIVE, None)), None);
        assert_eq!(
            watermark_of(&encode(OP_PONG, b"wsrouter-wm:1234567", None)),
            None
        );
    }

    #[test]
    fn an_acknowledgement_pong_is_the_routers_own_and_carries_a_count_or_is_malformed() {
        let ack = encode(OP_PONG, b"wsrouter-ack 42", None);
        let mut r = FrameReader::backend(1 << 20, ack.to_vec());
        assert_eq!(
            r.next_unit(),
            Ok(Some(Unit::Pong {
                len: ack.len(),
                own: true
            }))
        );
        assert_eq!(ack_of(&ack), Some(Ack::Count(42)));
        let malformed: [&[u8]; 4] = [
            b"wsrouter-ack ",
            b"wsrouter-ack -1",
            b"wsrouter-ack 4x",
            b"wsrouter-ack 99999999999999999999",
        ];
        for bad in malformed {
            assert_eq!(
                ack_of(&encode(OP_PONG, bad, None)),
                Some(Ack::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(ack_of(&encode(OP_PONG, b"hello", None)), None);
    }

    #[test]
    fn violations_name_their_close_codes() {
        let cases: Vec<(Vec<u8>, Violation)> = vec![
            (encode(OP_TEXT, b"hi", None).to_vec(), Violation::Protocol),
            (vec![0x83, 0x80, 0, 0, 0, 0], Violation::Protocol),
            (vec![0xC1, 0x80, 0, 0, 0, 0], Violation::Protocol),
            (client_frame(false, OP_PING, b"x"), Violation::Protocol),
            (client_frame(true, OP_PING, &[0; 126]), Violation::Protocol),
            (
                client_frame(true, OP_CONTINUATION, b"x"),
                Violation::Protocol,
            ),
            (
                client_frame(true, OP_TEXT, &[0xff, 0xfe]),
                Violation::InvalidUtf8,
            ),
            (client_frame(true, OP_BINARY, &[0; 2000]), Violation::TooBig),
            (client_frame(true, OP_CLOSE, &[3]), Violation::Protocol),
            (
                client_frame(true, OP_CLOSE, &[0x03, 0xEE]),
                Violation::Protocol,
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(reader(&bytes).next_unit(), Err(expected), "{bytes:x?}");
        }
        // A new message while one is unfinished.
        let mut bytes = client_frame(false, OP_TEXT, b"a");
        bytes.extend(client_frame(true, OP_TEXT, b"b"));
        assert_eq!(reader(&bytes).next_unit(), Err(Violation::Protocol));
        // Too big across fragments.
        let mut bytes = client_frame(false, OP_BINARY, &[0; 600]);
        bytes.extend(client_frame(true, OP_CONTINUATION, &[0; 600]));
        assert_eq!(reader(&bytes).next_unit(), Err(Violation::TooBig));
        // A backend must not mask.
        let masked = client_frame(true, OP_TEXT, b"x");
        let mut r = FrameReader::backend(1024, masked);
        assert_eq!(r.next_unit(), Err(Violation::Protocol));
    }

    #[test]
    fn a_close_inside_a_fragmented_message_abandons_it() {
        let mut bytes = client_frame(false, OP_TEXT, b"ab");
        bytes.extend(client_frame(true, OP_CLOSE, &[]));
        let close_len = bytes.len();
        bytes.extend(client_frame(true, OP_CONTINUATION, b"cd"));
        let mut r = reader(&bytes);
        assert_eq!(
            r.next_unit(),
            Ok(Some(Unit::Close {
                len: close_len,
                frame: None
            }))
        );
        r.skip(close_len);
        // Nothing left to continue.
        assert_eq!(r.next_unit(), Err(Violation::Protocol));
    }

    #[test]
    fn a_close_frame_is_read_with_its_code_and_reason() {
        let payload = close_payload(Some(&CloseFrame {
            code: 4000,
            reason: "bye".into(),
        }));
        let f = client_frame(true, OP_CLOSE, &payload);
        let Ok(Some(Unit::Close { frame, .. })) = reader(&f).next_unit() else {
            panic!("expected a close");
        };
        assert_eq!(
            frame,
            Some(CloseFrame {
                code: 4000,
                reason: "bye".into()
            })
        );
    }

    #[test]
    fn long_close_reasons_are_cut_on_a_character() {
        let reason = "é".repeat(100);
        let payload = close_payload(Some(&CloseFrame { code: 1000, reason }));
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    fn arb_message() -> impl Strategy<Value = (bool, Vec<u8>, usize)> {
        // (text, payload, fragments)
        prop_oneof![
            ("[a-zé€😀 ]{0,300}", 1..4usize).prop_map(|(s, n)| (true, s.into_bytes(), n)),
            (prop::collection::vec(any::<u8>(), 0..70_000), 1..4usize)
                .prop_map(|(b, n)| (false, b, n)),
        ]
    }

    /// Frames for a message cut into `fragments` pieces at any byte (text
    /// may be cut inside a character, as the RFC allows).
    fn frames_of(text: bool, payload: &[u8], fragments: usize) -> Vec<u8> {
        let size = payload.len().div_ceil(fragments).max(1);
        let pieces: Vec<&[u8]> = if payload.is_empty() {
            vec![&[][..]]
        } else {
            payload.chunks(size).collect()
        };
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let opcode = match (i, text) {
                (0, true) => OP_TEXT,
                (0, false) => OP_BINARY,
                _ => OP_CONTINUATION,
            };
            out.extend(client_frame(i + 1 == pieces.len(), opcode, piece));
        }
        out
    }

    /// Any client frame: data, continuation or control, fragment or not,
    /// with a payload that may or may not be UTF-8 or fit the limits.
    fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
        let opcodes = vec![OP_TEXT, OP_BINARY, OP_CONTINUATION, OP_PING, OP_PONG];
        let payload = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            "[a-zé€]{0,60}".prop_map(String::into_bytes),
        ];
        (any::<bool>(), prop::sample::select(opcodes), payload)
            .prop_map(|(fin, opcode, payload)| client_frame(fin, opcode, &payload))
    }

    /// The units a client reader finds in `stream`, trying the short path
    /// first when `plain_first`, and the violation that stopped it.
    fn units_of(stream: &[u8], max: usize, plain_first: bool) -> (Vec<Unit>, Option<Violation>) {
        let mut r = FrameReader::client(max, stream.to_vec());
        let mut units = Vec::new();
        loop {
            if plain_first {
                // One message at a time, to see each unit's boundaries.
                let mut taken = false;
                let run = r
                    .scan
                    .plain_run(&r.buf, |_| !std::mem::replace(&mut taken, true));
                if run.messages == 1 {
                    units.push(Unit::Message {
                        len: run.len,
                        payload: run.payload,
                    });
                    continue;
                }
            }
            match r.next_unit() {
                Ok(Some(unit)) => units.push(unit),
                Ok(None) => return (units, None),
                Err(violation) => return (units, Some(violation)),
            }
        }
    }

    /// The units a client reader finds in `stream`, taking whole runs of
    /// common-case messages at a time (each run as one message unit).
    fn runs_of(stream: &[u8], max: usize) -> (Vec<Unit>, Option<Violation>) {
        let mut r = FrameReader::client(max, stream.to_vec());
        let mut units = Vec::new();
        loop {
            let run = r.scan.plain_run(&r.buf, |_| true);
            if run.messages > 0 {
                units.push(Unit::Message {
                    len: run.len,
                    payload: run.payload,
                });
            }
            match r.next_unit() {
                Ok(Some(unit)) => units.push(unit),
                Ok(None) => return (units, None),
                Err(violation) => return (units, Some(violation)),
            }
        }
    }

    /// Consecutive messages as one.
    fn merge_messages(units: Vec<Unit>) -> Vec<Unit> {
        let mut merged: Vec<Unit> = Vec::new();
        for unit in units {
            match (merged.last_mut(), unit) {
                (
                    Some(Unit::Message { len, payload }),
                    Unit::Message {
                        len: more,
                        payload: more_payload,
                    },
                ) => {
                    *len += more;
                    *payload += more_payload;
                }
                (_, unit) => merged.push(unit),
            }
        }
        merged
    }

    proptest! {
        /// However the bytes arrive, the reader finds the same messages,
        /// each spanning exactly its frames, and hands them on unchanged.
        #[test]
        fn messages_are_found_whole_however_the_bytes_arrive(
            messages in prop::collection::vec(arb_message(), 1..6),
            cuts in prop::collection::vec(1..5000usize, 0..20),
        ) {
            let framed: Vec<Vec<u8>> = messages.iter().map(|(t, p, n)| frames_of(*t, p, *n)).collect();
            let stream: Vec<u8> = framed.concat();
            let mut r = FrameReader::client(100_000, Vec::new());
            let mut found = Vec::new();
            let mut fed = 0;
            let mut cuts = cuts.into_iter();
            while fed < stream.len() {
                let n = cuts.next().unwrap_or(stream.len()).min(stream.len() - fed);
                r.buffer_mut().extend_from_slice(&stream[fed..fed + n]);
                fed += n;
                while let Some(unit) = r.next_unit().expect("valid stream") {
                    let Unit::Message { len, payload } = unit else { panic!("{unit:?}") };
                    found.push((r.take(len).to_vec(), payload));
                }
            }
            prop_assert_eq!(found.len(), messages.len());
            for ((bytes, payload), (frames, (_, original, _))) in found.iter().zip(framed.iter().zip(&messages)) {
                prop_assert_eq!(bytes, frames);
                prop_assert_eq!(*payload, original.len());
            }
            prop_assert_eq!(r.buffered(), 0);
        }

        /// The relay's short path finds what the full one finds, and leaves
        /// to it every frame it does not handle: for any mix of frames,
        /// valid or not, both give the same units and the same violation.
        #[test]
        fn the_plain_message_path_agrees_with_the_full_one(
            frames in prop::collection::vec(arb_frame(), 1..12),
            small_limit in any::<bool>(),
        ) {
            let stream = frames.concat();
            let max = if small_limit { 100 } else { 100_000 };
            let full = units_of(&stream, max, false);
            prop_assert_eq!(&units_of(&stream, max, true), &full);
            // Whole runs at a time: the same bytes in the same messages.
            let merged = |(units, end): (Vec<Unit>, Option<Violation>)| (merge_messages(units), end);
            prop_assert_eq!(merged(runs_of(&stream, max)), merged(full));
        }

        /// The incremental check agrees with the standard library however
        /// the bytes are cut.
        #[test]
        fn utf8_check_agrees_with_std(bytes in prop::collection::vec(any::<u8>(), 0..40), cut in 0..40usize, valid_text in "[a-zé€😀]{0,10}") {
            for input in [bytes.clone(), valid_text.into_bytes()] {
                let cut = cut.min(input.len());
                let mut check = Utf8Check::default();
                let ok = check.feed(&input[..cut]) && check.feed(&input[cut..]) && check.finish();
                prop_assert_eq!(ok, std::str::from_utf8(&input).is_ok(), "{:x?}", input);
            }
        }
    }

    #[test]
    fn a_fragmented_masked_message_decodes_to_its_payload() {
        let mut frames = BytesMut::new();
        let first = encode(OP_TEXT, b"42[\"ev\",", Some([1, 2, 3, 4]));
        let mut first = first.to_vec();
        first[0] &= 0x7F; // not the last frame
        frames.extend_from_slice(&first);
        frames.extend_from_slice(&encode(OP_PING, b"p", Some([9, 9, 9, 9])));
        frames.extend_from_slice(&{
            let mut last = encode(OP_TEXT, b"1]", Some([5, 6, 7, 8])).to_vec();
            last[0] = 0x80 | OP_CONTINUATION;
            last
        });
        assert_eq!(
            message_payload(&frames),
            (OP_TEXT, b"42[\"ev\",1]".to_vec())
        );
        assert_eq!(
            message_payload(&encode(OP_BINARY, b"\x01", None)),
            (OP_BINARY, vec![1])
        );
    }
}
