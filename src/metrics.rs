//! Metric names, their descriptions, the bounded label words, and the
//! Prometheus recorder.
//!
//! Every metric the router exports is named here as a constant, so the
//! contract in the README ("Admin API and metrics") has one home. Label
//! values come from backend ids, region names and the fixed words below:
//! never client addresses or session keys. The recorder is process-global (the `metrics` facade is); several
//! routers in one process, as in tests, share it.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SESSIONS_ACTIVE: &str = "wsrouter_sessions_active";
pub const SESSIONS_TOTAL: &str = "wsrouter_sessions_total";
pub const UPGRADES_TOTAL: &str = "wsrouter_upgrades_total";
pub const MESSAGES_TOTAL: &str = "wsrouter_messages_total";
pub const BYTES_TOTAL: &str = "wsrouter_bytes_total";
pub const BACKEND_UP: &str = "wsrouter_backend_up";
pub const HEALTH_CHECKS_TOTAL: &str = "wsrouter_health_checks_total";
pub const UPSTREAM_CONNECT_SECONDS: &str = "wsrouter_upstream_connect_seconds";
pub const GEOIP_LOOKUPS_TOTAL: &str = "wsrouter_geoip_lookups_total";
pub const REJECTED_CONNECTIONS_TOTAL: &str = "wsrouter_rejected_connections_total";
pub const CLOSES_TOTAL: &str = "wsrouter_closes_total";
pub const MIGRATIONS_TOTAL: &str = "wsrouter_migrations_total";
pub const MIGRATIONS_STAYED_TOTAL: &str = "wsrouter_migrations_stayed_total";
pub const POLLING_REQUESTS_TOTAL: &str = "wsrouter_polling_requests_total";
pub const SOCKETIO_SESSIONS_TOTAL: &str = "wsrouter_socketio_sessions_total";
pub const SOCKETIO_RESUMES_TOTAL: &str = "wsrouter_socketio_resumes_total";
pub const PROCESS_UPGRADES_TOTAL: &str = "wsrouter_process_upgrades_total";
pub const HANDOVER_SESSIONS_TOTAL: &str = "wsrouter_handover_sessions_total";
pub const HANDOVER_PAUSE_SECONDS: &str = "wsrouter_handover_pause_seconds";
pub const MIGRATION_DURATION_SECONDS: &str = "wsrouter_migration_duration_seconds";
pub const REPLAYED_MESSAGES_TOTAL: &str = "wsrouter_replayed_messages_total";
pub const BUFFERED_BYTES: &str = "wsrouter_buffered_bytes";
pub const REPLAY_DROPPED_TOTAL: &str = "wsrouter_replay_dropped_total";
pub const ACK_ERRORS_TOTAL: &str = "wsrouter_backend_ack_errors_total";
pub const WATERMARK_LAG_BYTES: &str = "wsrouter_watermark_lag_bytes";
pub const CLIENT_READ_PAUSE_SECONDS: &str = "wsrouter_client_read_pause_seconds";
pub const ACKNOWLEDGED_MESSAGES_TOTAL: &str = "wsrouter_acknowledged_messages_total";

/// `direction` label values.
pub const CLIENT_TO_BACKEND: &str = "client_to_backend";
pub const BACKEND_TO_CLIENT: &str = "backend_to_client";

/// Buckets for connect and migration latencies: 1 ms to 10 s.
const CONNECT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why a session ended: `wsrouter_closes_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientClose,
    BackendClose,
    ClientLost,
    UpstreamLost,
    IdleTimeout,
    MessageTooBig,
    InvalidUtf8,
    ProtocolError,
    MessageRate,
    Shutdown,
    MemoryPressure,
    MigrationFailed,
    MigrationQueueFull,
    PoisonMessage,
    MigrationLoop,
}

impl CloseReason {
    pub fn as_label(self) -> &'static str {
        match self {
            CloseReason::ClientClose => "client_close",
            CloseReason::BackendClose => "backend_close",
            CloseReason::ClientLost => "client_lost",
            CloseReason::UpstreamLost => "upstream_lost",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::MessageRate => "message_rate",
            CloseReason::Shutdown => "shutdown",
            CloseReason::MemoryPressure => "memory_pressure",
            CloseReason::MigrationFailed => "migration_failed",
            CloseReason::MigrationQueueFull => "migration_queue_full",
            CloseReason::PoisonMessage => "poison_message",
            CloseReason::MigrationLoop => "migration_loop",
        }
    }

    /// Count one close for this reason.
    pub fn count(self) {
        metrics::counter!(CLOSES_TOTAL, "reason" => self.as_label()).increment(1);
    }
}

/// How an upgrade ended: `wsrouter_upgrades_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeResult {
    /// The 101 went out: a session.
    Ok,
    /// The client left before its 101 could be written.
    ClientGone,
    /// The client did not finish its handshake in time.
    Timeout,
    /// Refused at the edge: a bad request, a limit, the session key.
    Rejected,
    /// Steering found no candidate backend.
    NoBackend,
    /// A backend answered the upgrade with a 4xx, handed to the client.
    UpstreamRefused,
    UpstreamTimeout,
    /// Every candidate had `steering.max_concurrent_dials` dials in flight.
    UpstreamBusy,
    UpstreamFailed,
}

