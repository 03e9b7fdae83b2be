//! One side of a session at the frame level: its socket, a [`FrameReader`]
//! over what was read from it, and the bytes waiting to be written to it.
//!
//! Reads go to a buffer shared by the sessions of a thread first. The relay
//! forwards whole units from there and copies only what is left over (an
//! unfinished frame) into the peer's own buffer, so a quiet peer holds no
//! read buffer. Once a frame's header says a large payload is coming, the
//! rest is read straight into the peer's buffer, which grows (64 KiB at a
//! time) as the bytes arrive. Writes go straight to the socket when nothing
//! waits before them; what the socket does not take is queued.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::wire::frame::{self, CloseFrame, FrameReader, OP_CLOSE, Unit, Violation};

/// Bytes read from a socket at a time into the thread's read buffer.
const READ_CHUNK: usize = 16 * 1024;

/// A frame still missing at least this much is read straight into a heap
/// buffer reserved for it, not through the thread's read buffer.
const DIRECT_READ_MIN: usize = 4 * 1024;

/// Most bytes reserved ahead of one read. A header only *claims* a length;
/// memory grows with the bytes that actually arrive, so a peer cannot make
/// the router reserve `max_message_bytes` with a 14-byte header.
const DIRECT_READ_MAX: usize = 64 * 1024;

/// Most bytes read and dropped after a close that answers a violation
/// (within the close timeout); past it the connection is dropped.
const LINGER_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Which end of the session a peer is; it decides masking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The visitor: its frames are masked, the router's to it are not.
    Client,
    /// A backend: the router is its client and masks what it sends.
    Backend,
}

/// Why reading a peer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// End of stream or a socket error, without a close frame.
    Lost,
    /// The peer broke the protocol or a limit.
    Violation(Violation),
}

thread_local! {
    /// Where reads land first: one buffer per thread, which the sessions on
    /// the thread take turns with, so a session holds no read buffer of its
    /// own and no read pays for zeroing one.
    static READ_SCRATCH: RefCell<[u8; READ_CHUNK]> = const { RefCell::new([0; READ_CHUNK]) };
}

/// Run `f` with this thread's read buffer. Not re-entrant: `f` must not
/// call it again.
pub fn with_read_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_SCRATCH.with_borrow_mut(|scratch| f(scratch))
}

/// A socket that can say, without a system call and without registering a
/// waker, that it surely has nothing to read yet.
pub trait ReadHint {
    /// False only when nothing arrived since the socket was last found
    /// empty: the waker that read was given is then still registered.
    fn may_have_data(&self) -> bool {
        true
    }
}

/// What one read brought.
pub enum Fresh<'a> {
    /// Bytes read into the caller's buffer (the thread's read buffer).
    Bytes(&'a [u8]),
    /// This many bytes read straight into the reader's buffer.
    InBuffer(usize),
}

