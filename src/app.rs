//! Wiring: bind the listeners, start health checks and the admin server,
//! run the accept loop, and own the shutdown sequence.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! port 0 and stop the router when they like, and `main` passes the
//! addresses from the config and a signal handler. Shutdown order: stop
//! accepting, tell every session (they close both sides with 1001), wait,
//! bounded, until every session's completion guard is dropped.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin::{self, AdminState};
use crate::backend::{BackendSet, Backends};
use crate::config::Config;
use crate::health;
use crate::metrics;
use crate::session::relay::TrafficCounters;
use crate::session::{self, Router};

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
        let public = TcpListener::bind(config.listener.public)
            .await
            .map_err(|e| {
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

/// Run the router until `shutdown` completes, then drain and return.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let metrics = metrics::install();
    let config = Arc::new(config);
    let backends = Backends::new(BackendSet::from_config(&config));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);

    health::spawn_checks(
        &backends.load().backends,
        &config.health_check,
        stop_rx.clone(),
    );
    let admin_state = AdminState {
        backends: backends.clone(),
        metrics,
    };
    tokio::spawn(admin::serve(listeners.admin, admin_state, stop_rx.clone()));

    tracing::info!(
        public = %listeners.public.local_addr()?,
        backends = config.backends.len(),
        geoip = %config.geoip.db.kind(),
        "wsrouter listening"
    );
    let router = Router {
        config: Arc::clone(&config),
        backends,
        shutdown: stop_rx,
        session_done: done_tx,
        counters: TrafficCounters::new(),
    };
    accept_loop(&listeners.public, &router, shutdown).await;

    // Stop accepting, signal every session, wait for them (bounded).
    drop(listeners.public);
    let _ = stop_tx.send(true);
    drop(router);
    let grace = config.relay.close_timeout * 2 + Duration::from_secs(1);
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        tracing::warn!("some sessions did not finish closing in time");
    }
    tracing::info!("wsrouter stopped");
    Ok(())
}

/// Accept until `shutdown`; each connection gets its own task. Errors on one
/// connection are ignored; running out of file descriptors backs off.
async fn accept_loop(listener: &TcpListener, router: &Router, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(session::serve_connection(router.clone(), stream, peer));
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

/// Resolves once the router's stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
