//! Configuration: the TOML file, its validation into a typed [`Config`], and
//! the errors that name the field at fault.
//!
//! The pipeline is `router.toml -> FileConfig (serde) -> validate -> Config`.
//! Validation never stops at the first problem: it collects every one, each
//! with the dotted path of the field and what is wrong, so an operator fixes a
//! file in one pass. `--check-config` and start-up run exactly this code, and
//! nothing here binds a port. Defaults are the `DEFAULT_*` constants, and
//! `examples/router.toml` documents each option beside its default.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::geo::GeoDb;

pub mod tls;
use tls::TlsConfig;

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
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
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

// === file structs: what the TOML looks like ===

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listener: FileListener,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    client_address: FileClientAddress,
    geoip: Option<FileGeoIp>,
    #[serde(default)]
    session_key: FileSessionKey,
    #[serde(default)]
    steering: FileSteering,
    #[serde(default)]
    health_check: FileHealthCheck,
    #[serde(default)]
    relay: FileRelay,
    #[serde(default)]
    migration: FileMigration,
    #[serde(default)]
    passive_health: FilePassiveHealth,
    #[serde(default)]
    shutdown: FileShutdown,
    #[serde(default)]
    runtime: FileRuntime,
    tls: Option<tls::FileTls>,
    upstream_tls: Option<tls::FileUpstreamTls>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    regions: Vec<FileRegion>,
    #[serde(default)]
    backends: Vec<FileBackend>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileListener {
    public: Option<String>,
    paths: Option<Vec<String>>,
    handshake_timeout: Option<String>,
    max_request_header_bytes: Option<usize>,
    #[serde(default)]
    proxy_protocol_from: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Option<String>,
    token: Option<String>,
    token_file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileClientAddress {
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGeoIp {
    database: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSessionKey {
    source: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSteering {
    default_region: Option<String>,
    #[serde(default)]
    countries: HashMap<String, Vec<String>>,
    #[serde(default)]
    continents: HashMap<String, Vec<String>>,
    dial_timeout: Option<String>,
    max_dial_attempts: Option<u32>,
    max_concurrent_dials: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileHealthCheck {
    path: Option<String>,
    expected_status: Option<u16>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRelay {
    ping_interval: Option<String>,
    idle_timeout: Option<String>,
    max_message_bytes: Option<usize>,
    close_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileMigration {
    queue_max_bytes: Option<usize>,
    replay_max_messages: Option<usize>,
    replay_max_bytes: Option<usize>,
    replay_max_age: Option<String>,
    timeout: Option<String>,
    max_rate_per_backend: Option<u32>,
    max_moves: Option<u32>,
    moves_window: Option<String>,
    max_redeliveries: Option<u32>,
    watermark_interval: Option<String>,
    stall_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FilePassiveHealth {
    max_failures: Option<u32>,
    cooldown: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_sessions: Option<usize>,
    max_buffered_bytes: Option<usize>,
    per_ip_connection_rate: Option<u32>,
    per_ip_connection_burst: Option<u32>,
    per_ip_max_sessions: Option<u32>,
    allowed_origins: Option<Vec<String>>,
    require_origin: Option<bool>,
    session_message_rate: Option<u64>,
    session_message_burst: Option<u64>,
    session_byte_rate: Option<u64>,
    session_byte_burst: Option<u64>,
    #[serde(default)]
    under_attack: FileUnderAttack,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileUnderAttack {
    enabled: Option<bool>,
    per_ip_connection_rate: Option<u32>,
    per_ip_connection_burst: Option<u32>,
    per_ip_max_sessions: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileShutdown {
    grace_period: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRuntime {
    session_threads: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegion {
    name: String,
    latitude: f64,
    longitude: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    id: String,
    url: String,
    region: String,
    weight: Option<u32>,
    max_sessions: Option<u32>,
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
    /// Threads that run sessions, each with its own listener and event
    /// loop (`[runtime] session_threads`); 0 means one per CPU core.
    pub session_threads: usize,
    pub limits: LimitsConfig,
    /// `[tls]`: the public listener speaks TLS with these certificates;
    /// `None` leaves it plain.
    pub tls: Option<TlsConfig>,
    /// The TLS client for `wss://` backends (dials and health checks);
    /// built when a backend is `wss://` or `[upstream_tls]` is present.
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
    /// The database, opened and checked at validation time.
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
    pub consecutive_success: u32,
    /// Consecutive failures that take a healthy backend out.
    pub consecutive_failure: u32,
    /// The TLS client for checks of `wss://` backends (over https).
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
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
    /// Bytes held for clients and backends in all (see [`crate::memory`]);
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

/// A parsed backend URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub host: String,
    pub port: u16,
    /// `wss://`: TLS to the backend, its certificate checked for `host`.
    pub tls: bool,
    /// Path prefix without a trailing slash (may be empty).
    pub prefix: String,
    /// The original text, for display.
    pub raw: String,
}

impl BackendUrl {
    /// Parse `ws://host[:port][/prefix]` or `wss://...` (ports 80 and 443
    /// by default).
    pub fn parse(raw: &str) -> Result<BackendUrl, String> {
        let (rest, tls) = if let Some(rest) = raw.strip_prefix("ws://") {
            (rest, false)
        } else if let Some(rest) = raw.strip_prefix("wss://") {
            (rest, true)
        } else {
            return Err(format!("{raw:?} must start with ws:// or wss://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains('?') || path.contains('#') {
            return Err(format!(
                "{raw:?} must not have a query or fragment: the client's query is forwarded"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| format!("{raw:?} has an unclosed '[' in the host"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{raw:?} has no host"));
        }
        if host.contains('@') {
            return Err(format!("{raw:?} must not carry credentials"));
        }
        let port = match port {
            None | Some("") if tls => 443,
            None | Some("") => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{raw:?} has an invalid port {p:?}"))?,
        };
        Ok(BackendUrl {
            host,
            port,
            tls,
            prefix: path.trim_end_matches('/').to_string(),
            raw: raw.to_string(),
        })
    }

    /// `host:port` as it goes into a Host header or a TCP connect.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
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
        validate(file, base).map_err(|problems| ConfigError::Invalid {
            path: origin.to_path_buf(),
            problems,
        })
    }

    /// The region index of a name.
    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name == name)
    }
}

/// Collects problems while validating.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(ConfigProblem {
            field: field.into(),
            problem: problem.into(),
        });
    }

    /// Note a number outside `lo..=hi`.
    fn between<T: PartialOrd + std::fmt::Display>(&mut self, field: &str, value: T, lo: T, hi: T) {
        if value < lo || value > hi {
            self.add(field, format!("{value} must be between {lo} and {hi}"));
        }
    }

    fn duration(&mut self, field: &str, value: Option<&String>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.add(field, format!("{text:?} must be greater than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.add(
                    field,
                    format!(
                        "{text:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2m\""
                    ),
                );
                default
            }
        }
    }

    fn addr(&mut self, field: &str, value: Option<&String>, default: &str) -> SocketAddr {
        let text = value.map(String::as_str).unwrap_or(default);
        text.parse().unwrap_or_else(|_| {
            self.add(
                field,
                format!("{text:?} is not a socket address; write e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""),
            );
            default.parse().expect("default addresses parse")
        })
    }
}

/// Parse a list of addresses or CIDRs, naming each bad entry.
fn cidrs(p: &mut Problems, field: &str, list: &[String]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, cidr) in list.iter().enumerate() {
        let parsed = cidr
            .parse::<IpNet>()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => out.push(net.trunc()),
            Err(_) => p.add(
                format!("{field}[{i}]"),
                format!("{cidr:?} is not an address or CIDR, e.g. \"10.0.0.0/8\""),
            ),
        }
    }
    out
}

fn validate(file: FileConfig, base: &Path) -> Result<Config, Vec<ConfigProblem>> {
    let mut p = Problems::default();

    // listener
    let public = p.addr(
        "listener.public",
        file.listener.public.as_ref(),
        DEFAULT_PUBLIC_LISTEN,
    );
    let paths = file
        .listener
        .paths
        .unwrap_or_else(|| DEFAULT_PATHS.iter().map(|s| s.to_string()).collect());
    if paths.is_empty() {
        p.add(
            "listener.paths",
            "must list at least one path, e.g. [\"/chat\"]",
        );
    }
    for (i, path) in paths.iter().enumerate() {
        if !path.starts_with('/') || path.contains('?') || path.contains(char::is_whitespace) {
            p.add(
                format!("listener.paths[{i}]"),
                format!("{path:?} must be an absolute path like \"/chat\", without a query"),
            );
        }
    }
    let handshake_timeout = p.duration(
        "listener.handshake_timeout",
        file.listener.handshake_timeout.as_ref(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    );
    let max_request_header_bytes = file
        .listener
        .max_request_header_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_BYTES);
    p.between(
        "listener.max_request_header_bytes",
        max_request_header_bytes,
        1024,
        1024 * 1024,
    );

    let proxy_protocol_from = cidrs(
        &mut p,
        "listener.proxy_protocol_from",
        &file.listener.proxy_protocol_from,
    );

    // admin
    let admin = p.addr(
        "admin.listen",
        file.admin.listen.as_ref(),
        DEFAULT_ADMIN_LISTEN,
    );
    if admin == public && public.port() != 0 {
        p.add("admin.listen", "must differ from listener.public");
    }
    let token = match (&file.admin.token, &file.admin.token_file) {
        (Some(_), Some(_)) => {
            p.add(
                "admin.token_file",
                "set either admin.token or admin.token_file, not both",
            );
            None
        }
        (Some(t), None) => Some(t.clone()),
        (None, Some(path)) => match std::fs::read_to_string(base.join(path)) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                p.add("admin.token_file", format!("cannot read {path:?}: {e}"));
                None
            }
        },
        (None, None) => None,
    };
    if token.as_deref() == Some("") {
        p.add(
            "admin.token",
            "must not be empty (leave it out to disable the check)",
        );
    }

    // client address
    let trusted_proxies = cidrs(
        &mut p,
        "client_address.trusted_proxies",
        &file.client_address.trusted_proxies,
    );

    // geoip
    let geoip = match &file.geoip {
        None => {
            p.add(
                "geoip.database",
                "is required: the path of a GeoIP2/GeoLite2 City or Country .mmdb file",
            );
            None
        }
        Some(g) => {
            let mut path = PathBuf::from(&g.database);
            if path.is_relative() && base.join(&path).exists() {
                path = base.join(&path);
            }
            match GeoDb::open(&path) {
                Ok(db) => Some(GeoIpConfig {
                    database: path,
                    db: Arc::new(db),
                }),
                Err(e) => {
                    p.add("geoip.database", e.to_string());
                    None
                }
            }
        }
    };

    // session key
    let key_name = file
        .session_key
        .name
        .clone()
        .unwrap_or_else(|| DEFAULT_SESSION_KEY_NAME.to_string());
    if key_name.is_empty() || !key_name.bytes().all(|b| b.is_ascii_graphic()) {
        p.add(
            "session_key.name",
            format!("{key_name:?} must be a non-empty token"),
        );
    }
    let session_key = match file.session_key.source.as_deref().unwrap_or("query") {
        "query" => SessionKeySource::Query(key_name),
        "header" => SessionKeySource::Header(key_name.to_ascii_lowercase()),
        "cookie" => SessionKeySource::Cookie(key_name),
        other => {
            p.add(
                "session_key.source",
                format!("{other:?} is not one of \"query\", \"header\", \"cookie\""),
            );
            SessionKeySource::Query(key_name)
        }
    };

    // regions
    let mut regions = Vec::new();
    let mut region_names = HashSet::new();
    if file.regions.is_empty() {
        p.add("regions", "must define at least one [[regions]] entry");
    }
    for (i, r) in file.regions.iter().enumerate() {
        if r.name.is_empty() {
            p.add(format!("regions[{i}].name"), "must not be empty");
        } else if !region_names.insert(r.name.clone()) {
            p.add(
                format!("regions[{i}].name"),
                format!("duplicate region {:?}", r.name),
            );
        }
        if !(-90.0..=90.0).contains(&r.latitude) {
            p.add(
                format!("regions[{i}].latitude"),
                format!("{} is outside -90..90", r.latitude),
            );
        }
        if !(-180.0..=180.0).contains(&r.longitude) {
            p.add(
                format!("regions[{i}].longitude"),
                format!("{} is outside -180..180", r.longitude),
            );
        }
        regions.push(RegionConfig {
            name: r.name.clone(),
            latitude: r.latitude,
            longitude: r.longitude,
        });
    }
    let region_of = |name: &str| regions.iter().position(|r| r.name == name);
    let known = || {
        regions
            .iter()
            .map(|r| format!("{:?}", r.name))
            .collect::<Vec<_>>()
            .join(", ")
    };

    // backends
    let mut backends = Vec::new();
    let mut ids = HashSet::new();
    if file.backends.is_empty() {
        p.add("backends", "must define at least one [[backends]] entry");
    }
    for (i, b) in file.backends.iter().enumerate() {
        if b.id.is_empty()
            || !b
                .id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        {
            p.add(
                format!("backends[{i}].id"),
                format!(
                    "{:?} must be non-empty and use only letters, digits, '-', '_' or '.'",
                    b.id
                ),
            );
        } else if !ids.insert(b.id.clone()) {
            p.add(
                format!("backends[{i}].id"),
                format!("duplicate backend id {:?}", b.id),
            );
        }
        let url = BackendUrl::parse(&b.url).map_err(|e| p.add(format!("backends[{i}].url"), e));
        let region = region_of(&b.region);
        if region.is_none() {
            p.add(
                format!("backends[{i}].region"),
                format!(
                    "unknown region {:?}; defined regions: {}",
                    b.region,
                    known()
                ),
            );
        }
        let weight = b.weight.unwrap_or(DEFAULT_WEIGHT);
        if weight == 0 {
            p.add(
                format!("backends[{i}].weight"),
                "must be at least 1 (drain a backend instead of weighting it 0)",
            );
        }
        let max_sessions = b.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS);
        if max_sessions == 0 {
            p.add(format!("backends[{i}].max_sessions"), "must be at least 1");
        }
        if let (Ok(url), Some(region)) = (url, region) {
            backends.push(BackendConfig {
                id: b.id.clone(),
                url,
                region,
                weight,
                max_sessions,
            });
        }
    }

    // steering
    let default_region = match &file.steering.default_region {
        Some(name) => region_of(name).unwrap_or_else(|| {
            p.add(
                "steering.default_region",
                format!("unknown region {name:?}; defined regions: {}", known()),
            );
            0
        }),
        None => {
            if regions.len() > 1 {
                p.add(
                    "steering.default_region",
                    "is required when there is more than one region",
                );
            }
            0
        }
    };
    let mut region_map = |section: &str, map: &HashMap<String, Vec<String>>, code_len: usize| {
        let mut out = HashMap::new();
        for (code, names) in map {
            let field = format!("steering.{section}.{code}");
            if code.len() != code_len || !code.bytes().all(|b| b.is_ascii_alphabetic()) {
                p.add(&field, format!("{code:?} is not a {code_len}-letter code"));
            }
            if names.is_empty() {
                p.add(&field, "must list at least one region");
            }
            let mut list = Vec::new();
            for name in names {
                match region_of(name) {
                    Some(r) => list.push(r),
                    None => p.add(
                        &field,
                        format!("unknown region {name:?}; defined regions: {}", known()),
                    ),
                }
            }
            out.insert(code.to_ascii_uppercase(), list);
        }
        out
    };
    let countries = region_map("countries", &file.steering.countries, 2);
    let continents = region_map("continents", &file.steering.continents, 2);
    let dial_timeout = p.duration(
        "steering.dial_timeout",
        file.steering.dial_timeout.as_ref(),
        DEFAULT_DIAL_TIMEOUT,
    );
    let max_dial_attempts = file
        .steering
        .max_dial_attempts
        .unwrap_or(DEFAULT_MAX_DIAL_ATTEMPTS);
    p.between("steering.max_dial_attempts", max_dial_attempts, 1, 16);
    let max_concurrent_dials = file
        .steering
        .max_concurrent_dials
        .unwrap_or(DEFAULT_MAX_CONCURRENT_DIALS);
    p.between(
        "steering.max_concurrent_dials",
        max_concurrent_dials,
        1,
        65_535,
    );

    // health checks
    let hc = &file.health_check;
    let health_path = hc
        .path
        .clone()
        .unwrap_or_else(|| DEFAULT_HEALTH_PATH.into());
    if !health_path.starts_with('/') {
        p.add(
            "health_check.path",
            format!("{health_path:?} must start with '/'"),
        );
    }
    let expected_status = hc.expected_status.unwrap_or(DEFAULT_HEALTH_STATUS);
    if !(100..=599).contains(&expected_status) {
        p.add(
            "health_check.expected_status",
            format!("{expected_status} is not an HTTP status"),
        );
    }
    let interval = p.duration(
        "health_check.interval",
        hc.interval.as_ref(),
        DEFAULT_HEALTH_INTERVAL,
    );
    let timeout = p.duration(
        "health_check.timeout",
        hc.timeout.as_ref(),
        DEFAULT_HEALTH_TIMEOUT,
    );
    if timeout > interval {
        p.add(
            "health_check.timeout",
            "must not be longer than health_check.interval",
        );
    }
    let rise = hc.rise.unwrap_or(DEFAULT_HEALTH_RISE);
    let fall = hc.fall.unwrap_or(DEFAULT_HEALTH_FALL);
    if rise == 0 {
        p.add("health_check.rise", "must be at least 1");
    }
    if fall == 0 {
        p.add("health_check.fall", "must be at least 1");
    }

    // relay
    let r = &file.relay;
    let relay = RelayConfig {
        ping_interval: p.duration(
            "relay.ping_interval",
            r.ping_interval.as_ref(),
            DEFAULT_PING_INTERVAL,
        ),
        idle_timeout: p.duration(
            "relay.idle_timeout",
            r.idle_timeout.as_ref(),
            DEFAULT_IDLE_TIMEOUT,
        ),
        max_message_bytes: r.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
        close_timeout: p.duration(
            "relay.close_timeout",
            r.close_timeout.as_ref(),
            DEFAULT_CLOSE_TIMEOUT,
        ),
    };
    if relay.max_message_bytes < 125 {
        p.add("relay.max_message_bytes", "must be at least 125");
    }
    if relay.idle_timeout <= relay.ping_interval {
        p.add(
            "relay.idle_timeout",
            "must be longer than relay.ping_interval, or every quiet session is cut",
        );
    }

    // migration, passive health, shutdown
    let mg = &file.migration;
    let migration = MigrationConfig {
        queue_max_bytes: mg.queue_max_bytes.unwrap_or(DEFAULT_QUEUE_MAX_BYTES),
        replay_max_messages: mg
            .replay_max_messages
            .unwrap_or(DEFAULT_REPLAY_MAX_MESSAGES),
        replay_max_bytes: mg.replay_max_bytes.unwrap_or(DEFAULT_REPLAY_MAX_BYTES),
        replay_max_age: p.duration(
            "migration.replay_max_age",
            mg.replay_max_age.as_ref(),
            DEFAULT_REPLAY_MAX_AGE,
        ),
        timeout: p.duration(
            "migration.timeout",
            mg.timeout.as_ref(),
            DEFAULT_MIGRATION_TIMEOUT,
        ),
        max_rate_per_backend: mg.max_rate_per_backend.unwrap_or(DEFAULT_MIGRATION_RATE),
        max_moves: mg.max_moves.unwrap_or(DEFAULT_MAX_MOVES),
        moves_window: p.duration(
            "migration.moves_window",
            mg.moves_window.as_ref(),
            DEFAULT_MOVES_WINDOW,
        ),
        max_redeliveries: mg.max_redeliveries.unwrap_or(DEFAULT_MAX_REDELIVERIES),
        watermark_interval: p.duration(
            "migration.watermark_interval",
            mg.watermark_interval.as_ref(),
            DEFAULT_WATERMARK_INTERVAL,
        ),
        stall_timeout: p.duration(
            "migration.stall_timeout",
            mg.stall_timeout.as_ref(),
            DEFAULT_STALL_TIMEOUT,
        ),
    };
    if migration.replay_max_bytes < 1024 {
        p.add("migration.replay_max_bytes", "must be at least 1024 bytes");
    }
    if migration.stall_timeout <= migration.watermark_interval {
        p.add(
            "migration.stall_timeout",
            "must be longer than migration.watermark_interval",
        );
    }
    if migration.max_moves == 0 {
        p.add("migration.max_moves", "must be at least 1 move");
    }
    if migration.max_redeliveries == 0 {
        p.add("migration.max_redeliveries", "must be at least 1 backend");
    }
    if migration.queue_max_bytes == 0 {
        p.add("migration.queue_max_bytes", "must be at least 1");
    }
    if migration.max_rate_per_backend == 0 {
        p.add(
            "migration.max_rate_per_backend",
            "must be at least 1 session per second",
        );
    }
    let ph = &file.passive_health;
    let passive_health = PassiveHealthConfig {
        max_failures: ph.max_failures.unwrap_or(DEFAULT_PASSIVE_FAILURES),
        cooldown: p.duration(
            "passive_health.cooldown",
            ph.cooldown.as_ref(),
            DEFAULT_PASSIVE_COOLDOWN,
        ),
    };
    if passive_health.max_failures == 0 {
        p.add("passive_health.max_failures", "must be at least 1");
    }
    let session_threads = file.runtime.session_threads.unwrap_or(0);
    if session_threads > 1024 {
        p.add(
            "runtime.session_threads",
            format!("{session_threads} must be at most 1024 (0: one per CPU core)"),
        );
    }
    let shutdown_grace = match &file.shutdown.grace_period {
        Some(text) if text.trim() == "0s" || text.trim() == "0" => Duration::ZERO,
        other => p.duration(
            "shutdown.grace_period",
            other.as_ref(),
            DEFAULT_SHUTDOWN_GRACE,
        ),
    };

    // limits
    let l = &file.limits;
    let ua = &l.under_attack;
    let per_ip = PerIpLimits {
        connection_rate: l.per_ip_connection_rate.unwrap_or(0),
        connection_burst: l.per_ip_connection_burst.unwrap_or(0),
        max_sessions: l.per_ip_max_sessions.unwrap_or(0),
    };
    let under_attack = PerIpLimits {
        connection_rate: ua
            .per_ip_connection_rate
            .unwrap_or(DEFAULT_ATTACK_CONNECTION_RATE),
        connection_burst: ua
            .per_ip_connection_burst
            .unwrap_or(DEFAULT_ATTACK_CONNECTION_BURST),
        max_sessions: ua
            .per_ip_max_sessions
            .unwrap_or(DEFAULT_ATTACK_MAX_SESSIONS),
    };
    let allowed_origins = l.allowed_origins.clone().unwrap_or_default();
    for (i, origin) in allowed_origins.iter().enumerate() {
        let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
            && !origin
                .trim_end_matches('/')
                .contains(|c: char| c.is_whitespace())
            && origin.matches('/').count() == 2;
        if !valid {
            p.add(
                format!("limits.allowed_origins[{i}]"),
                format!("{origin:?} must be an origin like \"https://chat.example.com\" (scheme, host, optional port; no path)"),
            );
        }
    }
    let max_buffered_bytes = l
        .max_buffered_bytes
        .unwrap_or_else(crate::memory::default_budget);
    if max_buffered_bytes < MIN_BUFFERED_BYTES {
        p.add(
            "limits.max_buffered_bytes",
            format!("{max_buffered_bytes} must be at least {MIN_BUFFERED_BYTES} (16 MiB)"),
        );
    }
    let limits = LimitsConfig {
        max_sessions: l.max_sessions.unwrap_or(0),
        max_buffered_bytes,
        per_ip,
        under_attack,
        start_under_attack: ua.enabled.unwrap_or(false),
        allowed_origins,
        require_origin: l.require_origin.unwrap_or(false),
        session_message_rate: l.session_message_rate.unwrap_or(0),
        session_message_burst: l.session_message_burst.unwrap_or(0),
        session_byte_rate: l.session_byte_rate.unwrap_or(0),
        session_byte_burst: l.session_byte_burst.unwrap_or(0),
    };
    // tls: certificates and keys are read and checked here, so a bad one
    // fails --check-config and a reload.
    let tls = file
        .tls
        .as_ref()
        .and_then(|t| tls::validate(t, base).map_err(|e| p.0.extend(e)).ok());
    let upstream_tls = if file.upstream_tls.is_some() || backends.iter().any(|b| b.url.tls) {
        tls::upstream_client_config(file.upstream_tls.as_ref(), base)
            .map_err(|e| p.0.extend(e))
            .ok()
    } else {
        None
    };

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Config {
        listener: ListenerConfig {
            public,
            paths,
            handshake_timeout,
            max_request_header_bytes,
            proxy_protocol_from,
        },
        admin: AdminConfig {
            listen: admin,
            token,
        },
        trusted_proxies,
        geoip: geoip.expect("no problems means the database opened"),
        session_key,
        steering: SteeringConfig {
            default_region,
            countries,
            continents,
            dial_timeout,
            max_dial_attempts,
            max_concurrent_dials,
        },
        health_check: HealthCheckConfig {
            path: health_path,
            expected_status,
            interval,
            timeout,
            consecutive_success: rise,
            consecutive_failure: fall,
            upstream_tls: upstream_tls.clone(),
        },
        relay,
        migration,
        passive_health,
        shutdown_grace,
        session_threads,
        limits,
        tls,
        upstream_tls,
        regions,
        backends,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls_parse() {
        let u = BackendUrl::parse("ws://10.0.0.1:9001/chat/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("10.0.0.1", 9001, "/chat")
        );
        let u = BackendUrl::parse("ws://[::1]:9001").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.authority().as_str()),
            ("::1", 9001, "[::1]:9001")
        );
        assert_eq!(BackendUrl::parse("ws://example.com").unwrap().port, 80);
        let u = BackendUrl::parse("wss://example.com/chat").unwrap();
        assert_eq!((u.tls, u.port, u.prefix.as_str()), (true, 443, "/chat"));
        assert!(!BackendUrl::parse("ws://example.com").unwrap().tls);
        for bad in [
            "http://x:1",
            "ws://:1",
            "ws://x:0",
            "ws://x:99999",
            "ws://x:1/a?b",
            "x",
        ] {
            assert!(BackendUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
