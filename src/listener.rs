//! The public listener: `SO_REUSEPORT` sockets, the session threads (each
//! a single-threaded runtime with its own listener and its own sessions)
//! and their accept loops. Closing the listeners is this module's own
//! step of the shutdown; the threads then run their sessions until the
//! router's phase is `Done`.
//!
//! This is HAProxy's `nbthread` and NGINX's `worker_processes` with
//! `reuseport`: each thread sleeps in its own `epoll_wait` and runs its own
//! sessions, where a work-stealing runtime wakes idle workers to look for
//! work on every message (BENCHMARKS.md, "Thread per core").

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::connection::serve_connection;
use crate::session::Router;
use crate::shutdown::{Phase, Shutdown};

/// How long closing the listeners waits for the session threads (each
/// notices within a poll; this bounds a stuck one).
const LISTENERS_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The router's listening sockets.
#[derive(Debug)]
pub struct Listeners {
    /// The WebSocket front door.
    pub public: TcpListener,
    /// More sockets on the public address: those of an old process's other
    /// session threads, handed over at an upgrade. Accepted on too, so
    /// nothing waiting in their queues is lost.
    pub(crate) more_public: Vec<std::net::TcpListener>,
    /// Metrics, health and the admin API.
    pub admin: TcpListener,
}

impl Listeners {
    /// Listeners bound already (tests bind port 0).
    pub fn new(public: TcpListener, admin: TcpListener) -> Listeners {
        Listeners {
            public,
            more_public: Vec::new(),
            admin,
        }
    }

    /// Listeners from sockets handed over (non-blocking already): the
    /// public ones (at least one), and the admin one.
    pub(crate) fn from_std(
        public: Vec<std::net::TcpListener>,
        admin: std::net::TcpListener,
    ) -> io::Result<Listeners> {
        let mut public = public.into_iter();
        let first = public
            .next()
            .ok_or_else(|| io::Error::other("no public listener"))?;
        Ok(Listeners {
            public: TcpListener::from_std(first)?,
            more_public: public.collect(),
            admin: TcpListener::from_std(admin)?,
        })
    }

    /// Bind the addresses the configuration names.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        let public = public_listener(config.listener.public).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("bind listener.public {}: {e}", config.listener.public),
            )
        })?;
        let admin = TcpListener::bind(config.admin.listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("bind admin.listen {}: {e}", config.admin.listen),
            )
        })?;
        Ok(Listeners::new(public, admin))
    }
}

/// Bind the public address so that every session thread can bind it too
/// (`SO_REUSEPORT`; the kernel spreads new connections over their
/// listeners). Give the router a listener made here: with any other, the
/// session threads share one socket and all wake for every connection.
pub fn public_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The running session threads.
pub(crate) struct SessionThreads {
    /// Turns false when the threads must stop accepting.
    accepting: watch::Sender<bool>,
    /// Each thread holds a sender until it has closed its listeners.
    listeners_closed: mpsc::Receiver<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Duplicates of every public listening socket, for an upgrade to
    /// hand over.
    public_fds: Vec<std::os::fd::OwnedFd>,
    /// Each thread's runtime (sessions handed over by an upgrade start
    /// there).
    handles: Vec<tokio::runtime::Handle>,
}