/// A socket with its frame reader and write queue.
pub struct Peer<S> {
    pub io: S,
    pub reader: FrameReader,
    /// Bytes to write, in order.
    out: Bytes,
    /// Written to the socket object but not flushed (TLS buffers).
    unflushed: bool,
    /// The last read found the socket empty (and registered the waker).
    pub read_waiting: bool,
    side: Side,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Peer<S> {
    /// The visitor's side; `already_read` are bytes that followed its
    /// upgrade request.
    pub fn client(io: S, max_message: usize, already_read: Vec<u8>) -> Peer<S> {
        Peer::new(
            io,
            FrameReader::client(max_message, already_read),
            Side::Client,
        )
    }

    /// A backend's side; `already_read` are bytes that followed its 101.
    pub fn backend(io: S, max_message: usize, already_read: Vec<u8>) -> Peer<S> {
        Peer::new(
            io,
            FrameReader::backend(max_message, already_read),
            Side::Backend,
        )
    }

    fn new(io: S, reader: FrameReader, side: Side) -> Peer<S> {
        Peer {
            io,
            reader,
            out: Bytes::new(),
            unflushed: false,
            read_waiting: false,
            side,
        }
    }

    /// A frame from the router to this peer: masked toward a backend.
    pub fn frame(&self, opcode: u8, payload: &[u8]) -> Bytes {
        let mask = match self.side {
            Side::Client => None,
            Side::Backend => Some(rand::random()),
        };
        frame::encode(opcode, payload, mask)
    }

    /// Queue bytes to write after what is already queued.
    pub fn queue(&mut self, bytes: Bytes) {
        if self.out.is_empty() {
            self.out = bytes;
        } else {
            let mut joined = BytesMut::with_capacity(self.out.len() + bytes.len());
            joined.extend_from_slice(&self.out);
            joined.extend_from_slice(&bytes);
            self.out = joined.freeze();
        }
    }

    /// Bytes of memory this side holds: its read buffer and its write
    /// queue.
    pub fn held_bytes(&self) -> usize {
        self.reader.capacity() + self.out.len()
    }

    /// The bytes waiting to be written to this side.
    pub fn unwritten(&self) -> &[u8] {
        &self.out
    }

    /// Whether bytes wait to be written to this side (it is behind).
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// How much the next read may grow the read buffer by: a read through
    /// the thread's buffer copies at most [`READ_CHUNK`] of leftovers, a
    /// read straight into the buffer may double it (see
    /// [`Peer::poll_read_chunk`]).
    pub fn read_growth(&self) -> usize {
        if self.reader.buffered() == 0 {
            return 0;
        }
        let wanted = self.reader.wanted();
        if wanted < DIRECT_READ_MIN {
            return 0;
        }
        let capacity = self.reader.capacity();
        let spare = capacity - self.reader.buffered();
        if spare >= DIRECT_READ_MIN {
            0
        } else {
            capacity.max(wanted.min(DIRECT_READ_MAX))
        }
    }

    /// Queue a close frame, to be written with what is queued before it.
    pub fn queue_close(&mut self, close: &CloseFrame) {
        self.queue(self.frame(OP_CLOSE, &frame::close_payload(Some(close))));
    }

    /// Write and flush everything queued.
    pub fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
            self.unflushed = true;
        }
        if self.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Read what the socket has into the reader; `Ok(0)` at end of stream.
    pub fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        with_read_scratch(|scratch| {
            let fresh = match ready!(self.poll_read_chunk(cx, scratch))? {
                Some(Fresh::Bytes(fresh)) => fresh,
                Some(Fresh::InBuffer(n)) => return Poll::Ready(Ok(n)),
                None => return Poll::Ready(Ok(0)),
            };
            self.reader.buffer_mut().extend_from_slice(fresh);
            Poll::Ready(Ok(fresh.len()))
        })
    }

    /// Read what the socket has, into `scratch` (see [`with_read_scratch`];
    /// the caller hands the bytes to the reader with
    /// [`FrameReader::scan_fresh`](crate::wire::frame::FrameReader::scan_fresh)),
    /// or, once a frame's header says a large payload is coming, straight
    /// into the reader's buffer. `None` at end of stream.
    pub fn poll_read_chunk<'a>(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &'a mut [u8],
    ) -> Poll<io::Result<Option<Fresh<'a>>>> {
        let wanted = self.reader.wanted();
        if wanted >= DIRECT_READ_MIN {
            let buf = self.reader.buffer_mut();
            if buf.capacity() - buf.len() < DIRECT_READ_MIN {
                buf.reserve(wanted.min(DIRECT_READ_MAX));
            }
            // read_buf is cancel-safe: a pending read leaves nothing behind.
            let read = std::pin::pin!(self.io.read_buf(buf)).poll(cx);
            self.read_waiting = read.is_pending();
            let n = ready!(read)?;
            return Poll::Ready(Ok((n > 0).then_some(Fresh::InBuffer(n))));
        }
        let mut chunk = ReadBuf::new(scratch);
        let read = Pin::new(&mut self.io).poll_read(cx, &mut chunk);
        self.read_waiting = read.is_pending();
        ready!(read)?;
        let filled = chunk.filled().len();
        Poll::Ready(Ok((filled > 0).then_some(Fresh::Bytes(&scratch[..filled]))))
    }

    /// Write `bytes` now, behind anything already queued: straight to the
    /// socket when nothing is, and whatever the socket does not take at once
    /// is queued (copied). A write error is returned; the bytes are lost
    /// with the connection.
    pub fn write_or_queue(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> io::Result<()> {
        let mut rest = bytes;
        if self.out.is_empty() {
            while !rest.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, rest) {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => {
                        rest = &rest[n..];
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => break,
                }
            }
        }
        if !rest.is_empty() {
            self.queue(Bytes::copy_from_slice(rest));
        }
        Ok(())
    }

    /// Write what is queued (best effort), then return the next unit,
    /// reading as needed. The caller takes or skips the unit's bytes.
    pub fn poll_next_unit(&mut self, cx: &mut Context<'_>) -> Poll<Result<Unit, ReadEnd>> {
        let _ = self.poll_write_out(cx);
        loop {
            match self.reader.next_unit() {
                Ok(Some(unit)) => return Poll::Ready(Ok(unit)),
                Ok(None) => {}
                Err(violation) => return Poll::Ready(Err(ReadEnd::Violation(violation))),
            }
            match ready!(self.poll_read_more(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(Err(ReadEnd::Lost)),
                Ok(_) => {}
            }
        }
    }

    pub async fn next_unit(&mut self) -> Result<Unit, ReadEnd> {
        poll_fn(|cx| self.poll_next_unit(cx)).await
    }

    /// Queue `bytes` and write everything queued.
    pub async fn send(&mut self, bytes: Bytes) -> io::Result<()> {
        self.queue(bytes);
        poll_fn(|cx| self.poll_write_out(cx)).await
    }

    /// Send a close frame (if the socket still takes one) and wait, bounded,
    /// for the peer's, discarding anything else it sends meanwhile. When
    /// what the peer sends can no longer be read as frames (the close
    /// answers a violation), the rest is drained: see [`Peer::linger`].
    pub async fn finish_close(&mut self, close: Option<&CloseFrame>, timeout: Duration) {
        let frame = self.frame(OP_CLOSE, &frame::close_payload(close));
        let _ = tokio::time::timeout(timeout, async {
            if self.send(frame).await.is_err() {
                return;
            }
            loop {
                match self.next_unit().await {
                    Ok(Unit::Close { .. }) | Err(ReadEnd::Lost) => return,
                    Ok(unit) => self.reader.skip(unit.len()),
                    Err(ReadEnd::Violation(_)) => return self.linger().await,
                }
            }
        })
        .await;
    }

    /// A lingering close, as HTTP servers do it: after the close frame, end
    /// the write side and read and drop what the peer still sends (up to
    /// [`LINGER_MAX_BYTES`]) until it closes. Dropping the socket with the
    /// peer's bytes unread would make the kernel answer with a reset, which
    /// destroys the close frame still on its way to the peer.
    async fn linger(&mut self) {
        self.reader.clear();
        let _ = self.io.shutdown().await;
        let mut sink = vec![0u8; READ_CHUNK];
        let mut left = LINGER_MAX_BYTES;
        while left > 0 {
            match self.io.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }

    /// Answer a peer's close frame with the same code, without waiting.
    pub async fn echo_close(&mut self, close: Option<&CloseFrame>, timeout: Duration) {
        let frame = self.frame(OP_CLOSE, &frame::close_payload(close));
        let _ = tokio::time::timeout(timeout, self.send(frame)).await;
    }
}

/// A close frame with a fixed reason.
pub fn close(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_claimed_length_reserves_memory_only_as_bytes_arrive() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut peer = Peer::client(near, 1 << 20, Vec::new());
        // A masked binary frame header claiming 1 MiB, then a trickle.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend((1u64 << 20).to_be_bytes());
        header.extend([1, 2, 3, 4]);
        far.write_all(&header).await.unwrap();
        poll_fn(|cx| peer.poll_read_more(cx)).await.unwrap();
        for _ in 0..3 {
            far.write_all(&[0u8; 100]).await.unwrap();
            poll_fn(|cx| peer.poll_read_more(cx)).await.unwrap();
        }
        let capacity = peer.reader.buffer_mut().capacity();
        assert!(
            capacity <= 2 * DIRECT_READ_MAX,
            "{capacity} bytes reserved for 314 received"
        );
        assert_eq!(peer.reader.buffered(), header.len() + 300);
    }
}
