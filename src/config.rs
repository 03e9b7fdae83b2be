//! Configuration: the typed [`Config`] the router runs on, its defaults
//! (the `DEFAULT_*` constants; `examples/router.toml` documents each option
//! beside its default) and the errors that name the field at fault.
//!
//! The pipeline is `router.toml -> file::FileConfig (serde) -> validate
//! (each section's values) + load (the files they name) -> Config`.
//! Neither stops at the first problem: every one is collected, with the
//! dotted path of the field and what is wrong, so an operator fixes a file
//! in one pass. `--check-config` and start-up run exactly this code, and
//! nothing here binds a port.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::geo::GeoDb;

mod backend_url;
mod file;
mod load;
pub mod tls;
mod validate;

pub use backend_url::BackendUrl;
use file::FileConfig;
use tls::TlsConfig;
use validate::Problems;

pub const DEFAULT_PUBLIC_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_PATHS: &[&str] = &["/"];
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 16 * 1024;
pub const DEFAULT_SESSION_KEY_NAME: &str = "session";
pub const DEFAULT_WEIGHT: u32 = 100;
pub const DEFAULT_MAX_SESSIONS: u32 = 10_000;
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_DIAL_ATTEMPTS: u32 = 3;
pub const DEFAULT_MAX_CONCURRENT_DIALS: u32 = 256;
pub const DEFAULT_HEALTH_PATH: &str = "/healthz";
pub const DEFAULT_HEALTH_STATUS: u16 = 200;
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_HEALTH_RISE: u32 = 2;
pub const DEFAULT_HEALTH_FALL: u32 = 3;
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_QUEUE_MAX_BYTES: usize = 1024 * 1024;
/// The margin: client messages the backend read (its pong says so) that
/// are still replayed after it fails, in case its application had not
/// handled them yet.
pub const DEFAULT_REPLAY_MAX_MESSAGES: usize = 8;
/// Chat messages are mostly JSON events of well under 1 KiB: over a
/// hundred of them may wait for a slow backend before its client does, and
/// 10,000 sessions' windows stay under 1.25 GiB at worst.
pub const DEFAULT_REPLAY_MAX_BYTES: usize = 128 * 1024;
pub const DEFAULT_REPLAY_MAX_AGE: Duration = Duration::from_secs(10);
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MIGRATION_RATE: u32 = 200;
/// A rolling restart moves a session at most once per backend restarted,
/// and no deploy restarts backends faster than one every few seconds: 10
/// moves in a minute is past any honest failover, and a loop reaches it in
/// about a second.
pub const DEFAULT_MAX_MOVES: u32 = 10;
pub const DEFAULT_MOVES_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_REDELIVERIES: u32 = 2;
/// A backend's read watermark trails its client by a quarter of a second
/// at most while messages flow (plus an urgent ping whenever the unread
/// bytes reach half of `replay_max_bytes`, so throughput never waits for
/// it). At 50 ms the pings cost 12 % more router CPU on a request-response
/// workload of small messages (BENCHMARKS.md); at 250 ms a fifth of that.
pub const DEFAULT_WATERMARK_INTERVAL: Duration = Duration::from_millis(250);
/// Longer than a healthy backend's pauses (a GC, a burst), short enough
/// that a hung one costs its clients seconds, not the health checks' 15.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_PASSIVE_FAILURES: u32 = 3;
pub const DEFAULT_PASSIVE_COOLDOWN: Duration = Duration::from_secs(10);
/// engine.io's own default `maxHttpBufferSize`.
pub const DEFAULT_SOCKETIO_MAX_BODY_BYTES: usize = 1_000_000;
/// engine.io holds a poll up to its ping interval (25 s by default) plus
/// its ping timeout (20 s): a backend that holds one longer is stuck.
pub const DEFAULT_SOCKETIO_POLL_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default `[upgrade] old_process_timeout`: sessions left in the old
/// process after an upgrade relay this long.
pub const DEFAULT_OLD_PROCESS_TIMEOUT: Duration = Duration::from_secs(300);
/// The smallest `limits.max_buffered_bytes`: a few sessions' worth.
pub const MIN_BUFFERED_BYTES: usize = 16 * 1024 * 1024;
pub const DEFAULT_ATTACK_CONNECTION_RATE: u32 = 2;
pub const DEFAULT_ATTACK_CONNECTION_BURST: u32 = 5;
pub const DEFAULT_ATTACK_MAX_SESSIONS: u32 = 10;

