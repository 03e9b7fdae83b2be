//! Wiring: bind nothing itself, but build the shared state, start health
//! checks, the memory monitor, the admin server and the session threads
//! ([`crate::listener`]), hand the operator actions ([`crate::operator`])
//! to the admin API and SIGHUP, and run the shutdown phases
//! ([`crate::shutdown`]).
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! port 0 and stop the router when they like, and `main` passes the
//! addresses from the config and a signal handler. Shutdown order: close
//! every listener, then `Draining` (`/readyz` fails; sessions keep
//! relaying for the grace period), then `Closing` (every session closes
//! both sides with 1001, background tasks stop), waiting, bounded, until
//! every session has ended, then `Done` (the session threads exit).

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::admin::{self, AdminState};
use crate::backend::{BackendSet, Backends};
use crate::config::Config;
use crate::health;
use crate::limits::Limits;
use crate::listener::{Listeners, SessionThreads};
use crate::memory::MemoryBudget;
use crate::metrics;
use crate::operator::Operator;
use crate::session::Router;
use crate::session::handover::Outbox;
use crate::session::relay::TrafficCounters;
use crate::shutdown::{Phase, Phases, Shutdown, track_sessions};
use crate::socketio::SidTable;
use crate::tls::Terminator;
use crate::upgrade::{self, Relaunch, Successor, Upgrader};

/// Optional run-time behaviour.
#[derive(Debug, Default)]
pub struct Options {
    /// The file reloads read (SIGHUP and `POST /api/reload`). Without it,
    /// reloads are refused.
    pub config_path: Option<PathBuf>,
    /// Reload on SIGHUP and upgrade on SIGUSR2 (the binary does; tests that
    /// run several routers in one process do not).
    pub handle_signals: bool,
    /// How to start a successor at an upgrade; without it, upgrades are
    /// refused.
    pub relaunch: Option<Relaunch>,
    /// Written with this process's pid once it serves (`--pid-file`).
    pub pid_file: Option<PathBuf>,
    /// This process was started by an upgrade: tell the old one once
    /// serving.
    pub successor: Option<Successor>,
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
    mut options: Options,
) -> io::Result<()> {
    let metrics = metrics::install();
    let backends = Backends::new(BackendSet::from_config(&config));
    let config = Arc::new(ArcSwap::from_pointee(config));
    let phases = Phases::default();
    let (sessions, mut sessions_ended) = track_sessions();
    let tls = config.load().tls.as_ref().map(Terminator::new);

    let limits = Limits::new(&config.load().limits);
    spawn_limit_upkeep(limits.clone(), phases.watch());
    let memory = MemoryBudget::new(config.load().limits.max_buffered_bytes);
    let mut memory_stop = phases.watch();
    tokio::spawn(
        memory
            .clone()
            .monitor(async move { memory_stop.closing().await }),
    );
    let operator = Operator::new(
        Arc::clone(&config),
        limits.clone(),
        tls.clone(),
        backends.clone(),
        options.config_path.clone(),
        phases.watch(),
    );
    let sids = SidTable::default();
    if let Some(successor) = &mut options.successor {
        // Before the health checkers start: they start from the old
        // process's verdicts.
        successor.keep_state(&operator, &sids);
    }
    health::spawn_checks(&backends.load().backends, &config, &phases.watch());
    let upgrader = Upgrader::new(options.relaunch.take(), operator.clone(), sids.clone());
    let admin_fd = std::os::fd::AsFd::as_fd(&listeners.admin).try_clone_to_owned()?;
    let admin_state = AdminState {
        operator: operator.clone(),
        metrics,
        memory: memory.clone(),
        shutdown: phases.watch(),
        upgrader: upgrader.clone(),
    };
    tokio::spawn(admin::serve(listeners.admin, admin_state));
    if options.handle_signals {
        spawn_sighup_reload(operator.clone(), phases.watch());
        spawn_sigusr2_upgrade(upgrader.clone(), phases.watch());
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
        backends: backends.clone(),
        shutdown: phases.watch(),
        sessions,
        counters: TrafficCounters::new(),
        next_session_id: Arc::new(AtomicU64::new(1)),
        limits,
        tls,
        memory: memory.clone(),
        sids,
        handover: Outbox::default(),
    };
    // Sessions run on threads of their own (see `crate::listener`); this
    // runtime keeps the admin API, health checks, reloads and signals.
    let count = match config.load().session_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut threads = SessionThreads::start(
        listeners.public,
        listeners.more_public,
        count,
        &router,
        &phases.watch(),
    )?;
    tracing::info!(threads = count, "session threads started");
    upgrader.register_listeners(threads.take_public_fds(), admin_fd);
    // Serving: this process holds the listeners from here on.
    if let Some(path) = &options.pid_file {
        upgrade::write_pid_file(path)
            .map_err(|e| io::Error::new(e.kind(), format!("--pid-file {}: {e}", path.display())))?;
    }
    if let Some(successor) = options.successor.take() {
        successor.ready(router.clone(), threads.handles());
    }
    upgrade::notify_systemd_ready();
    let outbox = router.handover.clone();
    drop(router);

    tokio::pin!(shutdown);
    let upgraded = tokio::select! {
        _ = &mut shutdown => false,
        _ = upgrader.handed_over() => true,
    };

    // Every listener is closed before `/readyz` fails, so whoever sees it
    // fail finds new connections refused (or, after an upgrade, accepted
    // by the new process, which holds the same sockets).
    upgrader.release_listeners();
    threads.close_listeners().await;
    phases.advance(Phase::Draining);
    let current = config.load_full();
    let shipped = upgraded.then(|| {
        let shipped = upgrader.ship_sessions(outbox.open());
        tokio::spawn(hand_over_sessions(
            backends.clone(),
            outbox.clone(),
            current.old_process_timeout,
        ));
        shipped
    });
    let grace = if upgraded {
        tracing::info!(grace = ?current.old_process_timeout, "upgraded: the new process accepts; this one's sessions relay until they end or the time is up");
        current.old_process_timeout
    } else {
        tracing::info!(grace = ?current.shutdown_grace, "shutting down: no new sessions, waiting for live ones");
        current.shutdown_grace
    };
    let ended_early = tokio::select! {
        ended = tokio::time::timeout(grace, sessions_ended.wait()) => ended.is_ok(),
        // A shutdown cuts an old process's wait short.
        _ = &mut shutdown, if upgraded => false,
    };
    if let Some(shipped) = shipped {
        // The new process hears `Done` before this one goes.
        outbox.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), shipped).await;
    }
    phases.advance(Phase::Closing);
    if !ended_early {
        // Sessions close with 1001 now; wait for the closes (bounded).
        let closing = current.relay.close_timeout * 2 + Duration::from_secs(1);
        if tokio::time::timeout(closing, sessions_ended.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not finish closing in time");
        }
    }
    phases.advance(Phase::Done);
    threads.join().await;
    if let Some(path) = options.pid_file.as_deref().filter(|_| !upgraded) {
        upgrade::remove_pid_file(path);
    }
    tracing::info!("wsrouter stopped");
    Ok(())
}

