//! Validation: each section of the parsed file checked and turned into the
//! values the router runs on, with the defaults filled in. Every problem is
//! collected in [`Problems`] with the dotted path of its field, so one pass
//! reports them all. No I/O: where a value names a file (the GeoIP
//! database, the token file, certificates, CA roots), this says what to
//! load and `load` opens it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use rustls::pki_types::DnsName;

use super::file::{
    FileAdmin, FileBackend, FileCertificate, FileClientAddress, FileGeoIp, FileHealthCheck,
    FileLimits, FileListener, FileMigration, FilePassiveHealth, FileRegion, FileRelay, FileRuntime,
    FileSessionKey, FileShutdown, FileSocketIo, FileSteering, FileTls, FileUpgrade,
    FileUpstreamTls,
};
use super::{
    BackendConfig, BackendUrl, ConfigProblem, DEFAULT_ADMIN_LISTEN,
    DEFAULT_ATTACK_CONNECTION_BURST, DEFAULT_ATTACK_CONNECTION_RATE, DEFAULT_ATTACK_MAX_SESSIONS,
    DEFAULT_CLOSE_TIMEOUT, DEFAULT_DIAL_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_HEALTH_FALL,
    DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_PATH, DEFAULT_HEALTH_RISE, DEFAULT_HEALTH_STATUS,
    DEFAULT_HEALTH_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONCURRENT_DIALS,
    DEFAULT_MAX_DIAL_ATTEMPTS, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_MOVES,
    DEFAULT_MAX_REDELIVERIES, DEFAULT_MAX_REQUEST_HEADER_BYTES, DEFAULT_MAX_SESSIONS,
    DEFAULT_MIGRATION_RATE, DEFAULT_MIGRATION_TIMEOUT, DEFAULT_MOVES_WINDOW,
    DEFAULT_OLD_PROCESS_TIMEOUT, DEFAULT_PASSIVE_COOLDOWN, DEFAULT_PASSIVE_FAILURES, DEFAULT_PATHS,
    DEFAULT_PING_INTERVAL, DEFAULT_PUBLIC_LISTEN, DEFAULT_QUEUE_MAX_BYTES, DEFAULT_REPLAY_MAX_AGE,
    DEFAULT_REPLAY_MAX_BYTES, DEFAULT_REPLAY_MAX_MESSAGES, DEFAULT_SESSION_KEY_NAME,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_SOCKETIO_MAX_BODY_BYTES, DEFAULT_SOCKETIO_POLL_TIMEOUT,
    DEFAULT_STALL_TIMEOUT, DEFAULT_WATERMARK_INTERVAL, DEFAULT_WEIGHT, HealthCheckConfig,
    LimitsConfig, ListenerConfig, MIN_BUFFERED_BYTES, MigrationConfig, PassiveHealthConfig,
    PerIpLimits, RegionConfig, RelayConfig, SessionKeySource, SocketIoConfig, SteeringConfig,
};

/// Collects problems while validating (and loading).
#[derive(Default)]
pub(super) struct Problems(Vec<ConfigProblem>);

impl Problems {
    pub(super) fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(ConfigProblem {
            field: field.into(),
            problem: problem.into(),
        });
    }

    /// How many problems so far.
    pub(super) fn count(&self) -> usize {
        self.0.len()
    }

    /// Every problem collected, if there is one.
    pub(super) fn finish(self) -> Result<(), Vec<ConfigProblem>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
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

/// `[listener]`.
pub(super) fn listener(p: &mut Problems, file: &FileListener) -> ListenerConfig {
    let public = p.addr(
        "listener.public",
        file.public.as_ref(),
        DEFAULT_PUBLIC_LISTEN,
    );
    let paths = file
        .paths
        .clone()
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
        file.handshake_timeout.as_ref(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    );
    let max_request_header_bytes = file
        .max_request_header_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_BYTES);
    p.between(
        "listener.max_request_header_bytes",
        max_request_header_bytes,
        1024,
        1024 * 1024,
    );
    let proxy_protocol_from = cidrs(p, "listener.proxy_protocol_from", &file.proxy_protocol_from);
    ListenerConfig {
        public,
        paths,
        handshake_timeout,
        max_request_header_bytes,
        proxy_protocol_from,
    }
}