/// One problem in a configuration file: which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted path of the field, e.g. `backends[2].region`.
    pub field: String,
    /// What is wrong, and when possible how to fix it.
    pub problem: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// Why a configuration was refused: the file could not be read or parsed, or
/// it parsed and failed validation (every problem listed).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for wsrouter: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

fn list(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// Every problem as `(field, problem)`; parse errors count as one.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        match self {
            ConfigError::Invalid { problems, .. } => problems.clone(),
            ConfigError::Parse { message, .. } => vec![ConfigProblem {
                field: "(file)".into(),
                problem: message.clone(),
            }],
            ConfigError::Read { source, .. } => vec![ConfigProblem {
                field: "(file)".into(),
                problem: source.to_string(),
            }],
        }
    }
}

// === validated config: what the router runs on ===

/// The validated configuration. Everything here has been checked; the GeoIP
/// database is already open.
#[derive(Clone)]
pub struct Config {
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    /// Peers whose X-Forwarded-For / Forwarded headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    pub geoip: GeoIpConfig,
    pub session_key: SessionKeySource,
    pub steering: SteeringConfig,
    pub health_check: HealthCheckConfig,
    pub relay: RelayConfig,
    pub migration: MigrationConfig,
    pub passive_health: PassiveHealthConfig,
    /// After SIGTERM, sessions keep relaying this long before they are
    /// closed with 1001.
    pub shutdown_grace: Duration,
    /// After an upgrade (SIGUSR2) handed the listeners to a new process,
    /// the sessions that stay in the old one relay this long before they
    /// are closed with 1001 (`[upgrade] old_process_timeout`).
    pub old_process_timeout: Duration,
    /// Threads that run sessions, each with its own listener and event
    /// loop (`[runtime] session_threads`); 0 means one per CPU core.
    pub session_threads: usize,
    /// `[socketio]`.
    pub socketio: SocketIoConfig,
    pub limits: LimitsConfig,
    /// `[tls]`: the public listener speaks TLS with these certificates;
    /// `None` leaves it plain.
    pub tls: Option<TlsConfig>,
    /// The TLS client for `wss://` backends (dials, and health checks over
    /// https); built when a backend is `wss://` or `[upstream_tls]` is
    /// present.
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
    pub regions: Vec<RegionConfig>,
    pub backends: Vec<BackendConfig>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listener", &self.listener)
            .field("admin", &self.admin)
            .field("tls", &self.tls)
            .field("regions", &self.regions)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Where the public WebSocket front door listens.
    pub public: SocketAddr,
    /// Request paths that upgrade; anything else is answered 404.
    pub paths: Vec<String>,
    /// A client must finish its upgrade request within this time.
    pub handshake_timeout: Duration,
    /// Request line plus headers larger than this get 431.
    pub max_request_header_bytes: usize,
    /// Peers that must open with a PROXY protocol (v1 or v2) header, whose
    /// address then stands for the client. Empty: PROXY protocol is off.
    pub proxy_protocol_from: Vec<IpNet>,
}

/// `[socketio]`: paths where engine.io and Socket.IO clients connect.
#[derive(Debug, Clone)]
pub struct SocketIoConfig {
    /// Path prefixes, as engine.io matches its `path` option
    /// (`/socket.io/`): long-polling requests there are proxied over HTTP,
    /// upgrades relayed as Socket.IO sessions. Empty: Socket.IO is off.
    pub paths: Vec<String>,
    /// Largest long-polling request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// The longest a backend may hold a long-poll before it answers.
    pub poll_timeout: Duration,
}

impl SocketIoConfig {
    /// Whether `path` (without its query) is under a Socket.IO prefix.
    pub fn matches(&self, path: &str) -> bool {
        self.paths
            .iter()
            .any(|prefix| path.starts_with(prefix.as_str()) || path == prefix.trim_end_matches('/'))
    }
}

