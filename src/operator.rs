//! Operator actions: drain, undrain, reload, and whether the router is
//! shutting down. One cheap-clone handle, [`Operator`], shared by the admin
//! API and the SIGHUP handler; the wiring (`app`) builds it.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::backend::{Backend, BackendSet, Backends};
use crate::config::{Config, ConfigError};
use crate::health;
use crate::limits::Limits;
use crate::shutdown::Shutdown;
use crate::tls::Terminator;

/// Operator actions: drain, undrain, reload. A cheap-clone handle shared by
/// the admin API and the signal handler.
#[derive(Clone)]
pub struct Operator {
    shared: Arc<OperatorShared>,
}

struct OperatorShared {
    config: Arc<ArcSwap<Config>>,
    limits: Limits,
    /// The public listener's TLS, when it has `[tls]`; a reload swaps its
    /// certificates.
    tls: Option<Terminator>,
    backends: Backends,
    config_path: Option<PathBuf>,
    /// Health checkers of backends added by a reload stop with this.
    shutdown: Shutdown,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub reconfigured: Vec<String>,
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the router was started without a config file, so there is nothing to reload")]
    NoFile,
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl Operator {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        limits: Limits,
        tls: Option<Terminator>,
        backends: Backends,
        config_path: Option<PathBuf>,
        shutdown: Shutdown,
    ) -> Operator {
        Operator {
            shared: Arc::new(OperatorShared {
                config,
                limits,
                tls,
                backends,
                config_path,
                shutdown,
            }),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.shared.config.load_full()
    }

    pub fn backends(&self) -> &Backends {
        &self.shared.backends
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Stop new sessions on a backend and move its sessions away, paced.
    pub fn drain(&self, id: &str) -> Option<Arc<Backend>> {
        let backend = Arc::clone(self.shared.backends.load().get(id)?);
        backend.set_draining(true);
        backend.evacuate(self.config().migration.max_rate_per_backend);
        tracing::info!(backend = id, "backend draining");
        Some(backend)
    }

    /// Let a drained backend take new sessions again (moved ones stay moved).
    pub fn undrain(&self, id: &str) -> Option<Arc<Backend>> {
        let backend = Arc::clone(self.shared.backends.load().get(id)?);
        backend.set_draining(false);
        tracing::info!(backend = id, "backend undrained");
        Some(backend)
    }

    /// Re-read the config file and apply it: backends added, removed (their
    /// sessions move, paced) and reweighted, no session dropped. A file that
    /// fails validation changes nothing.
    pub fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let path = self
            .shared
            .config_path
            .as_ref()
            .ok_or(ReloadError::NoFile)?;
        let new = Config::from_file(path)?;
        Ok(self.apply(new))
    }

    fn apply(&self, new: Config) -> ReloadSummary {
        let old = self.config();
        if new.listener.public != old.listener.public || new.admin.listen != old.admin.listen {
            tracing::warn!(
                "listener addresses changed in the file; they apply at the next restart"
            );
        }
        if new.limits != old.limits {
            tracing::warn!("[limits] changed in the file; they apply at the next restart");
        }
        match (&self.shared.tls, &new.tls) {
            (Some(running), Some(tls)) => {
                running.store(tls);
                tracing::info!("TLS certificates reloaded; new connections use them");
            }
            (None, None) => {}
            _ => tracing::warn!(
                "[tls] was added or removed in the file; the listener changes at the next restart"
            ),
        }
        let old_set = self.shared.backends.load();
        let mut summary = ReloadSummary::default();
        let mut backends = Vec::with_capacity(new.backends.len());
        for (i, b) in new.backends.iter().enumerate() {
            let same = old_set.get(&b.id).filter(|e| {
                e.url == b.url
                    && e.region == b.region
                    && e.region_name == new.regions[b.region].name
            });
            match same {
                Some(existing) => {
                    if existing.weight() != b.weight || existing.max_sessions() != b.max_sessions {
                        existing.reconfigure(b.weight, b.max_sessions);
                        summary.reconfigured.push(b.id.clone());
                    }
                    backends.push(Arc::clone(existing));
                }
                None => {
                    let backend = BackendSet::new_backend(&new, i);
                    summary.added.push(b.id.clone());
                    backends.push(backend);
                }
            }
        }
        let rate = new.migration.max_rate_per_backend;
        let removed: Vec<Arc<Backend>> = old_set
            .backends
            .iter()
            .filter(|old| !backends.iter().any(|b| Arc::ptr_eq(b, old)))
            .cloned()
            .collect();
        // Publish the new set before moving anyone, so moved sessions steer
        // by the new configuration.
        self.shared
            .backends
            .store(BackendSet::with_backends(&new, backends));
        self.shared.config.store(Arc::new(new));
        // Every checker starts again with the configuration just published
        // (the ones they replace exit when they next wake up).
        health::spawn_checks(
            &self.shared.backends.load().backends,
            &self.shared.config,
            &self.shared.shutdown,
        );
        for backend in removed {
            backend.set_removed();
            backend.evacuate(rate);
            summary.removed.push(backend.id.clone());
        }
        summary
    }
}
