//! What `router.toml` looks like: one serde struct per table, every field
//! as the file spells it, unknown keys refused. The schema only: nothing
//! here checks a value (`validate` does) or opens a file (`load` does).

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) listener: FileListener,
    #[serde(default)]
    pub(super) admin: FileAdmin,
    #[serde(default)]
    pub(super) client_address: FileClientAddress,
    pub(super) geoip: Option<FileGeoIp>,
    #[serde(default)]
    pub(super) session_key: FileSessionKey,
    #[serde(default)]
    pub(super) steering: FileSteering,
    #[serde(default)]
    pub(super) health_check: FileHealthCheck,
    #[serde(default)]
    pub(super) relay: FileRelay,
    #[serde(default)]
    pub(super) migration: FileMigration,
    #[serde(default)]
    pub(super) passive_health: FilePassiveHealth,
    #[serde(default)]
    pub(super) shutdown: FileShutdown,
    #[serde(default)]
    pub(super) runtime: FileRuntime,
    #[serde(default)]
    pub(super) upgrade: FileUpgrade,
    #[serde(default)]
    pub(super) socketio: FileSocketIo,
    pub(super) tls: Option<FileTls>,
    pub(super) upstream_tls: Option<FileUpstreamTls>,
    #[serde(default)]
    pub(super) limits: FileLimits,
    #[serde(default)]
    pub(super) regions: Vec<FileRegion>,
    #[serde(default)]
    pub(super) backends: Vec<FileBackend>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    pub(super) public: Option<String>,
    pub(super) paths: Option<Vec<String>>,
    pub(super) handshake_timeout: Option<String>,
    pub(super) max_request_header_bytes: Option<usize>,
    #[serde(default)]
    pub(super) proxy_protocol_from: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
    pub(super) token_file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileClientAddress {
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileGeoIp {
    pub(super) database: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSessionKey {
    pub(super) source: Option<String>,
    pub(super) name: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSteering {
    pub(super) default_region: Option<String>,
    #[serde(default)]
    pub(super) countries: HashMap<String, Vec<String>>,
    #[serde(default)]
    pub(super) continents: HashMap<String, Vec<String>>,
    pub(super) dial_timeout: Option<String>,
    pub(super) max_dial_attempts: Option<u32>,
    pub(super) max_concurrent_dials: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealthCheck {
    pub(super) path: Option<String>,
    pub(super) expected_status: Option<u16>,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) rise: Option<u32>,
    pub(super) fall: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRelay {
    pub(super) ping_interval: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_message_bytes: Option<usize>,
    pub(super) close_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMigration {
    pub(super) queue_max_bytes: Option<usize>,
    pub(super) replay_max_messages: Option<usize>,
    pub(super) replay_max_bytes: Option<usize>,
    pub(super) replay_max_age: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) max_rate_per_backend: Option<u32>,
    pub(super) max_moves: Option<u32>,
    pub(super) moves_window: Option<String>,
    pub(super) max_redeliveries: Option<u32>,
    pub(super) watermark_interval: Option<String>,
    pub(super) stall_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePassiveHealth {
    pub(super) max_failures: Option<u32>,
    pub(super) cooldown: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLimits {
    pub(super) max_sessions: Option<usize>,
    pub(super) max_buffered_bytes: Option<usize>,
    pub(super) per_ip_connection_rate: Option<u32>,
    pub(super) per_ip_connection_burst: Option<u32>,
    pub(super) per_ip_max_sessions: Option<u32>,
    pub(super) allowed_origins: Option<Vec<String>>,
    pub(super) require_origin: Option<bool>,
    pub(super) session_message_rate: Option<u64>,
    pub(super) session_message_burst: Option<u64>,
    pub(super) session_byte_rate: Option<u64>,
    pub(super) session_byte_burst: Option<u64>,
    #[serde(default)]
    pub(super) under_attack: FileUnderAttack,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUnderAttack {
    pub(super) enabled: Option<bool>,
    pub(super) per_ip_connection_rate: Option<u32>,
    pub(super) per_ip_connection_burst: Option<u32>,
    pub(super) per_ip_max_sessions: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileShutdown {
    pub(super) grace_period: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSocketIo {
    #[serde(default)]
    pub(super) paths: Vec<String>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) poll_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpgrade {
    pub(super) old_process_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRuntime {
    pub(super) session_threads: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRegion {
    pub(super) name: String,
    pub(super) latitude: f64,
    pub(super) longitude: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackend {
    pub(super) id: String,
    pub(super) url: String,
    pub(super) region: String,
    pub(super) weight: Option<u32>,
    pub(super) max_sessions: Option<u32>,
}

/// `[tls]`: present means the public listener speaks TLS only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    #[serde(default)]
    pub(super) certificates: Vec<FileCertificate>,
}

/// `[[tls.certificates]]` (or an inline table in `certificates = [...]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCertificate {
    pub(super) cert: String,
    pub(super) key: String,
    #[serde(default)]
    pub(super) server_names: Vec<String>,
}

/// `[upstream_tls]`: how `wss://` backends are verified.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstreamTls {
    /// PEM CA certificates to trust instead of the platform's roots.
    pub(super) ca_file: Option<String>,
}