impl UpgradeResult {
    pub fn as_label(self) -> &'static str {
        match self {
            UpgradeResult::Ok => "ok",
            UpgradeResult::ClientGone => "client_gone",
            UpgradeResult::Timeout => "timeout",
            UpgradeResult::Rejected => "rejected",
            UpgradeResult::NoBackend => "no_backend",
            UpgradeResult::UpstreamRefused => "upstream_refused",
            UpgradeResult::UpstreamTimeout => "upstream_timeout",
            UpgradeResult::UpstreamBusy => "upstream_busy",
            UpgradeResult::UpstreamFailed => "upstream_failed",
        }
    }

    /// Count one upgrade with this result.
    pub fn count(self) {
        metrics::counter!(UPGRADES_TOTAL, "result" => self.as_label()).increment(1);
    }
}

/// How a long-polling request on a Socket.IO path ended:
/// `wsrouter_polling_requests_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollResult {
    /// The backend's answer went back to the client.
    Ok,
    /// A bad request, an edge limit, or a request that is not engine.io's.
    Rejected,
    /// Larger than `socketio.max_body_bytes`.
    TooLarge,
    /// A `sid` this router does not know, from a client without a key.
    UnknownSid,
    NoBackend,
    /// The backend could not be reached or broke the exchange.
    BackendError,
    /// The backend held the request past `socketio.poll_timeout`.
    Timeout,
}

impl PollResult {
    pub fn as_label(self) -> &'static str {
        match self {
            PollResult::Ok => "ok",
            PollResult::Rejected => "rejected",
            PollResult::TooLarge => "too_large",
            PollResult::UnknownSid => "unknown_sid",
            PollResult::NoBackend => "no_backend",
            PollResult::BackendError => "backend_error",
            PollResult::Timeout => "timeout",
        }
    }

    /// Count one request with this result.
    pub fn count(self) {
        metrics::counter!(POLLING_REQUESTS_TOTAL, "result" => self.as_label()).increment(1);
    }
}

/// Why a message was sent to a backend again:
/// `wsrouter_replayed_messages_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayKind {
    /// Within the margin the window keeps of messages the old backend had
    /// read (a backend that does not acknowledge may see it twice).
    Margin,
    /// The old backend had not read it.
    Unread,
    /// The old backend, which acknowledges, had not acknowledged it.
    Unacknowledged,
}

impl ReplayKind {
    pub fn as_label(self) -> &'static str {
        match self {
            ReplayKind::Margin => "margin",
            ReplayKind::Unread => "unread",
            ReplayKind::Unacknowledged => "unacknowledged",
        }
    }

    /// Count `messages` replayed of this kind.
    pub fn count(self, messages: usize) {
        metrics::counter!(REPLAYED_MESSAGES_TOTAL, "kind" => self.as_label())
            .increment(messages as u64);
    }
}

