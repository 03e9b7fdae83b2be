//! Wiring: bind the listeners, start health checks, the memory monitor and
//! the admin server, start the session threads (each accepting on its own
//! listener), hand the operator actions ([`crate::operator`]) to the admin
//! API and SIGHUP, and own the shutdown sequence.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! port 0 and stop the router when they like, and `main` passes the
//! addresses from the config and a signal handler. Shutdown order: stop
//! accepting (every listener closed), then fail `/readyz`, let sessions
//! keep relaying for the grace period, then tell every session to close
//! both sides with 1001, and wait, bounded, until every session's
//! completion guard is dropped.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin::{self, AdminState};
use crate::backend::{BackendSet, Backends};
use crate::config::Config;
use crate::connection;
use crate::health;
use crate::limits::Limits;
use crate::memory::MemoryBudget;
use crate::metrics;
use crate::operator::Operator;
use crate::session::Router;
use crate::session::relay::TrafficCounters;
use crate::shutdown::stopped;
use crate::tls::Terminator;

/// How long shutdown waits for the session threads to close their
/// listeners (each notices within a poll; this bounds a stuck one).
const LISTENERS_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The router's two listening sockets.
#[derive(Debug)]
pub struct Listeners {
    /// The WebSocket front door.
    pub public: TcpListener,
    /// Metrics, health and the admin API.
    pub admin: TcpListener,
}

impl Listeners {
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
        Ok(Listeners { public, admin })
    }
}

/// Bind the public address so that every session thread can bind it too
/// (`SO_REUSEPORT`; the kernel spreads new connections over their
/// listeners). Give [`run`] a listener made here: with any other, the
/// session threads share one socket and all wake for every connection.
pub fn public_listener(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
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

/// Optional run-time behaviour.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// The file reloads read (SIGHUP and `POST /api/reload`). Without it,
    /// reloads are refused.
    pub config_path: Option<PathBuf>,
    /// Reload on SIGHUP (the binary does; tests that run several routers in
    /// one process do not).
    pub reload_on_sighup: bool,
}

/// Run the router until `shutdown` completes, then drain and return.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    run_with(config, listeners, shutdown, Options::default()).await
}

/// [`run`], with reloads from a file.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> io::Result<()> {
    let metrics = metrics::install();
    let backends = Backends::new(BackendSet::from_config(&config));
    let config = Arc::new(ArcSwap::from_pointee(config));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let tls = config.load().tls.as_ref().map(Terminator::new);

    let limits = Limits::new(&config.load().limits);
    spawn_limit_upkeep(limits.clone(), stop_rx.clone());
    let memory = MemoryBudget::new(config.load().limits.max_buffered_bytes);
    let mut memory_stop = stop_rx.clone();
    tokio::spawn(
        memory
            .clone()
            .monitor(async move { stopped(&mut memory_stop).await }),
    );
    let operator = Operator::new(
        Arc::clone(&config),
        limits.clone(),
        tls.clone(),
        backends.clone(),
        options.config_path.clone(),
        stop_rx.clone(),
    );
    health::spawn_checks(&backends.load().backends, &config, &stop_rx);
    let admin_state = AdminState {
        operator: operator.clone(),
        metrics,
        memory: memory.clone(),
    };
    tokio::spawn(admin::serve(listeners.admin, admin_state, stop_rx.clone()));
    if options.reload_on_sighup {
        spawn_sighup_reload(operator.clone(), stop_rx.clone());
    }

    tracing::info!(
        public = %listeners.public.local_addr()?,
        tls = tls.is_some(),
        backends = config.load().backends.len(),
        geoip = %config.load().geoip.db.kind(),
        "wsrouter listening"
    );
    let router = Router {
        config: Arc::clone(&config),
        backends,
        shutdown: stop_rx,
        session_done: done_tx,
        counters: TrafficCounters::new(),
        next_session_id: Arc::new(AtomicU64::new(1)),
        limits,
        tls,
        memory: memory.clone(),
    };
    // Sessions run on threads of their own (see `start_session_workers`);
    // this runtime keeps the admin API, health checks, reloads and signals.
    // Dropping the senders (this future cancelled) stops the workers too.
    let (accepting_tx, accepting_rx) = watch::channel(true);
    let (finished_tx, finished_rx) = watch::channel(false);
    // Each session thread holds a sender until it has closed its listener.
    let (listener_open, mut listeners_closed) = mpsc::channel::<()>(1);
    let threads = match config.load().session_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let workers = start_session_workers(
        listeners.public,
        threads,
        &router,
        &accepting_rx,
        &finished_rx,
        listener_open,
    )?;
    tracing::info!(threads, "session threads started");
    shutdown.await;

    // Stop accepting; sessions keep relaying for the grace period. Every
    // listener is closed before `/readyz` fails, so whoever sees it fail
    // finds new connections refused.
    let _ = accepting_tx.send(false);
    drop(router);
    if tokio::time::timeout(LISTENERS_CLOSE_WAIT, listeners_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!("a session thread did not close its listener in time");
    }
    operator.mark_shutting_down();
    let current = config.load_full();
    tracing::info!(grace = ?current.shutdown_grace, "shutting down: no new sessions, waiting for live ones");
    let finished_early = tokio::time::timeout(current.shutdown_grace, done_rx.recv())
        .await
        .is_ok();
    if !finished_early {
        // Then close what is left with 1001, and wait for the closes (bounded).
        let _ = stop_tx.send(true);
        let closing = current.relay.close_timeout * 2 + Duration::from_secs(1);
        if tokio::time::timeout(closing, done_rx.recv()).await.is_err() {
            tracing::warn!("some sessions did not finish closing in time");
        }
    }
    let _ = stop_tx.send(true);
    let _ = finished_tx.send(true);
    for worker in workers {
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }
    tracing::info!("wsrouter stopped");
    Ok(())
}