/// Where the admin token comes from, before any file is read.
pub(super) enum AdminToken<'a> {
    Unset,
    Inline(&'a str),
    /// `admin.token_file`, as written; `load` reads it.
    File(&'a str),
}

/// `[admin]`: the listen address (not the public one) and where the token
/// comes from; [`admin_token`] checks the token once it is known.
pub(super) fn admin<'a>(
    p: &mut Problems,
    file: &'a FileAdmin,
    public: SocketAddr,
) -> (SocketAddr, AdminToken<'a>) {
    let listen = p.addr("admin.listen", file.listen.as_ref(), DEFAULT_ADMIN_LISTEN);
    if listen == public && public.port() != 0 {
        p.add("admin.listen", "must differ from listener.public");
    }
    let token = match (&file.token, &file.token_file) {
        (Some(_), Some(_)) => {
            p.add(
                "admin.token_file",
                "set either admin.token or admin.token_file, not both",
            );
            AdminToken::Unset
        }
        (Some(t), None) => AdminToken::Inline(t),
        (None, Some(path)) => AdminToken::File(path),
        (None, None) => AdminToken::Unset,
    };
    (listen, token)
}

/// The admin token, inline or read from its file: not empty.
pub(super) fn admin_token(p: &mut Problems, token: Option<String>) -> Option<String> {
    if token.as_deref() == Some("") {
        p.add(
            "admin.token",
            "must not be empty (leave it out to disable the check)",
        );
    }
    token
}

/// `[client_address]`: the trusted proxies.
pub(super) fn client_address(p: &mut Problems, file: &FileClientAddress) -> Vec<IpNet> {
    cidrs(p, "client_address.trusted_proxies", &file.trusted_proxies)
}

/// `[geoip]`: required; the database path as written, for `load` to open.
pub(super) fn geoip<'a>(p: &mut Problems, file: Option<&'a FileGeoIp>) -> Option<&'a str> {
    if file.is_none() {
        p.add(
            "geoip.database",
            "is required: the path of a GeoIP2/GeoLite2 City or Country .mmdb file",
        );
    }
    file.map(|g| g.database.as_str())
}

/// `[session_key]`.
pub(super) fn session_key(p: &mut Problems, file: &FileSessionKey) -> SessionKeySource {
    let key_name = file
        .name
        .clone()
        .unwrap_or_else(|| DEFAULT_SESSION_KEY_NAME.to_string());
    if key_name.is_empty() || !key_name.bytes().all(|b| b.is_ascii_graphic()) {
        p.add(
            "session_key.name",
            format!("{key_name:?} must be a non-empty token"),
        );
    }
    match file.source.as_deref().unwrap_or("query") {
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
    }
}