impl SessionThreads {
    /// Start `count` session threads, accepting on `public` (the first
    /// thread), on the sockets an old process handed over (`more`: one
    /// each for the next threads, any left over shared out), and on the
    /// address bound again for each thread still without one (see
    /// [`public_listener`]).
    pub fn start(
        public: TcpListener,
        more: Vec<std::net::TcpListener>,
        count: usize,
        router: &Router,
        shutdown: &Shutdown,
    ) -> io::Result<SessionThreads> {
        let (accepting, accepting_rx) = watch::channel(true);
        let (listener_open, listeners_closed) = mpsc::channel::<()>(1);
        let mut threads = Vec::with_capacity(count);
        let mut public_fds = Vec::new();
        let mut handles = Vec::with_capacity(count);
        let per_thread = own_listeners(public, more, count)?;
        for listener in per_thread.iter().flatten() {
            public_fds.push(std::os::fd::OwnedFd::from(listener.try_clone()?));
        }
        for (i, listeners) in per_thread.into_iter().enumerate() {
            let router = router.clone();
            let accepting = accepting_rx.clone();
            let mut shutdown = shutdown.clone();
            let listener_open = listener_open.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("wsrouter-sessions-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let mut watched = Vec::with_capacity(listeners.len());
                        for listener in listeners {
                            match TcpListener::from_std(listener) {
                                Ok(listener) => watched.push(listener),
                                Err(error) => {
                                    tracing::error!(%error, thread = i, "session thread cannot watch its listener");
                                    return;
                                }
                            }
                        }
                        let loops = watched.iter().map(|listener| {
                            let mut accepting = accepting.clone();
                            let stop = async move {
                                let _ = accepting.wait_for(|a| !*a).await;
                            };
                            accept_loop(listener, &router, stop)
                        });
                        futures_util::future::join_all(loops).await;
                        drop(watched);
                        drop(listener_open);
                        drop(router);
                        // Sessions keep running on this thread until every
                        // one has ended (or the router gave up waiting).
                        shutdown.reached(Phase::Done).await;
                    });
                })?;
            threads.push(thread);
        }
        Ok(SessionThreads {
            accepting,
            listeners_closed,
            threads,
            public_fds,
            handles,
        })
    }

    /// Each session thread's runtime.
    pub fn handles(&self) -> Vec<tokio::runtime::Handle> {
        self.handles.clone()
    }

    /// Duplicates of every public listening socket (for an upgrade to hand
    /// over; gone from here once taken).
    pub fn take_public_fds(&mut self) -> Vec<std::os::fd::OwnedFd> {
        std::mem::take(&mut self.public_fds)
    }

    /// Stop accepting, and return once every thread has closed its
    /// listener (bounded): from then on new connections are refused.
    pub async fn close_listeners(&mut self) {
        let _ = self.accepting.send(false);
        if tokio::time::timeout(LISTENERS_CLOSE_WAIT, self.listeners_closed.recv())
            .await
            .is_err()
        {
            tracing::warn!("a session thread did not close its listener in time");
        }
    }

    /// Wait for the threads to exit (they do once the phase is `Done`).
    pub async fn join(self) {
        for thread in self.threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The listeners of each of `count` threads: `public` for the first, the
/// handed-over ones for the next, the address bound again for any other
/// (or, where it was not bound with `SO_REUSEPORT`, the one socket
/// shared); handed-over sockets beyond `count` go one each to the threads
/// in turn.
fn own_listeners(
    public: TcpListener,
    more: Vec<std::net::TcpListener>,
    count: usize,
) -> io::Result<Vec<Vec<std::net::TcpListener>>> {
    let addr = public.local_addr()?;
    let public = public.into_std()?;
    let mut received = std::iter::once(public.try_clone()?).chain(more);
    let mut per_thread = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let own = match received.next() {
            Some(listener) => listener,
            None => match public_listener(addr) {
                Ok(listener) => listener.into_std()?,
                Err(e) => {
                    tracing::info!(error = %e, "session threads share the public listener");
                    public.try_clone()?
                }
            },
        };
        per_thread.push(vec![own]);
    }
    for (i, left_over) in received.enumerate() {
        per_thread[i % count.max(1)].push(left_over);
    }
    Ok(per_thread)
}

/// Accept until `stop`; each connection gets its own task. Errors on one
/// connection are ignored; running out of file descriptors backs off.
async fn accept_loop(listener: &TcpListener, router: &Router, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(serve_connection(router.clone(), stream, peer));
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    tracing::error!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut stop => return,
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