#[derive(Clone)]
pub struct AdminConfig {
    /// Admin listener (metrics, health, API); loopback by default.
    pub listen: SocketAddr,
    /// Bearer token mutating admin calls must carry; `None` allows them
    /// from anyone who reaches the admin listener.
    pub token: Option<String>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone)]
pub struct GeoIpConfig {
    pub database: PathBuf,
    /// The database, opened and checked with the configuration.
    pub db: Arc<GeoDb>,
}

/// Where the session key comes from in the client's upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKeySource {
    Query(String),
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone)]
pub struct SteeringConfig {
    /// Index into `Config::regions` used when nothing better is known.
    pub default_region: usize,
    /// ISO country code (upper case) -> ordered region indices.
    pub countries: HashMap<String, Vec<usize>>,
    /// Continent code (upper case) -> ordered region indices.
    pub continents: HashMap<String, Vec<usize>>,
    /// Bound on one backend WebSocket dial (TCP + upgrade).
    pub dial_timeout: Duration,
    /// How many candidates one new session may try before giving up.
    pub max_dial_attempts: u32,
    /// Dials in flight to one backend at a time; more wait their turn
    /// (within the dial timeout), so thousands of sessions leaving a dead
    /// backend do not overflow the next one's accept queue.
    pub max_concurrent_dials: u32,
}

#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    pub path: String,
    pub expected_status: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy backend back.
    pub rise: u32,
    /// Consecutive failures that take a healthy backend out.
    pub fall: u32,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Each hop is pinged this often when quiet.
    pub ping_interval: Duration,
    /// A hop silent (no frame at all, pongs included) this long is dead.
    pub idle_timeout: Duration,
    /// Largest message relayed; larger ones close the session with 1009.
    pub max_message_bytes: usize,
    /// How long to wait for the other side to answer a close frame.
    pub close_timeout: Duration,
}

/// How sessions move when their backend fails, drains or is removed.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Client bytes queued while a session re-dials; over this, close 1013.
    pub queue_max_bytes: usize,
    /// Client messages kept for replay after an abrupt backend failure.
    pub replay_max_messages: usize,
    /// Bytes of client frames kept for replay; the oldest go first.
    pub replay_max_bytes: usize,
    /// Messages older than this are not replayed.
    pub replay_max_age: Duration,
    /// A session that finds no new backend within this is closed with 1013.
    pub timeout: Duration,
    /// Planned moves (drain, health, removal) per second per backend.
    pub max_rate_per_backend: u32,
    /// A session that moves more often than this within `moves_window` is
    /// closed with 1011 (a move loop).
    pub max_moves: u32,
    pub moves_window: Duration,
    /// A message that backends failed right after receiving, on this many
    /// backends, is not replayed again: the session is closed with 1011.
    pub max_redeliveries: u32,
    /// Forwarded client messages are followed by a watermark ping at most
    /// this often (the session's replay window).
    pub watermark_interval: Duration,
    /// A backend whose watermark does not move this long while messages
    /// wait for it is hung: the session moves.
    pub stall_timeout: Duration,
}

/// Edge limits; 0 turns a limit off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Sessions in all; past it, 503 before the upgrade.
    pub max_sessions: usize,
    /// Bytes held for clients and backends in all (see the memory module);
    /// never 0: the default is half the memory the process may use.
    pub max_buffered_bytes: usize,
    /// Per client address, normally.
    pub per_ip: PerIpLimits,
    /// Per client address, in "under attack" mode.
    pub under_attack: PerIpLimits,
    /// Start in "under attack" mode.
    pub start_under_attack: bool,
    /// Origins allowed to open sessions (exact, case-insensitive); empty
    /// allows any.
    pub allowed_origins: Vec<String>,
    /// Refuse requests without an Origin header (always, under attack).
    pub require_origin: bool,
    /// Client messages per second per session, and the burst above it.
    pub session_message_rate: u64,
    pub session_message_burst: u64,
    /// Client bytes per second per session, and the burst above it.
    pub session_byte_rate: u64,
    pub session_byte_burst: u64,
}

