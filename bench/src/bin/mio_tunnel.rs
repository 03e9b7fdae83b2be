//! A byte tunnel on a hand-written event loop (mio, edge-triggered epoll),
//! built the way NGINX's is: one loop per core, each accepting on its own
//! `SO_REUSEPORT` listener, and on each event the handler reads and writes
//! straight away, with no task, waker or readiness lock in between. Like
//! `tokio_tunnel` it parses nothing; the WebSocket handshake passes through.
//!
//! A yardstick, not a proxy: it dials the backend with a blocking connect
//! (loopback, outside the measured steady state) and has no timeouts. It
//! shows what leaving tokio's reactor would buy; see BENCHMARKS.md ("The
//! tokio floor").
//!
//!   cargo run --release -p wsrouter-bench --bin mio_tunnel -- --listen 127.0.0.1:18080 --backend 127.0.0.1:19001

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use wsrouter_bench::tunnel_cli;

fn main() -> io::Result<()> {
    tunnel_cli::run_per_core(event_loop)
}

const LISTENER: Token = Token(usize::MAX);
const READ_CHUNK: usize = 16 * 1024;

/// One session: the two sockets, and per direction the bytes the
/// destination did not take yet (reading that direction waits for them).
struct Session {
    sockets: [TcpStream; 2],
    pending: [Vec<u8>; 2],
}

/// Token of session `slot`'s socket `side` (0: client, 1: backend).
fn token(slot: usize, side: usize) -> Token {
    Token(slot * 2 + side)
}

fn event_loop(listen: SocketAddr, backend: SocketAddr) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut accept = TcpListener::from_std(tunnel_cli::reuseport_listener(listen, true)?);
    poll.registry()
        .register(&mut accept, LISTENER, Interest::READABLE)?;
    let mut sessions: Vec<Option<Session>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buffer = vec![0u8; READ_CHUNK];
    loop {
        poll.poll(&mut events, None)?;
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&accept, backend, &poll, &mut sessions, &mut free);
                continue;
            }
            let (slot, side) = (event.token().0 / 2, event.token().0 % 2);
            let Some(session) = sessions.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            // Writable: what waited for this side goes out, then the other
            // side (whose reading waited for it) is read again.
            let mut alive = true;
            if event.is_writable() && !session.pending[1 - side].is_empty() {
                alive = flush(session, 1 - side) && pump(session, 1 - side, &mut buffer, false);
            }
            if alive && (event.is_readable() || event.is_read_closed()) {
                alive = pump(session, side, &mut buffer, event.is_read_closed());
            }
            if !alive {
                if let Some(mut s) = sessions[slot].take() {
                    for socket in &mut s.sockets {
                        let _ = poll.registry().deregister(socket);
                    }
                }
                free.push(slot);
            }
        }
    }
}

fn accept_all(
    accept: &TcpListener,
    backend: SocketAddr,
    poll: &Poll,
    sessions: &mut Vec<Option<Session>>,
    free: &mut Vec<usize>,
) {
    while let Ok((client, _)) = accept.accept() {
        let Ok(upstream) = std::net::TcpStream::connect(backend) else {
            continue;
        };
        if upstream.set_nonblocking(true).is_err() {
            continue;
        }
        let mut session = Session {
            sockets: [client, TcpStream::from_std(upstream)],
            pending: [Vec::new(), Vec::new()],
        };
        let slot = free.pop().unwrap_or_else(|| {
            sessions.push(None);
            sessions.len() - 1
        });
        for (side, socket) in session.sockets.iter_mut().enumerate() {
            let _ = socket.set_nodelay(true);
            let _ = poll.registry().register(
                socket,
                token(slot, side),
                Interest::READABLE | Interest::WRITABLE,
            );
        }
        sessions[slot] = Some(session);
    }
}

/// Read side `from` and write what came to the other side, until `from` is
/// drained (a short read, as NGINX assumes with edge-triggered epoll: more
/// data is a new event; `until_eof` when the peer closed, which is not) or
/// the other side is full. False when the session is over.
fn pump(session: &mut Session, from: usize, buffer: &mut [u8], until_eof: bool) -> bool {
    let to = 1 - from;
    while session.pending[from].is_empty() {
        let n = match (&session.sockets[from]).read(buffer) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let mut written = 0;
        while written < n {
            match (&session.sockets[to]).write(&buffer[written..n]) {
                Ok(0) => return false,
                Ok(w) => written += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    session.pending[from].extend_from_slice(&buffer[written..n]);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if n < buffer.len() && !until_eof {
            return true;
        }
    }
    true
}

/// Write what waited to go from side `from` to the other. False when the
/// session is over.
fn flush(session: &mut Session, from: usize) -> bool {
    let to = 1 - from;
    let pending = &mut session.pending[from];
    while !pending.is_empty() {
        match (&session.sockets[to]).write(pending) {
            Ok(0) => return false,
            Ok(w) => {
                pending.drain(..w);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}
