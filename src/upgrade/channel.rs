//! The hand-over channel between the old and the new router process: a
//! Unix stream socket. The old process listens on an abstract socket with
//! an unguessable name ([`Rendezvous`]), names it to the new process in
//! its environment, and takes one connection, from that process only (the
//! kernel's peer credentials say who connected). Each message is a 4-byte
//! big-endian length and that many bytes of JSON, then a 4-byte length and
//! that many raw bytes (what the JSON describes: a session's buffers),
//! sent with the file descriptors that go with it attached (`SCM_RIGHTS`)
//! to its first bytes.
//! Blocking: both sides use it from a blocking thread.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::Duration;

use tokio::time::Instant;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 64;

/// Largest JSON part read (it describes the descriptors and the bytes).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Largest raw part read (a session's buffers and replay window).
const MAX_BLOB_BYTES: usize = 1 << 30;

/// Where the old process waits for the new one to connect.
#[derive(Debug)]
pub struct Rendezvous {
    listener: UnixListener,
    name: String,
}

impl Rendezvous {
    /// Listen on a new abstract socket.
    pub fn open() -> io::Result<Rendezvous> {
        let name = format!(
            "wsrouter-upgrade-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(&name)?)?;
        listener.set_nonblocking(true)?;
        Ok(Rendezvous { listener, name })
    }

    /// The name to give the new process ([`Channel::connect`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection of process `pid`, within `timeout`; connections
    /// from any other process are dropped. `gone` is asked between tries
    /// whether to give up (the process exited).
    pub fn accept_from(
        &self,
        pid: u32,
        timeout: Duration,
        mut gone: impl FnMut() -> bool,
    ) -> io::Result<Channel> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
                    if peer.pid.as_raw_nonzero().get() as u32 == pid {
                        stream.set_nonblocking(false)?;
                        return Ok(Channel(stream));
                    }
                    tracing::warn!(
                        peer_pid = peer.pid.as_raw_nonzero().get(),
                        "upgrade: a connection from another process was dropped"
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if gone() {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the new process exited before it connected",
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// One end of the hand-over channel.
#[derive(Debug)]
pub struct Channel(UnixStream);

impl Channel {
    /// Connect to the old process's rendezvous `name`.
    pub fn connect(name: &str) -> io::Result<Channel> {
        Ok(Channel(UnixStream::connect_addr(
            &SocketAddr::from_abstract_name(name)?,
        )?))
    }

    /// Bound every later receive.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(timeout)
    }

    /// Send `message` with `fds` attached.
    pub fn send<T: Serialize>(&self, message: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_with_bytes(message, &[], fds)
    }

    /// Send `message`, the raw `bytes` it describes, and `fds`.
    pub fn send_with_bytes<T: Serialize>(
        &self,
        message: &T,
        raw: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::other(format!(
                "{} descriptors in one hand-over message (at most {MAX_FDS})",
                fds.len()
            )));
        }
        let body = serde_json::to_vec(message).map_err(io::Error::other)?;
        let mut bytes = Vec::with_capacity(8 + body.len() + raw.len());
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&(raw.len() as u32).to_be_bytes());
        bytes.extend_from_slice(raw);
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            control.push(SendAncillaryMessage::ScmRights(fds));
        }
        let mut sent = rustix::net::sendmsg(
            &self.0,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        while sent < bytes.len() {
            let mut none = SendAncillaryBuffer::default();
            sent += rustix::net::sendmsg(
                &self.0,
                &[IoSlice::new(&bytes[sent..])],
                &mut none,
                SendFlags::NOSIGNAL,
            )?;
        }
        Ok(())
    }

    /// Receive one message and the descriptors that came with it.
    pub fn receive<T: DeserializeOwned>(&mut self) -> io::Result<(T, Vec<OwnedFd>)> {
        let (message, _, fds) = self.receive_with_bytes()?;
        Ok((message, fds))
    }

    /// Receive one message, its raw bytes and its descriptors.
    pub fn receive_with_bytes<T: DeserializeOwned>(
        &mut self,
    ) -> io::Result<(T, Vec<u8>, Vec<OwnedFd>)> {
        let mut len = [0u8; 4];
        let mut fds = Vec::new();
        let mut got = 0;
        // The descriptors ride on the message's first bytes; reading no
        // further than its length keeps the next message's apart.
        while got < len.len() {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = rustix::net::recvmsg(
                &self.0,
                &mut [IoSliceMut::new(&mut len[got..])],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    fds.extend(received);
                }
            }
            if received.flags.contains(ReturnFlags::CTRUNC) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more descriptors than a hand-over message may carry",
                ));
            }
            if received.bytes == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += received.bytes;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a hand-over message of {len} bytes"),
            ));
        }
        let mut body = vec![0; len];
        self.0.read_exact(&mut body)?;
        let message = serde_json::from_slice(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut raw_len = [0u8; 4];
        self.0.read_exact(&mut raw_len)?;
        let raw_len = u32::from_be_bytes(raw_len) as usize;
        if raw_len > MAX_BLOB_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a hand-over message with {raw_len} raw bytes"),
            ));
        }
        let mut raw = vec![0; raw_len];
        self.0.read_exact(&mut raw)?;
        Ok((message, raw, fds))
    }

    /// Another handle on the same socket (one thread reads while another
    /// writes).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel(self.0.try_clone()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn messages_carry_their_descriptors_and_stay_apart() {
        let rendezvous = Rendezvous::open().expect("rendezvous");
        let mut new = Channel::connect(rendezvous.name()).expect("connect");
        let mut old = rendezvous
            .accept_from(std::process::id(), Duration::from_secs(5), || false)
            .expect("accept");
        let (mut a, b) = UnixStream::pair().expect("pair");
        old.send(&"one socket", &[b.as_fd()]).expect("send");
        old.send_with_bytes(&vec![1, 2, 3], b"raw", &[])
            .expect("send");
        drop(b);
        let (first, fds): (String, _) = new.receive().expect("receive");
        assert_eq!((first.as_str(), fds.len()), ("one socket", 1));
        let (second, raw, none): (Vec<u32>, _, _) = new.receive_with_bytes().expect("receive");
        assert_eq!(
            (second, &raw[..], none.len()),
            (vec![1, 2, 3], &b"raw"[..], 0)
        );
        // The descriptor received is the same socket.
        let mut b = UnixStream::from(fds.into_iter().next().expect("b"));
        a.write_all(b"hi").expect("write");
        let mut got = [0; 2];
        b.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hi");
        new.send(&"back", &[]).expect("send");
        let (back, _): (String, _) = old.receive().expect("receive");
        assert_eq!(back, "back");
    }

    #[test]
    fn a_connection_from_another_process_is_not_taken() {
        let rendezvous = Rendezvous::open().expect("rendezvous");
        let _ours = Channel::connect(rendezvous.name()).expect("connect");
        let waited = rendezvous.accept_from(1, Duration::from_millis(100), || false);
        assert_eq!(
            waited.expect_err("not pid 1").kind(),
            io::ErrorKind::TimedOut
        );
    }
}
