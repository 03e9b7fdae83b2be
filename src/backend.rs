//! Backends at run time: identity, health state, session counts, and the
//! [`BackendSet`] snapshot that steering ranks.
//!
//! A [`Backend`] is shared (`Arc`) between the health checker that flips its
//! state, the sessions that hold a [`SessionSlot`] on it, and the admin API
//! that reports it. The set is held in an `ArcSwap` so that readers take a
//! consistent snapshot without locking and a reload can replace it whole.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use metrics::Gauge;
use parking_lot::Mutex;

use crate::config::{BackendUrl, Config};
use crate::geo::{Code, Location};
use crate::metrics as m;
use crate::steer::{self, BackendView, Policy};

/// What the admin API and steering see of a backend's condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Healthy,
    Unhealthy,
    Draining,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Healthy => "healthy",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Draining => "draining",
        }
    }
}

/// The outcome of the latest active health check, for the admin API.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub at: SystemTime,
    pub ok: bool,
    /// e.g. "200", "status 503", "timeout", "connect: Connection refused".
    pub detail: String,
}

/// One configured backend and its live state.
#[derive(Debug)]
pub struct Backend {
    pub id: String,
    pub url: BackendUrl,
    /// Index into the config's regions.
    pub region: usize,
    pub region_name: String,
    pub weight: u32,
    pub max_sessions: u32,
    /// Stable rendezvous identity, from the id.
    id_hash: u64,
    /// Set by active health checks; starts healthy (see README).
    healthy: AtomicBool,
    /// Set by an operator; no new sessions while set.
    draining: AtomicBool,
    /// Sessions currently holding a slot.
    sessions: AtomicU32,
    /// `wsrouter_sessions_active{backend,region}`, resolved once.
    sessions_gauge: Gauge,
    /// `wsrouter_backend_up{backend,region}`, resolved once.
    up_gauge: Gauge,
    last_check: Mutex<Option<LastCheck>>,
}

impl Backend {
    fn new(config: &Config, index: usize) -> Backend {
        let b = &config.backends[index];
        let region_name = config.regions[b.region].name.clone();
        let labels = [("backend", b.id.clone()), ("region", region_name.clone())];
        let up_gauge = metrics::gauge!(m::BACKEND_UP, &labels);
        up_gauge.set(1.0);
        Backend {
            id: b.id.clone(),
            url: b.url.clone(),
            region: b.region,
            region_name,
            weight: b.weight,
            max_sessions: b.max_sessions,
            id_hash: steer::id_hash(&b.id),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            sessions: AtomicU32::new(0),
            sessions_gauge: metrics::gauge!(m::SESSIONS_ACTIVE, &labels),
            up_gauge,
            last_check: Mutex::new(None),
        }
    }

    pub fn state(&self) -> BackendState {
        if self.draining.load(Ordering::Relaxed) {
            BackendState::Draining
        } else if self.healthy.load(Ordering::Relaxed) {
            BackendState::Healthy
        } else {
            BackendState::Unhealthy
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Record a health flip. Returns whether the state changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        self.up_gauge.set(if healthy { 1.0 } else { 0.0 });
        changed
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn sessions(&self) -> u32 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether steering may place a new session here.
    pub fn accepts_sessions(&self) -> bool {
        self.state() == BackendState::Healthy && self.sessions() < self.max_sessions
    }

    pub fn record_check(&self, check: LastCheck) {
        *self.last_check.lock() = Some(check);
    }

    pub fn last_check(&self) -> Option<LastCheck> {
        self.last_check.lock().clone()
    }

    /// Take one of the backend's session slots, unless it is full.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SessionSlot> {
        self.sessions
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max_sessions).then_some(n + 1)
            })
            .ok()?;
        self.sessions_gauge.increment(1.0);
        Some(SessionSlot {
            backend: Arc::clone(self),
        })
    }
}

/// A session's claim on a backend: counted while it lives, released on drop,
/// so the count can never drift from the sessions that exist.
#[derive(Debug)]
pub struct SessionSlot {
    backend: Arc<Backend>,
}

impl SessionSlot {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.backend.sessions.fetch_sub(1, Ordering::AcqRel);
        self.backend.sessions_gauge.decrement(1.0);
    }
}

/// The backends and steering policy of one configuration.
#[derive(Debug)]
pub struct BackendSet {
    pub backends: Vec<Arc<Backend>>,
    pub policy: Policy,
}

impl BackendSet {
    pub fn from_config(config: &Config) -> BackendSet {
        let backends = (0..config.backends.len())
            .map(|i| Arc::new(Backend::new(config, i)))
            .collect();
        let codes = |map: &std::collections::HashMap<String, Vec<usize>>| {
            map.iter()
                .filter_map(|(k, v)| Some((Code::new(k)?, v.clone())))
                .collect()
        };
        let policy = Policy {
            regions: config
                .regions
                .iter()
                .map(|r| (r.latitude, r.longitude))
                .collect(),
            default_region: config.steering.default_region,
            countries: codes(&config.steering.countries),
            continents: codes(&config.steering.continents),
        };
        BackendSet { backends, policy }
    }

    /// Backends that may take a new session for this client, best first.
    pub fn rank(&self, location: &Location, key: &str) -> Vec<Arc<Backend>> {
        let views: Vec<BackendView> = self
            .backends
            .iter()
            .map(|b| BackendView {
                region: b.region,
                weight: b.weight,
                id_hash: b.id_hash,
                available: b.accepts_sessions(),
            })
            .collect();
        self.policy
            .rank(location, key, &views)
            .into_iter()
            .map(|i| Arc::clone(&self.backends[i]))
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.id == id)
    }

    pub fn any_healthy(&self) -> bool {
        self.backends
            .iter()
            .any(|b| b.state() == BackendState::Healthy)
    }
}

/// Cheap-clone handle to the current backend set.
#[derive(Debug, Clone)]
pub struct Backends {
    current: Arc<ArcSwap<BackendSet>>,
}

impl Backends {
    pub fn new(set: BackendSet) -> Backends {
        Backends {
            current: Arc::new(ArcSwap::from_pointee(set)),
        }
    }

    /// A consistent snapshot of the set.
    pub fn load(&self) -> Arc<BackendSet> {
        self.current.load_full()
    }
}