/// Count one Socket.IO handshake replay on a new backend:
/// `wsrouter_socketio_resumes_total{result="ok"|"failed"}`.
pub fn count_socketio_resume(resumed: bool) {
    let result = if resumed { "ok" } else { "failed" };
    metrics::counter!(SOCKETIO_RESUMES_TOTAL, "result" => result).increment(1);
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the Prometheus recorder once per process and return its handle.
/// Later calls (a second router in the same process) get the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(UPSTREAM_CONNECT_SECONDS.to_string()),
                    CONNECT_BUCKETS,
                )
                .expect("buckets are not empty")
                .set_buckets_for_metric(
                    Matcher::Full(MIGRATION_DURATION_SECONDS.to_string()),
                    CONNECT_BUCKETS,
                )
                .expect("buckets are not empty")
                .set_buckets_for_metric(
                    Matcher::Full(HANDOVER_PAUSE_SECONDS.to_string()),
                    CONNECT_BUCKETS,
                )
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding
            // program's); then ours renders nothing, which is their choice.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!(
        SESSIONS_ACTIVE,
        "Sessions currently relayed, by backend and region."
    );
    describe_counter!(
        SESSIONS_TOTAL,
        "Sessions established, by region of the backend."
    );
    describe_counter!(UPGRADES_TOTAL, "WebSocket upgrade attempts, by result.");
    describe_counter!(MESSAGES_TOTAL, "Data messages relayed, by direction.");
    describe_counter!(
        BYTES_TOTAL,
        Unit::Bytes,
        "Payload bytes relayed, by direction."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 when the backend passes health checks, else 0."
    );
    describe_counter!(
        HEALTH_CHECKS_TOTAL,
        "Active health checks, by backend and result."
    );
    describe_histogram!(
        UPSTREAM_CONNECT_SECONDS,
        Unit::Seconds,
        "Time to dial a backend WebSocket (TCP connect and upgrade)."
    );
    describe_counter!(
        GEOIP_LOOKUPS_TOTAL,
        "GeoIP lookups, by result (hit, miss, private)."
    );
    describe_counter!(
        REJECTED_CONNECTIONS_TOTAL,
        "Connections refused before the upgrade, by reason."
    );
    describe_counter!(CLOSES_TOTAL, "Sessions ended, by reason.");
    describe_counter!(
        MIGRATIONS_TOTAL,
        "Sessions moved to another backend, by from, to and reason."
    );
    describe_counter!(
        SOCKETIO_SESSIONS_TOTAL,
        "WebSocket sessions opened on Socket.IO paths."
    );
    describe_counter!(
        SOCKETIO_RESUMES_TOTAL,
        "Moves of Socket.IO sessions that replayed the Socket.IO handshake on the new backend, by result."
    );
    describe_counter!(
        POLLING_REQUESTS_TOTAL,
        "engine.io long-polling requests on Socket.IO paths, by result."
    );
    describe_counter!(
        PROCESS_UPGRADES_TOTAL,
        "Router upgrades (SIGUSR2, POST /api/upgrade) this process started, by result (ok, refused, exited, timeout, busy, ...)."
    );
    describe_counter!(
        HANDOVER_SESSIONS_TOTAL,
        "Sessions an old router process offered this one at an upgrade, by result (received, or why refused)."
    );
    describe_histogram!(
        HANDOVER_PAUSE_SECONDS,
        "How long a session handed over at an upgrade was paused: from the old process stopping it to this one resuming it."
    );
    describe_counter!(
        MIGRATIONS_STAYED_TOTAL,
        "Planned moves (drain, removal, health) that found no other backend, so the session stayed, by reason."
    );
    describe_histogram!(
        MIGRATION_DURATION_SECONDS,
        Unit::Seconds,
        "Time from a session leaving its backend to relaying on the new one."
    );
    describe_counter!(
        REPLAYED_MESSAGES_TOTAL,
        "Client messages sent again to a new backend, by kind: unread (after the watermark), margin (read, replayed in case), unacknowledged."
    );
    describe_gauge!(
        BUFFERED_BYTES,
        Unit::Bytes,
        "Bytes the router holds for clients and backends (limits.max_buffered_bytes bounds it)."
    );
    describe_histogram!(
        WATERMARK_LAG_BYTES,
        Unit::Bytes,
        "Client bytes a backend had still not read (or acknowledged) each time its watermark moved."
    );
    describe_histogram!(
        CLIENT_READ_PAUSE_SECONDS,
        Unit::Seconds,
        "How long a client was not read because its backend had not read replay_max_bytes (the watermark's backpressure)."
    );
    describe_counter!(
        ACK_ERRORS_TOTAL,
        "Acknowledgements refused (malformed, going down, or of more than was sent): the backend counts as failed for the session."
    );
    describe_counter!(
        ACKNOWLEDGED_MESSAGES_TOTAL,
        "Client messages acknowledged by backends that acknowledge."
    );
    describe_counter!(
        REPLAY_DROPPED_TOTAL,
        "Client messages the replay window let go of early for its byte bound."
    );
}
