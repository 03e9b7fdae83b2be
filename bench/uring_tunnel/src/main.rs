//! A byte tunnel on io_uring: one ring per core, each accepting on its own
//! `SO_REUSEPORT` listener. Every socket has one receive in flight; a
//! completed receive becomes a send to the other socket, a completed send
//! the next receive. One `io_uring_enter` submits and reaps them for every
//! session of the thread, and there is no `epoll_wait` at all. Like
//! `tokio_tunnel` and `mio_tunnel` it parses nothing; the WebSocket
//! handshake passes through.
//!
//! A yardstick, not a proxy: it dials the backend with a blocking connect
//! (loopback, outside the measured steady state) and has no timeouts. It
//! shows what io_uring would buy over an epoll loop; see BENCHMARKS.md
//! ("The tokio floor").
//!
//!   cargo run --release --manifest-path bench/uring_tunnel/Cargo.toml -- --listen 127.0.0.1:18080 --backend 127.0.0.1:19001

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};

use io_uring::{IoUring, opcode, squeue, types};

#[path = "../../src/tunnel_cli.rs"]
mod tunnel_cli;

fn main() -> io::Result<()> {
    tunnel_cli::run_per_core(run)
}

const BUFFER: usize = 16 * 1024;
/// `user_data` of the accept; the others are `slot << 2 | op`.
const ACCEPT: u64 = u64::MAX;
/// Operations per session: a receive and a send per direction. Direction
/// `d` reads socket `d` and writes socket `1 - d`.
const RECV: u64 = 0;
const SEND: u64 = 2;

/// One session: its sockets, a buffer per direction, how much of the last
/// receive is still to send, and how many operations are in flight.
struct Session {
    sockets: [TcpStream; 2],
    buffers: [Box<[u8; BUFFER]>; 2],
    /// Per direction: bytes received and bytes sent of them.
    filled: [usize; 2],
    sent: [usize; 2],
    in_flight: u32,
    closing: bool,
}

fn run(listen: SocketAddr, backend: SocketAddr) -> io::Result<()> {
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)?;
    let accept_from = tunnel_cli::reuseport_listener(listen, false)?;
    let mut sessions: Vec<Option<Session>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut pending: Vec<squeue::Entry> = vec![accept(&accept_from)];
    let mut done: Vec<(u64, i32)> = Vec::new();
    loop {
        // Submit what the last completions asked for, then wait for one.
        {
            let mut queue = ring.submission();
            let mut rest = Vec::new();
            for entry in pending.drain(..) {
                // SAFETY: every buffer an entry points to is owned by its
                // session, which stays until its operations have completed.
                if unsafe { queue.push(&entry) }.is_err() {
                    rest.push(entry);
                }
            }
            pending = rest;
        }
        ring.submit_and_wait(1)?;
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (user_data, result) in done.drain(..) {
            if user_data == ACCEPT {
                if result >= 0 {
                    // SAFETY: the accept's result is a new socket we own.
                    let client = unsafe { TcpStream::from_raw_fd(result) };
                    start(client, backend, &mut sessions, &mut free, &mut pending);
                }
                pending.push(accept(&accept_from));
                continue;
            }
            let slot = (user_data >> 2) as usize;
            let op = user_data & 3;
            let Some(session) = sessions[slot].as_mut() else {
                continue;
            };
            session.in_flight -= 1;
            let direction = (op & 1) as usize;
            if result <= 0 || session.closing {
                close(session);
            } else if op & SEND == 0 {
                session.filled[direction] = result as usize;
                session.sent[direction] = 0;
                pending.push(send(session, slot, direction));
            } else {
                session.sent[direction] += result as usize;
                pending.push(if session.sent[direction] < session.filled[direction] {
                    send(session, slot, direction)
                } else {
                    recv(session, slot, direction)
                });
            }
            if session.in_flight == 0 {
                sessions[slot] = None;
                free.push(slot);
            }
        }
    }
}

fn accept(listener: &std::net::TcpListener) -> squeue::Entry {
    opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(ACCEPT)
}

fn start(
    client: TcpStream,
    backend: SocketAddr,
    sessions: &mut Vec<Option<Session>>,
    free: &mut Vec<usize>,
    pending: &mut Vec<squeue::Entry>,
) {
    let Ok(upstream) = TcpStream::connect(backend) else {
        return;
    };
    for socket in [&client, &upstream] {
        let _ = socket.set_nodelay(true);
    }
    let slot = free.pop().unwrap_or_else(|| {
        sessions.push(None);
        sessions.len() - 1
    });
    let session = sessions[slot].insert(Session {
        sockets: [client, upstream],
        buffers: [Box::new([0; BUFFER]), Box::new([0; BUFFER])],
        filled: [0; 2],
        sent: [0; 2],
        in_flight: 0,
        closing: false,
    });
    pending.push(recv(session, slot, 0));
    pending.push(recv(session, slot, 1));
}

fn recv(session: &mut Session, slot: usize, direction: usize) -> squeue::Entry {
    session.in_flight += 1;
    let buffer = &mut session.buffers[direction];
    opcode::Recv::new(
        types::Fd(session.sockets[direction].as_raw_fd()),
        buffer.as_mut_ptr(),
        BUFFER as u32,
    )
    .build()
    .user_data((slot as u64) << 2 | RECV | direction as u64)
}

fn send(session: &mut Session, slot: usize, direction: usize) -> squeue::Entry {
    session.in_flight += 1;
    let (from, to) = (session.sent[direction], session.filled[direction]);
    let rest = &session.buffers[direction][from..to];
    opcode::Send::new(
        types::Fd(session.sockets[1 - direction].as_raw_fd()),
        rest.as_ptr(),
        rest.len() as u32,
    )
    .build()
    .user_data((slot as u64) << 2 | SEND | direction as u64)
}

/// End the session: shutting both sockets down completes whatever is
/// still in flight on them, after which the session is dropped.
fn close(session: &mut Session) {
    if !session.closing {
        session.closing = true;
        for socket in &session.sockets {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}
