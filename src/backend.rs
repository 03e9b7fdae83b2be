//! Backends at run time: identity, health state, session counts, and the
//! [`BackendSet`] snapshot that steering ranks.
//!
//! A [`Backend`] is shared (`Arc`) between the health checker that flips its
//! state, the sessions that hold a [`SessionSlot`] on it, and the admin API
//! that reports it. Each slot registers its session's control cell, so
//! the backend can ask its sessions to move (`evacuate.rs`: paced, with
//! jitter).
//! Passive health (failed dials, abrupt failures) ejects a backend for a
//! cool-down. The set is held in an `ArcSwap` so that readers take a
//! consistent snapshot without locking and a reload can replace it whole.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use metrics::Gauge;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{BackendUrl, Config, PassiveHealthConfig};
use crate::geo::{Code, Location};
use crate::metrics as m;
pub mod control;
mod evacuate;

use crate::steer::{self, BackendView, Policy};
use control::{Control, MigrationReason};

/// What the admin API and steering see of a backend's condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Healthy,
    Unhealthy,
    /// Failed dials or abrupt failures took it out for a cool-down.
    Ejected,
    Draining,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Healthy => "healthy",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Ejected => "ejected",
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
    /// Share of its region's keys; a reload may change it.
    weight: AtomicU32,
    /// Session cap; a reload may change it.
    max_sessions: AtomicU32,
    /// Stable rendezvous identity, from the id.
    id_hash: u64,
    /// Set by active health checks; starts healthy (see README).
    healthy: AtomicBool,
    /// Set by an operator; no new sessions while set.
    draining: AtomicBool,
    /// Set when a reload removed the backend; its checker stops.
    removed: AtomicBool,
    /// Consecutive failures seen by sessions (passive health).
    passive_failures: AtomicU32,
    /// Ejected until this many milliseconds after [`epoch`]; 0 when not.
    ejected_until_ms: AtomicU64,
    /// Sessions currently holding a slot.
    sessions: AtomicU32,
    /// Dials in flight to this backend (`steering.max_concurrent_dials`).
    pub dials: Semaphore,
    /// The control cell of every session on this backend, by session id.
    registry: DashMap<u64, Arc<Control>>,
    /// The generation of the health checker that should be running; a
    /// reload starts a new one and the old one exits.
    checker: AtomicU64,
    /// Set while an evacuation task runs, so triggers do not stack up.
    evacuating: AtomicBool,
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
            weight: AtomicU32::new(b.weight),
            max_sessions: AtomicU32::new(b.max_sessions),
            id_hash: steer::id_hash(&b.id),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            passive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            sessions: AtomicU32::new(0),
            dials: Semaphore::new(config.steering.max_concurrent_dials as usize),
            registry: DashMap::new(),
            checker: AtomicU64::new(0),
            evacuating: AtomicBool::new(false),
            sessions_gauge: metrics::gauge!(m::SESSIONS_ACTIVE, &labels),
            up_gauge,
            last_check: Mutex::new(None),
        }
    }

    pub fn state(&self) -> BackendState {
        if self.draining.load(Ordering::Relaxed) || self.is_removed() {
            BackendState::Draining
        } else if !self.healthy.load(Ordering::Relaxed) {
            BackendState::Unhealthy
        } else if self.is_ejected() {
            BackendState::Ejected
        } else {
            BackendState::Healthy
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn max_sessions(&self) -> u32 {
        self.max_sessions.load(Ordering::Relaxed)
    }

    /// Apply a reload's new weight and cap (identity and address unchanged).
    pub fn reconfigure(&self, weight: u32, max_sessions: u32) {
        self.weight.store(weight, Ordering::Relaxed);
        self.max_sessions.store(max_sessions, Ordering::Relaxed);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    pub fn set_removed(&self) {
        self.removed.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// A session failed to dial this backend or lost it abruptly. Enough of
    /// these in a row eject it for the cool-down. Returns true when this
    /// report ejected it.
    pub fn report_failure(&self, passive: &PassiveHealthConfig) -> bool {
        let failures = self.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= passive.max_failures && !self.is_ejected() {
            let until = now_ms() + passive.cooldown.as_millis() as u64;
            self.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
            self.passive_failures.store(0, Ordering::Relaxed);
            tracing::warn!(backend = %self.id, cooldown = ?passive.cooldown, "backend ejected after repeated failures");
            return true;
        }
        false
    }

    /// A dial succeeded: the failure streak is over.
    pub fn report_success(&self) {
        if self.passive_failures.load(Ordering::Relaxed) != 0 {
            self.passive_failures.store(0, Ordering::Relaxed);
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
        self.state() == BackendState::Healthy && self.sessions() < self.max_sessions()
    }

    /// [`Backend::accepts_sessions`], counting a passive ejection as no
    /// objection: the last resort of a session that must move.
    fn accepts_sessions_as_last_resort(&self) -> bool {
        matches!(self.state(), BackendState::Healthy | BackendState::Ejected)
            && self.sessions() < self.max_sessions()
    }

    /// Claim the checking of this backend for a new checker; returns its
    /// generation.
    pub fn new_checker(&self) -> u64 {
        self.checker.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether the checker of `generation` is still the one to run.
    pub fn is_current_checker(&self, generation: u64) -> bool {
        self.checker.load(Ordering::Acquire) == generation
    }

    pub fn record_check(&self, check: LastCheck) {
        *self.last_check.lock() = Some(check);
    }

    pub fn last_check(&self) -> Option<LastCheck> {
        self.last_check.lock().clone()
    }

    /// Take one of the backend's session slots, unless it is full, and
    /// register the session's control cell with it.
    pub fn try_acquire(
        self: &Arc<Self>,
        session_id: u64,
        control: &Arc<Control>,
    ) -> Option<SessionSlot> {
        let max = self.max_sessions();
        self.sessions
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.sessions_gauge.increment(1.0);
        self.registry.insert(session_id, Arc::clone(control));
        Some(SessionSlot {
            backend: Arc::clone(self),
            session_id,
        })
    }

    /// Why sessions should leave this backend now, if they should.
    pub fn leaving_reason(&self) -> Option<MigrationReason> {
        if self.is_removed() {
            Some(MigrationReason::Removed)
        } else if self.is_draining() {
            Some(MigrationReason::Drain)
        } else if !self.is_healthy() {
            Some(MigrationReason::Health)
        } else {
            None
        }
    }
}

/// Milliseconds since the first call, on tokio's clock (so paused-time
/// tests control it).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A session's claim on a backend: counted while it lives, released on drop,
/// so the count can never drift from the sessions that exist.
#[derive(Debug)]
pub struct SessionSlot {
    backend: Arc<Backend>,
    session_id: u64,
}

impl SessionSlot {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.backend.registry.remove(&self.session_id);
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
        BackendSet::with_backends(config, backends)
    }

    /// A set of existing backends under `config`'s steering policy.
    pub fn with_backends(config: &Config, backends: Vec<Arc<Backend>>) -> BackendSet {
        let codes = |map: &std::collections::HashMap<String, Vec<usize>>| {
            map.iter()
                .filter_map(|(k, v)| Some((Code::new(k)?, v.clone())))
                .collect()
        };
        let policy = Policy::new(
            config
                .regions
                .iter()
                .map(|r| (r.latitude, r.longitude))
                .collect(),
            config.steering.default_region,
            codes(&config.steering.countries),
            codes(&config.steering.continents),
        );
        BackendSet { backends, policy }
    }

    /// A new backend for `config.backends[index]`.
    pub fn new_backend(config: &Config, index: usize) -> Arc<Backend> {
        Arc::new(Backend::new(config, index))
    }

    /// The first `limit` backends that may take a new session for this
    /// client, best first, never one in `exclude` (the backends a moving
    /// session left).
    /// With `last_resort`, passively ejected backends count as available.
    pub fn rank(
        &self,
        location: &Location,
        key: &str,
        exclude: &[String],
        limit: usize,
        last_resort: bool,
    ) -> Vec<Arc<Backend>> {
        let views: Vec<BackendView> = self
            .backends
            .iter()
            .map(|b| BackendView {
                region: b.region,
                weight: b.weight(),
                id_hash: b.id_hash,
                available: true,
            })
            .collect();
        let available = |i: usize| {
            let b = &self.backends[i];
            !exclude.contains(&b.id)
                && if last_resort {
                    b.accepts_sessions_as_last_resort()
                } else {
                    b.accepts_sessions()
                }
        };
        self.policy
            .rank_first_where(location, key, &views, limit, available)
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

    /// Publish a new set (a reload).
    pub fn store(&self, set: BackendSet) {
        self.current.store(Arc::new(set));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    /// One backend, `eu-1`, taking at most two sessions.
    fn backend() -> Arc<Backend> {
        let toml = r#"
            [geoip]
            database = "geoip/GeoLite2-City-Test.mmdb"

            [[regions]]
            name = "eu"
            latitude = 50.1
            longitude = 8.7

            [[backends]]
            id = "eu-1"
            url = "ws://127.0.0.1:9001"
            region = "eu"
            max_sessions = 2
        "#;
        let base = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = Config::from_toml(toml, base, Path::new("unit.toml")).expect("config");
        BackendSet::new_backend(&config, 0)
    }

    #[test]
    fn slots_count_sessions_up_to_the_cap_and_give_them_back_when_dropped() {
        let backend = backend();
        let control = Arc::new(Control::default());
        let first = backend.try_acquire(1, &control).expect("a slot");
        let second = backend.try_acquire(2, &control).expect("a slot");
        assert_eq!(backend.sessions(), 2);
        assert!(!backend.accepts_sessions(), "full");
        assert!(backend.try_acquire(3, &control).is_none(), "past the cap");
        drop(first);
        assert_eq!(backend.sessions(), 1);
        assert!(backend.accepts_sessions());
        let third = backend.try_acquire(3, &control).expect("room again");
        drop((second, third));
        assert_eq!(backend.sessions(), 0);
    }

    #[test]
    fn failures_in_a_row_eject_for_the_cool_down_and_a_success_ends_the_streak() {
        let backend = backend();
        let passive = PassiveHealthConfig {
            max_failures: 3,
            cooldown: Duration::from_secs(60),
        };
        assert!(!backend.report_failure(&passive));
        assert!(!backend.report_failure(&passive));
        backend.report_success();
        assert!(
            !backend.report_failure(&passive),
            "the streak started again"
        );
        assert!(!backend.report_failure(&passive));
        assert!(backend.report_failure(&passive), "three in a row eject");
        assert_eq!(backend.state(), BackendState::Ejected);
        assert!(!backend.accepts_sessions());
        assert!(
            backend.accepts_sessions_as_last_resort(),
            "a moving session may still try it"
        );
    }

    #[test]
    fn a_draining_backend_takes_no_new_session_and_says_so() {
        let backend = backend();
        backend.set_draining(true);
        assert_eq!(backend.state(), BackendState::Draining);
        assert!(!backend.accepts_sessions());
        assert!(!backend.accepts_sessions_as_last_resort());
        backend.set_draining(false);
        assert!(backend.accepts_sessions());
    }
}