/// Ask the sessions that may move to go to the new process, as many at a
/// time as the outbox has room for, every 10 ms (a session in its
/// handshake or in a move hears it once back in its relay; one accepted
/// just before the listeners closed, once it has a backend), until
/// `within` passes; then take no more offers. The process exits sooner,
/// when its last session is gone.
async fn hand_over_sessions(backends: Backends, outbox: Outbox, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        let mut room = outbox.room();
        for backend in backends.load().backends.iter() {
            room -= backend.ask_to_hand_over(room);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    outbox.close();
}

/// Drop rate-limiter state of addresses not seen lately, now and then.
fn spawn_limit_upkeep(limits: Limits, mut shutdown: Shutdown) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::limits::FORGET_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => limits.forget_idle_addresses(),
                _ = shutdown.closing() => return,
            }
        }
    });
}

/// Run `action` on each `signal` (named `name` in the log) until the
/// router is closing; `instead` says what to use when the signal cannot be
/// listened for.
fn on_signal(
    signal: tokio::signal::unix::SignalKind,
    name: &'static str,
    instead: &'static str,
    mut shutdown: Shutdown,
    action: impl Fn() + Send + 'static,
) {
    let mut signals = match tokio::signal::unix::signal(signal) {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot listen for {name}; {instead}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = signals.recv() => action(),
                _ = shutdown.closing() => return,
            }
        }
    });
}

/// SIGUSR2 starts an upgrade (NGINX's binary-upgrade signal); one already
/// under way refuses it, with a log line.
fn spawn_sigusr2_upgrade(upgrader: Upgrader, shutdown: Shutdown) {
    let kind = tokio::signal::unix::SignalKind::user_defined2();
    on_signal(
        kind,
        "SIGUSR2",
        "upgrade through the admin API",
        shutdown,
        move || {
            tracing::info!("SIGUSR2: upgrading");
            let upgrader = upgrader.clone();
            // Its outcome is logged and counted; a second signal meanwhile is
            // refused as busy.
            tokio::spawn(async move { upgrader.upgrade().await });
        },
    );
}

/// SIGHUP re-reads the configuration file.
fn spawn_sighup_reload(operator: Operator, shutdown: Shutdown) {
    let kind = tokio::signal::unix::SignalKind::hangup();
    on_signal(
        kind,
        "SIGHUP",
        "reload through the admin API",
        shutdown,
        move || {
            tracing::info!("SIGHUP: reloading the configuration");
            match operator.reload() {
                Ok(summary) => tracing::info!(?summary, "configuration reloaded"),
                Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
            }
        },
    );
}