/// `[[regions]]`: at least one, names unique, coordinates on the globe.
pub(super) fn regions(p: &mut Problems, file: &[FileRegion]) -> Vec<RegionConfig> {
    let mut regions = Vec::new();
    let mut region_names = HashSet::new();
    if file.is_empty() {
        p.add("regions", "must define at least one [[regions]] entry");
    }
    for (i, r) in file.iter().enumerate() {
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
    regions
}

fn region_of(regions: &[RegionConfig], name: &str) -> Option<usize> {
    regions.iter().position(|r| r.name == name)
}

/// The defined region names, for a problem about an unknown one.
fn known(regions: &[RegionConfig]) -> String {
    regions
        .iter()
        .map(|r| format!("{:?}", r.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `[[backends]]`: at least one, ids unique, URLs that parse, regions that
/// exist.
pub(super) fn backends(
    p: &mut Problems,
    file: &[FileBackend],
    regions: &[RegionConfig],
) -> Vec<BackendConfig> {
    let mut backends = Vec::new();
    let mut ids = HashSet::new();
    if file.is_empty() {
        p.add("backends", "must define at least one [[backends]] entry");
    }
    for (i, b) in file.iter().enumerate() {
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
        let region = region_of(regions, &b.region);
        if region.is_none() {
            p.add(
                format!("backends[{i}].region"),
                format!(
                    "unknown region {:?}; defined regions: {}",
                    b.region,
                    known(regions)
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
    backends
}

/// `[steering]`: the default region (required with more than one), the
/// country and continent maps, and the dial bounds.
pub(super) fn steering(
    p: &mut Problems,
    file: &FileSteering,
    regions: &[RegionConfig],
) -> SteeringConfig {
    let default_region = match &file.default_region {
        Some(name) => region_of(regions, name).unwrap_or_else(|| {
            p.add(
                "steering.default_region",
                format!(
                    "unknown region {name:?}; defined regions: {}",
                    known(regions)
                ),
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
    let countries = region_map(p, regions, "countries", &file.countries, 2);
    let continents = region_map(p, regions, "continents", &file.continents, 2);
    let dial_timeout = p.duration(
        "steering.dial_timeout",
        file.dial_timeout.as_ref(),
        DEFAULT_DIAL_TIMEOUT,
    );
    let max_dial_attempts = file.max_dial_attempts.unwrap_or(DEFAULT_MAX_DIAL_ATTEMPTS);
    p.between("steering.max_dial_attempts", max_dial_attempts, 1, 16);
    let max_concurrent_dials = file
        .max_concurrent_dials
        .unwrap_or(DEFAULT_MAX_CONCURRENT_DIALS);
    p.between(
        "steering.max_concurrent_dials",
        max_concurrent_dials,
        1,
        65_535,
    );
    SteeringConfig {
        default_region,
        countries,
        continents,
        dial_timeout,
        max_dial_attempts,
        max_concurrent_dials,
    }
}

/// `steering.countries` or `steering.continents`: code -> region indices.
fn region_map(
    p: &mut Problems,
    regions: &[RegionConfig],
    section: &str,
    map: &HashMap<String, Vec<String>>,
    code_len: usize,
) -> HashMap<String, Vec<usize>> {
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
            match region_of(regions, name) {
                Some(r) => list.push(r),
                None => p.add(
                    &field,
                    format!(
                        "unknown region {name:?}; defined regions: {}",
                        known(regions)
                    ),
                ),
            }
        }
        out.insert(code.to_ascii_uppercase(), list);
    }
    out
}

/// `[health_check]`.
pub(super) fn health_check(p: &mut Problems, file: &FileHealthCheck) -> HealthCheckConfig {
    let path = file
        .path
        .clone()
        .unwrap_or_else(|| DEFAULT_HEALTH_PATH.into());
    if !path.starts_with('/') {
        p.add("health_check.path", format!("{path:?} must start with '/'"));
    }
    let expected_status = file.expected_status.unwrap_or(DEFAULT_HEALTH_STATUS);
    if !(100..=599).contains(&expected_status) {
        p.add(
            "health_check.expected_status",
            format!("{expected_status} is not an HTTP status"),
        );
    }
    let interval = p.duration(
        "health_check.interval",
        file.interval.as_ref(),
        DEFAULT_HEALTH_INTERVAL,
    );
    let timeout = p.duration(
        "health_check.timeout",
        file.timeout.as_ref(),
        DEFAULT_HEALTH_TIMEOUT,
    );
    if timeout > interval {
        p.add(
            "health_check.timeout",
            "must not be longer than health_check.interval",
        );
    }
    let rise = file.rise.unwrap_or(DEFAULT_HEALTH_RISE);
    let fall = file.fall.unwrap_or(DEFAULT_HEALTH_FALL);
    if rise == 0 {
        p.add("health_check.rise", "must be at least 1");
    }
    if fall == 0 {
        p.add("health_check.fall", "must be at least 1");
    }
    HealthCheckConfig {
        path,
        expected_status,
        interval,
        timeout,
        rise,
        fall,
    }
}

/// `[relay]`.
pub(super) fn relay(p: &mut Problems, file: &FileRelay) -> RelayConfig {
    let relay = RelayConfig {
        ping_interval: p.duration(
            "relay.ping_interval",
            file.ping_interval.as_ref(),
            DEFAULT_PING_INTERVAL,
        ),
        idle_timeout: p.duration(
            "relay.idle_timeout",
            file.idle_timeout.as_ref(),
            DEFAULT_IDLE_TIMEOUT,
        ),
        max_message_bytes: file.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
        close_timeout: p.duration(
            "relay.close_timeout",
            file.close_timeout.as_ref(),
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
    relay
}

/// `[migration]`.
pub(super) fn migration(p: &mut Problems, file: &FileMigration) -> MigrationConfig {
    let migration = MigrationConfig {
        queue_max_bytes: file.queue_max_bytes.unwrap_or(DEFAULT_QUEUE_MAX_BYTES),
        replay_max_messages: file
            .replay_max_messages
            .unwrap_or(DEFAULT_REPLAY_MAX_MESSAGES),
        replay_max_bytes: file.replay_max_bytes.unwrap_or(DEFAULT_REPLAY_MAX_BYTES),
        replay_max_age: p.duration(
            "migration.replay_max_age",
            file.replay_max_age.as_ref(),
            DEFAULT_REPLAY_MAX_AGE,
        ),
        timeout: p.duration(
            "migration.timeout",
            file.timeout.as_ref(),
            DEFAULT_MIGRATION_TIMEOUT,
        ),
        max_rate_per_backend: file.max_rate_per_backend.unwrap_or(DEFAULT_MIGRATION_RATE),
        max_moves: file.max_moves.unwrap_or(DEFAULT_MAX_MOVES),
        moves_window: p.duration(
            "migration.moves_window",
            file.moves_window.as_ref(),
            DEFAULT_MOVES_WINDOW,
        ),
        max_redeliveries: file.max_redeliveries.unwrap_or(DEFAULT_MAX_REDELIVERIES),
        watermark_interval: p.duration(
            "migration.watermark_interval",
            file.watermark_interval.as_ref(),
            DEFAULT_WATERMARK_INTERVAL,
        ),
        stall_timeout: p.duration(
            "migration.stall_timeout",
            file.stall_timeout.as_ref(),
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
    migration
}

/// `[passive_health]`.
pub(super) fn passive_health(p: &mut Problems, file: &FilePassiveHealth) -> PassiveHealthConfig {
    let passive_health = PassiveHealthConfig {
        max_failures: file.max_failures.unwrap_or(DEFAULT_PASSIVE_FAILURES),
        cooldown: p.duration(
            "passive_health.cooldown",
            file.cooldown.as_ref(),
            DEFAULT_PASSIVE_COOLDOWN,
        ),
    };
    if passive_health.max_failures == 0 {
        p.add("passive_health.max_failures", "must be at least 1");
    }
    passive_health
}

/// `[runtime]`: the session threads (0: one per CPU core).
pub(super) fn runtime(p: &mut Problems, file: &FileRuntime) -> usize {
    let session_threads = file.session_threads.unwrap_or(0);
    if session_threads > 1024 {
        p.add(
            "runtime.session_threads",
            format!("{session_threads} must be at most 1024 (0: one per CPU core)"),
        );
    }
    session_threads
}

/// `[socketio]`: prefixes that start and end with "/" (engine.io's `path`),
/// none of them also an exact WebSocket path.
pub(super) fn socketio(
    p: &mut Problems,
    file: &FileSocketIo,
    ws_paths: &[String],
) -> SocketIoConfig {
    for (i, path) in file.paths.iter().enumerate() {
        let field = format!("socketio.paths[{i}]");
        if !path.starts_with('/')
            || !path.ends_with('/')
            || path.contains(['?', '#'])
            || path.contains(char::is_whitespace)
        {
            p.add(
                field,
                format!("{path:?} must be a path prefix that starts and ends with \"/\", like \"/socket.io/\""),
            );
        } else if ws_paths
            .iter()
            .any(|ws| ws.starts_with(path.as_str()) || ws == path.trim_end_matches('/'))
        {
            p.add(
                field,
                format!("{path:?} covers a path in listener.paths; a path is either plain WebSocket or Socket.IO"),
            );
        } else if file.paths[..i].contains(path) {
            p.add(field, format!("{path:?} is listed twice"));
        }
    }
    let max_body_bytes = file
        .max_body_bytes
        .unwrap_or(DEFAULT_SOCKETIO_MAX_BODY_BYTES);
    p.between(
        "socketio.max_body_bytes",
        max_body_bytes,
        1024,
        64 * 1024 * 1024,
    );
    let poll_timeout = p.duration(
        "socketio.poll_timeout",
        file.poll_timeout.as_ref(),
        DEFAULT_SOCKETIO_POLL_TIMEOUT,
    );
    SocketIoConfig {
        paths: file.paths.clone(),
        max_body_bytes,
        poll_timeout,
    }
}

/// `[shutdown]`: the grace period ("0s" allowed: close at once).
pub(super) fn shutdown(p: &mut Problems, file: &FileShutdown) -> Duration {
    match &file.grace_period {
        Some(text) if text.trim() == "0s" || text.trim() == "0" => Duration::ZERO,
        other => p.duration(
            "shutdown.grace_period",
            other.as_ref(),
            DEFAULT_SHUTDOWN_GRACE,
        ),
    }
}

/// `[upgrade]`: how long sessions left in the old process relay.
pub(super) fn upgrade(p: &mut Problems, file: &FileUpgrade) -> Duration {
    p.duration(
        "upgrade.old_process_timeout",
        file.old_process_timeout.as_ref(),
        DEFAULT_OLD_PROCESS_TIMEOUT,
    )
}

/// `[limits]`. `default_budget` gives `max_buffered_bytes` when the file
/// does not (it asks the system, so the caller passes it in).
pub(super) fn limits(
    p: &mut Problems,
    file: &FileLimits,
    default_budget: impl FnOnce() -> usize,
) -> LimitsConfig {
    let ua = &file.under_attack;
    let per_ip = PerIpLimits {
        connection_rate: file.per_ip_connection_rate.unwrap_or(0),
        connection_burst: file.per_ip_connection_burst.unwrap_or(0),
        max_sessions: file.per_ip_max_sessions.unwrap_or(0),
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
    let allowed_origins = file.allowed_origins.clone().unwrap_or_default();
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
    let max_buffered_bytes = file.max_buffered_bytes.unwrap_or_else(default_budget);
    if max_buffered_bytes < MIN_BUFFERED_BYTES {
        p.add(
            "limits.max_buffered_bytes",
            format!("{max_buffered_bytes} must be at least {MIN_BUFFERED_BYTES} (16 MiB)"),
        );
    }
    LimitsConfig {
        max_sessions: file.max_sessions.unwrap_or(0),
        max_buffered_bytes,
        per_ip,
        under_attack,
        start_under_attack: ua.enabled.unwrap_or(false),
        allowed_origins,
        require_origin: file.require_origin.unwrap_or(false),
        session_message_rate: file.session_message_rate.unwrap_or(0),
        session_message_burst: file.session_message_burst.unwrap_or(0),
        session_byte_rate: file.session_byte_rate.unwrap_or(0),
        session_byte_burst: file.session_byte_burst.unwrap_or(0),
    }
}

/// `[tls]`: at least one certificate. Each certificate's names are checked
/// by [`certificate_names`] as `load` reads its files, so the problems of
/// one certificate list together, in file order.
pub(super) fn tls(p: &mut Problems, file: &FileTls) {
    if file.certificates.is_empty() {
        p.add(
            "tls.certificates",
            "must list at least one { cert = \"chain.pem\", key = \"key.pem\" } (leave [tls] out for a plain listener)",
        );
    }
}

/// `tls.certificates[i].server_names`: DNS names (lower-cased; a `*.`
/// wildcard covers one label), each served by one certificate only, and
/// listed for every certificate but the first (the default). `seen` maps
/// each name to the certificate that serves it.
pub(super) fn certificate_names(
    p: &mut Problems,
    i: usize,
    certificate: &FileCertificate,
    seen: &mut HashMap<String, usize>,
) -> Vec<String> {
    let mut names = Vec::new();
    for (j, name) in certificate.server_names.iter().enumerate() {
        let name = name.trim().to_ascii_lowercase();
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        if DnsName::try_from(bare).is_err() || bare.contains('*') {
            p.add(
                format!("tls.certificates[{i}].server_names[{j}]"),
                format!("{name:?} is not a DNS name (\"chat.example.com\" or \"*.example.com\")"),
            );
        } else if let Some(other) = seen.insert(name.clone(), i) {
            p.add(
                format!("tls.certificates[{i}].server_names[{j}]"),
                format!("{name:?} is already served by tls.certificates[{other}]"),
            );
        }
        names.push(name);
    }
    if i > 0 && certificate.server_names.is_empty() {
        p.add(
            format!("tls.certificates[{i}].server_names"),
            "must list the names this certificate serves (only the first certificate is used without a matching name)",
        );
    }
    names
}

/// The CA roots the client for `wss://` backends trusts.
pub(super) enum UpstreamRoots<'a> {
    /// The platform's roots.
    Platform,
    /// `upstream_tls.ca_file`, as written; `load` reads it.
    CaFile(&'a str),
}

/// `[upstream_tls]`: the client is built when a backend is `wss://` or
/// the section is present; its roots come from `ca_file` when set.
pub(super) fn upstream_tls<'a>(
    file: Option<&'a FileUpstreamTls>,
    backends: &[BackendConfig],
) -> Option<UpstreamRoots<'a>> {
    if file.is_none() && !backends.iter().any(|b| b.url.tls) {
        return None;
    }
    Some(match file.and_then(|f| f.ca_file.as_deref()) {
        Some(ca_file) => UpstreamRoots::CaFile(ca_file),
        None => UpstreamRoots::Platform,
    })
}
