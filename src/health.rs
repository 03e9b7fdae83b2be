//! Active health checks: an HTTP GET to each backend on a timer, with
//! consecutive-success and consecutive-failure thresholds.
//!
//! [`Thresholds`] is the pure state machine (tested without a network);
//! [`spawn_checks`] runs one task per backend that probes, feeds the result
//! in, and acts only when the state flips. A backend starts healthy, so a
//! router is usable the moment it starts; the first probe runs immediately.
//! A reload restarts every checker with the new `[health_check]` settings
//! (the one it replaces exits at its next wake-up, without probing).

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;

use crate::backend::{Backend, LastCheck};
use crate::config::{Config, HealthCheckConfig};
use crate::metrics as m;
use crate::shutdown::Shutdown;

/// Counts consecutive results and decides when a backend flips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    healthy: bool,
    consecutive_success: u32,
    consecutive_failure: u32,
    rise: u32,
    fall: u32,
}

impl Thresholds {
    pub fn new(healthy: bool, rise: u32, fall: u32) -> Thresholds {
        Thresholds {
            healthy,
            consecutive_success: 0,
            consecutive_failure: 0,
            rise,
            fall,
        }
    }

    /// Feed one check result; returns the new state when it flips.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.consecutive_success += 1;
            self.consecutive_failure = 0;
            if !self.healthy && self.consecutive_success >= self.rise {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.consecutive_failure += 1;
            self.consecutive_success = 0;
            if self.healthy && self.consecutive_failure >= self.fall {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// Start one checker task per backend; see [`spawn_check`].
pub fn spawn_checks(backends: &[Arc<Backend>], config: &Arc<ArcSwap<Config>>, shutdown: &Shutdown) {
    for backend in backends {
        spawn_check(Arc::clone(backend), Arc::clone(config), shutdown.clone());
    }
}

/// Check one backend with the `[health_check]` settings current now, until
/// the router stops, a reload removes the backend, or a reload starts its
/// next checker. When it goes down, its sessions are moved at the
/// `migration.max_rate_per_backend` current then.
pub fn spawn_check(
    backend: Arc<Backend>,
    shared_config: Arc<ArcSwap<Config>>,
    mut shutdown: Shutdown,
) {
    let generation = backend.new_checker();
    tokio::spawn(async move {
        let (config, upstream_tls) = {
            let current = shared_config.load();
            (current.health_check.clone(), current.upstream_tls.clone())
        };
        let mut thresholds = Thresholds::new(backend.is_healthy(), config.rise, config.fall);
        let mut interval = tokio::time::interval(config.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.closing() => return,
            }
            if backend.is_removed() || !backend.is_current_checker(generation) {
                return;
            }
            let result = probe(&backend, &config, upstream_tls.as_ref()).await;
            if !backend.is_current_checker(generation) {
                // A reload replaced this checker while it probed.
                return;
            }
            let ok = result.is_ok();
            let label = match &result {
                Ok(()) => "success",
                Err(ProbeFailure::Timeout) => "timeout",
                Err(ProbeFailure::Connect(_)) => "connect_error",
                Err(ProbeFailure::Status(_)) => "bad_status",
                Err(ProbeFailure::Http(_)) => "http_error",
            };
            metrics::counter!(m::HEALTH_CHECKS_TOTAL, "backend" => backend.id.clone(), "result" => label)
                .increment(1);
            backend.record_check(LastCheck {
                at: SystemTime::now(),
                ok,
                detail: match &result {
                    Ok(()) => format!("status {}", config.expected_status),
                    Err(e) => e.to_string(),
                },
            });
            if let Some(healthy) = thresholds.observe(ok) {
                backend.set_healthy(healthy);
                if healthy {
                    tracing::info!(backend = %backend.id, "backend is healthy again");
                } else {
                    tracing::warn!(backend = %backend.id, reason = %result.unwrap_err(), "backend is unhealthy");
                    backend.evacuate(shared_config.load().migration.max_rate_per_backend);
                }
            }
        }
    });
}

#[derive(Debug, thiserror::Error)]
enum ProbeFailure {
    #[error("timed out")]
    Timeout,
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("status {0}")]
    Status(u16),
    #[error("http: {0}")]
    Http(hyper::Error),
}

/// One GET on the backend's health path, bounded by the check timeout.
async fn probe(
    backend: &Backend,
    config: &HealthCheckConfig,
    upstream_tls: Option<&Arc<ClientConfig>>,
) -> Result<(), ProbeFailure> {
    let started = tokio::time::Instant::now();
    let deadline = config.timeout;
    let attempt = async {
        // wss:// backends are checked over https, their certificate verified.
        let stream = crate::tls::connect_backend(&backend.url, upstream_tls)
            .await
            .map_err(ProbeFailure::Connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ProbeFailure::Http)?;
        let conn = tokio::spawn(conn);
        let request = Request::get(config.path.as_str())
            .header(hyper::header::HOST, backend.url.authority())
            .header(hyper::header::USER_AGENT, "wsrouter-health-check")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .expect("static request parts are valid");
        let response = sender
            .send_request(request)
            .await
            .map_err(ProbeFailure::Http)?;
        conn.abort();
        let status = response.status().as_u16();
        if status == config.expected_status {
            Ok(())
        } else {
            Err(ProbeFailure::Status(status))
        }
    };
    let result = tokio::time::timeout(deadline, attempt)
        .await
        .unwrap_or(Err(ProbeFailure::Timeout));
    tracing::trace!(backend = %backend.id, elapsed = ?started.elapsed(), ok = result.is_ok(), "health probe");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_consecutive_failures_only() {
        let mut t = Thresholds::new(true, 2, 3);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None); // streak broken
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(false), None); // already down: no second flip
    }

    #[test]
    fn rises_after_consecutive_successes() {
        let mut t = Thresholds::new(false, 2, 3);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(true));
        assert_eq!(t.observe(true), None);
    }
}