/// Limits applied to each client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerIpLimits {
    /// New connections per second (token bucket).
    pub connection_rate: u32,
    /// Bucket size: connections allowed at once after a quiet spell.
    pub connection_burst: u32,
    /// Concurrent sessions.
    pub max_sessions: u32,
}

/// Passive health: failures seen by sessions eject a backend for a while.
#[derive(Debug, Clone)]
pub struct PassiveHealthConfig {
    /// Consecutive failed dials or abrupt failures that eject a backend.
    pub max_failures: u32,
    /// How long an ejected backend gets no new sessions.
    pub cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct RegionConfig {
    pub name: String,
    pub latitude: f64,
    pub longitude: f64,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub id: String,
    /// `ws://` or `wss://host:port[/prefix]`; the client's path is appended to the prefix.
    pub url: BackendUrl,
    /// Index into `Config::regions`.
    pub region: usize,
    pub weight: u32,
    pub max_sessions: u32,
}

impl Config {
    /// Read, parse and validate a config file. Relative paths inside it (the
    /// GeoIP database) are resolved against the file's directory, and when
    /// missing there, against the working directory.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, base, path)
    }

    /// Parse and validate TOML text; `base` resolves relative paths and
    /// `origin` names the file in errors.
    pub fn from_toml(text: &str, base: &Path, origin: &Path) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n    "),
        })?;
        build(file, base).map_err(|problems| ConfigError::Invalid {
            path: origin.to_path_buf(),
            problems,
        })
    }

    /// The region index of a name.
    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name == name)
    }
}

/// Validate every section and load what it names, section by section: the
/// order problems are listed in.
fn build(file: FileConfig, base: &Path) -> Result<Config, Vec<ConfigProblem>> {
    let mut p = Problems::default();
    let listener = validate::listener(&mut p, &file.listener);
    let (admin_listen, token) = validate::admin(&mut p, &file.admin, listener.public);
    let token = load::admin_token(&mut p, token, base);
    let token = validate::admin_token(&mut p, token);
    let trusted_proxies = validate::client_address(&mut p, &file.client_address);
    let geoip = validate::geoip(&mut p, file.geoip.as_ref())
        .and_then(|database| load::geoip(&mut p, database, base));
    let session_key = validate::session_key(&mut p, &file.session_key);
    let regions = validate::regions(&mut p, &file.regions);
    let backends = validate::backends(&mut p, &file.backends, &regions);
    let steering = validate::steering(&mut p, &file.steering, &regions);
    let health_check = validate::health_check(&mut p, &file.health_check);
    let relay = validate::relay(&mut p, &file.relay);
    let migration = validate::migration(&mut p, &file.migration);
    let passive_health = validate::passive_health(&mut p, &file.passive_health);
    let session_threads = validate::runtime(&mut p, &file.runtime);
    let socketio = validate::socketio(&mut p, &file.socketio, &listener.paths);
    let shutdown_grace = validate::shutdown(&mut p, &file.shutdown);
    let old_process_timeout = validate::upgrade(&mut p, &file.upgrade);
    let limits = validate::limits(&mut p, &file.limits, load::memory_budget);
    // Certificates and keys are read and checked here, so a bad one fails
    // --check-config and a reload.
    let tls = file.tls.as_ref().and_then(|t| {
        validate::tls(&mut p, t);
        load::tls(&mut p, t, base)
    });
    let upstream_tls = validate::upstream_tls(file.upstream_tls.as_ref(), &backends)
        .and_then(|roots| load::upstream_tls(&mut p, roots, base));
    p.finish()?;
    Ok(Config {
        listener,
        admin: AdminConfig {
            listen: admin_listen,
            token,
        },
        trusted_proxies,
        geoip: geoip.expect("no problems means the database opened"),
        session_key,
        steering,
        health_check,
        relay,
        migration,
        passive_health,
        shutdown_grace,
        old_process_timeout,
        session_threads,
        socketio,
        limits,
        tls,
        upstream_tls,
        regions,
        backends,
    })
}