/// Start `count` session threads, each a single-threaded runtime with its
/// own listener on the public address (the first gets `public`, the others
/// bind the address again: see [`public_listener`]), accepting until
/// `accepting` turns false and running its sessions until `finished`. Each
/// thread drops its clone of `listener_open` once its listener is closed.
///
/// This is HAProxy's `nbthread` and NGINX's `worker_processes` with
/// `reuseport`: each thread sleeps in its own `epoll_wait` and runs its own
/// sessions, where a work-stealing runtime wakes idle workers to look for
/// work on every message (BENCHMARKS.md, "Thread per core").
fn start_session_workers(
    public: TcpListener,
    count: usize,
    router: &Router,
    accepting: &watch::Receiver<bool>,
    finished: &watch::Receiver<bool>,
    listener_open: mpsc::Sender<()>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    let addr = public.local_addr()?;
    let public = public.into_std()?;
    let mut listeners = Vec::with_capacity(count);
    for _ in 1..count {
        let own = match public_listener(addr) {
            Ok(listener) => listener.into_std()?,
            Err(e) => {
                // Not bound with SO_REUSEPORT: share the one socket.
                tracing::info!(error = %e, "session threads share the public listener");
                public.try_clone()?
            }
        };
        listeners.push(own);
    }
    listeners.insert(0, public);
    let mut workers = Vec::with_capacity(count);
    for (i, listener) in listeners.into_iter().enumerate() {
        let router = router.clone();
        let mut accepting = accepting.clone();
        let mut finished = finished.clone();
        let listener_open = listener_open.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let worker = std::thread::Builder::new()
            .name(format!("wsrouter-sessions-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(%error, thread = i, "session thread cannot watch its listener");
                            return;
                        }
                    };
                    let stop_accepting = async move {
                        let _ = accepting.wait_for(|a| !*a).await;
                    };
                    accept_loop(&listener, &router, stop_accepting).await;
                    drop(listener);
                    drop(listener_open);
                    drop(router);
                    // Sessions keep running on this thread until every one
                    // has ended (or the router gave up waiting).
                    let _ = finished.wait_for(|f| *f).await;
                });
            })?;
        workers.push(worker);
    }
    Ok(workers)
}

/// Accept until `shutdown`; each connection gets its own task. Errors on one
/// connection are ignored; running out of file descriptors backs off.
async fn accept_loop(listener: &TcpListener, router: &Router, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(connection::serve_connection(router.clone(), stream, peer));
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    tracing::error!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut shutdown => return,
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

/// Drop rate-limiter state of addresses not seen lately, now and then.
fn spawn_limit_upkeep(limits: Limits, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::limits::FORGET_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => limits.forget_idle_addresses(),
                _ = stopped(&mut stop) => return,
            }
        }
    });
}

fn spawn_sighup_reload(operator: Operator, mut stop: watch::Receiver<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload through the admin API");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hangup.recv() => {}
                _ = stopped(&mut stop) => return,
            }
            tracing::info!("SIGHUP: reloading the configuration");
            match operator.reload() {
                Ok(summary) => tracing::info!(?summary, "configuration reloaded"),
                Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
            }
        }
    });
}
