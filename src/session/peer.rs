//! One side of a session at the frame level: its socket, a [`FrameReader`]
//! over what was read from it, and the bytes waiting to be written to it.
//!
//! Reads go to a stack buffer first and only what arrived is copied to the
//! heap, so a quiet peer holds no read buffer; once a frame's header says a
//! large payload is coming, the rest is read straight into the heap buffer,
//! which grows (64 KiB at a time) as the bytes arrive. Writes are whole units (or the router's own frames), queued as
//! reference-counted bytes and written without copying.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::frame::{self, CloseFrame, FrameReader, OP_CLOSE, Unit, Violation};

/// Bytes read from a socket at a time into the stack buffer.
const READ_CHUNK: usize = 16 * 1024;

/// A frame still missing at least this much is read straight into a heap
/// buffer reserved for it, not through the stack buffer.
const DIRECT_READ_MIN: usize = 4 * 1024;

/// Most bytes reserved ahead of one read. A header only *claims* a length;
/// memory grows with the bytes that actually arrive, so a peer cannot make
/// the router reserve `max_message_bytes` with a 14-byte header.
const DIRECT_READ_MAX: usize = 64 * 1024;

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

/// A socket with its frame reader and write queue.
pub struct Peer<S> {
    pub io: S,
    pub reader: FrameReader,
    /// Bytes to write, in order.
    out: Bytes,
    /// Written to the socket object but not flushed (TLS buffers).
    unflushed: bool,
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
        let wanted = self.reader.wanted();
        if wanted >= DIRECT_READ_MIN {
            let buf = self.reader.buffer_mut();
            if buf.capacity() - buf.len() < DIRECT_READ_MIN {
                buf.reserve(wanted.min(DIRECT_READ_MAX));
            }
            // read_buf is cancel-safe: a pending read leaves nothing behind.
            let read = self.io.read_buf(buf);
            return std::pin::pin!(read).poll(cx);
        }
        let mut stack = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
        let mut chunk = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut chunk))?;
        let filled = chunk.filled();
        self.reader.buffer_mut().extend_from_slice(filled);
        Poll::Ready(Ok(filled.len()))
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
    /// for the peer's, discarding anything else it sends meanwhile.
    pub async fn finish_close(&mut self, close: Option<&CloseFrame>, timeout: Duration) {
        let frame = self.frame(OP_CLOSE, &frame::close_payload(close));
        let _ = tokio::time::timeout(timeout, async {
            if self.send(frame).await.is_err() {
                return;
            }
            while let Ok(unit) = self.next_unit().await {
                if matches!(unit, Unit::Close { .. }) {
                    break;
                }
                self.reader.skip(unit.len());
            }
        })
        .await;
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
