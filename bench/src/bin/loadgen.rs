//! WebSocket load generator for wsrouter's benchmarks (see BENCHMARKS.md).
//!
//! ```text
//! cargo run --release -p wsrouter-bench --bin loadgen -- latency    --url ws://127.0.0.1:18080/chat -c 100 --rate 100 --size 64 --duration 10s
//! cargo run --release -p wsrouter-bench --bin loadgen -- throughput --url ws://127.0.0.1:18080/chat -c 50 --window 16 --size 64 --duration 10s
//! cargo run --release -p wsrouter-bench --bin loadgen -- idle       --url ws://127.0.0.1:18080/chat -c 8000 --duration 10s
//! cargo run --release -p wsrouter-bench --bin loadgen -- churn      --url ws://127.0.0.1:18080/chat --cycles 5000 --concurrency 100
//! cargo run --release -p wsrouter-bench --bin loadgen -- failover   --url ws://127.0.0.1:18180/chat -c 8000 --rate 2 --duration 25s --kill-after 10s --kill-pid PID --watch-pid ROUTER_PID
//! cargo run --release -p wsrouter-bench --bin loadgen -- upgrade    --url ws://127.0.0.1:18280/chat -c 200 --idle 8000 --rate 20 --pid-file PIDFILE --metrics-url http://127.0.0.1:19290/metrics
//! ```
//!
//! Modes:
//!
//! - `latency`: N connections each send `--rate` messages per second of
//!   `--size` bytes for `--duration`; every echo's round trip goes into an
//!   HDR histogram. How late each message went out against its schedule is
//!   reported too (`send_lag_us`), so a proxy that pushes back and lowers
//!   the send rate does not hide (coordinated omission).
//! - `throughput`: N connections send as fast as the echoes come back, with
//!   at most `--window` messages in flight per connection.
//! - `idle`: open N connections and hold them for `--duration` (writes
//!   `--ready-file` once they are all open, so a script can measure the
//!   proxy's memory then).
//! - `churn`: `--cycles` connect/upgrade/close cycles, `--concurrency` at a
//!   time; reports upgrades per second and the connect+upgrade time.
//! - `failover`: N sessions each send a numbered message `--rate` times a
//!   second (random phase); `--kill-after` into the send phase the backend
//!   process `--kill-pid` is sent SIGKILL. Reports, per session, the time
//!   from the kill to the first echo from another backend of a message sent
//!   after the kill (p50/p99/max), disconnects, sequence numbers never
//!   echoed (lost) or echoed more than once (duplicated), and the CPU and
//!   RSS of `--watch-pid` (the router) sampled from /proc. Echo backends
//!   started with `echo_backend --mark C` stamp the byte after the header
//!   with C, which tells the old backend's echoes from the new one's.
//!   `bench/failover.sh` runs the whole benchmark.
//! - `upgrade`: `--idle` idle sessions and N active ones (numbered messages
//!   at `--rate`, every echo checked: each number once, in order), each
//!   with its own session key, plus one new client every `--connect-every`
//!   (connect, upgrade, one echo, close) throughout. Once every session is
//!   open and `--steady` has passed, the router named in `--pid-file` is
//!   sent SIGUSR2 (an in-place upgrade); the run goes on until `--after-exit`
//!   past the old process's exit, then stops. Reports closes seen by the
//!   clients, lost, duplicated and reordered messages, per active session
//!   the largest gap between echoes around the upgrade, the new clients'
//!   failures before, during and after it, the time from the signal to the
//!   old process's exit, the old and new processes' RSS (sampled from
//!   /proc), and the router's hand-over metrics read from `--metrics-url`.
//!   `bench/upgrade.sh` runs the whole benchmark.
//!
//! Every message carries a sequence number and a time stamp (binary: two
//! little-endian u64 in the first 16 bytes; `--text`: 32 hex digits), and
//! echoes are checked for order and size. Connections are opened with
//! bounded concurrency (`--connect-concurrency`); past `--per-source`
//! connections they are spread over several loopback source addresses
//! (127.0.0.1, 127.0.0.2, ...) because one source address runs out of
//! ephemeral ports near 28,000. The open-files soft limit is raised to the
//! hard limit. Only loopback targets are accepted, everything is bounded in
//! count and time (`--time-limit`), and each run prints exactly one JSON line
//! on stdout; progress and problems go to stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Ws = WebSocketStream<TcpStream>;

/// Hard bounds on what one run may ask for.
const MAX_CONNECTIONS: usize = 100_000;
const MAX_CYCLES: u64 = 1_000_000;
const MAX_DURATION: Duration = Duration::from_secs(3600);
const MAX_SIZE: usize = 16 * 1024 * 1024;
const MAX_WINDOW: usize = 10_000;
const MAX_RATE: f64 = 100_000.0;
/// Histogram range: 1 ns to 60 s, 3 significant digits.
const HIST_MAX_NS: u64 = 60_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Latency,
    Throughput,
    Idle,
    Churn,
    Failover,
    Upgrade,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Latency => "latency",
            Mode::Throughput => "throughput",
            Mode::Idle => "idle",
            Mode::Churn => "churn",
            Mode::Failover => "failover",
            Mode::Upgrade => "upgrade",
        }
    }
}

#[derive(Parser, Debug, Clone)]
#[command(about = "WebSocket load generator (loopback targets only); one JSON line per run")]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    mode: Mode,
    /// Target WebSocket URL (ws://, loopback address or localhost only).
    #[arg(long, default_value = "ws://127.0.0.1:18080/chat")]
    url: String,
    /// Connections (latency, throughput, idle, failover); upgrade: the active sessions.
    #[arg(long, short = 'c', default_value_t = 100)]
    connections: usize,
    /// Messages per second per connection (latency).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Message size in bytes (at least 16, or 32 with --text).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Send phase (latency, throughput) or hold time (idle).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Start of the send phase left out of percentiles and rates.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Messages in flight per connection (throughput).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Connect/upgrade/close cycles (churn).
    #[arg(long, default_value_t = 5000)]
    cycles: u64,
    /// Cycles in progress at once (churn).
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Source addresses to bind, comma-separated (default: the kernel's
    /// choice, or 127.0.0.1, 127.0.0.2, ... past --per-source connections).
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<IpAddr>,
    /// Connections per automatically chosen source address.
    #[arg(long, default_value_t = 25_000)]
    per_source: usize,
    /// Bound on one TCP connect plus WebSocket upgrade.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// After the send phase, how long to wait for outstanding echoes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Bound on the whole run; results so far are reported when it expires.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    time_limit: Duration,
    /// Send text messages instead of binary ones.
    #[arg(long)]
    text: bool,
    /// Worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Read buffer per connection, in bytes (tungstenite allocates it eagerly).
    #[arg(long, default_value_t = 16 * 1024)]
    read_buffer: usize,
    /// Free-form tag copied into the JSON (e.g. the target's name).
    #[arg(long)]
    label: Option<String>,
    /// Idle mode: write this file once every connection is open.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Failover: the backend process to SIGKILL (the one the sessions are on).
    #[arg(long)]
    kill_pid: Option<u32>,
    /// Failover: when to kill it, counted from the start of the send phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    kill_after: Duration,
    /// Failover: a process (the router) whose CPU and RSS are sampled from /proc.
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Failover, upgrade: how often the router's processes are sampled.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    sample_interval: Duration,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Upgrade: idle sessions held besides the `-c` active ones.
    #[arg(long, default_value_t = 8000)]
    idle: usize,
    /// Upgrade: the router's pid file; SIGUSR2 goes to the pid in it, and
    /// the new process's pid is read from it.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Upgrade: the router's Prometheus metrics (http://, loopback), read
    /// before the signal and after the old process's exit.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Upgrade: one new client (connect, upgrade, one echo, close) this often.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    connect_every: Duration,
    /// Upgrade: sessions opened per batch (`--connect-concurrency` at a time).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Upgrade: a batch starts at most this often.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    batch_interval: Duration,
    /// Upgrade: from the last session open to the signal.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    steady: Duration,
    /// Upgrade: keep going this long after the old process exited.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    after_exit: Duration,
    /// Upgrade: stop waiting for the old process to exit after this long.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    exit_timeout: Duration,
}

/// A checked loopback target.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    addr: SocketAddr,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Target> {
        let uri: tokio_tungstenite::tungstenite::http::Uri =
            url.parse().with_context(|| format!("bad URL {url:?}"))?;
        if uri.scheme_str() != Some("ws") {
            bail!("only ws:// URLs are supported, got {url:?}");
        }
        let host = uri.host().context("URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse()
                .with_context(|| format!("host {host:?} is not an IP address or localhost"))?
        };
        if !ip.is_loopback() {
            bail!("refusing non-loopback target {ip}: this tool only loads this machine");
        }
        let port = uri.port_u16().unwrap_or(80);
        Ok(Target {
            url: url.to_string(),
            addr: SocketAddr::new(ip, port),
        })
    }
}

/// Shared counters of one run.
struct Stats {
    attempted: AtomicU64,
    opened: AtomicU64,
    failed: AtomicU64,
    closed_early: AtomicU64,
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    received: AtomicU64,
    received_bytes: AtomicU64,
    /// Echoes received inside the measurement window.
    measured: AtomicU64,
    measured_bytes: AtomicU64,
    completed_cycles: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    histogram: Mutex<Histogram<u64>>,
    /// Latency mode: how late each message went out against its schedule.
    send_lag: Mutex<Histogram<u64>>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            attempted: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            closed_early: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            received: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            measured_bytes: AtomicU64::new(0),
            completed_cycles: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            histogram: Mutex::new(new_histogram()),
            send_lag: Mutex::new(new_histogram()),
        }
    }

    fn error(&self, kind: impl Into<String>) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.entry(kind.into()).or_insert(0) += 1;
    }

    fn record(&self, nanos: u64) {
        self.histogram
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(nanos.max(1));
    }

    fn record_lag(&self, nanos: u64) {
        self.send_lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(nanos.max(1));
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("static histogram bounds")
}

/// Everything a connection task needs.
struct Run {
    args: Args,
    target: Target,
    ws_config: WebSocketConfig,
    sources: Vec<IpAddr>,
    stats: Stats,
    /// Filler bytes for message bodies.
    filler: Bytes,
    /// Failover mode: the kill, the per-session outcomes, the router's samples.
    failover: FailoverState,
    /// Upgrade mode: the signal, the processes, every session's record.
    upgrade: UpgradeState,
}

/// Process-wide time origin for the time stamps carried in messages.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = epoch();
    let run = match prepare(args) {
        Ok(run) => Arc::new(run),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = if run.args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(run.args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(async {
        let started = Instant::now();
        let outcome = tokio::time::timeout(run.args.time_limit, execute(run.clone())).await;
        let (status, timing) = match outcome {
            Ok(timing) => ("ok", timing),
            Err(_) => {
                eprintln!("loadgen: time limit reached; reporting what was measured");
                ("time_limit", Timing::default())
            }
        };
        report(&run, status, &timing, started.elapsed())
    });
    // Connection tasks still running (time limit) are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_millis(200));
    println!("{report}");
    if run.stats.opened.load(Ordering::Relaxed) == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Check the arguments, raise the file limit, choose source addresses.
fn prepare(args: Args) -> anyhow::Result<Run> {
    let target = Target::parse(&args.url)?;
    let min_size = if args.text { 32 } else { 16 };
    if args.size < min_size || args.size > MAX_SIZE {
        bail!("--size must be between {min_size} and {MAX_SIZE}");
    }
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        bail!("--connections must be between 1 and {MAX_CONNECTIONS}");
    }
    if args.cycles == 0 || args.cycles > MAX_CYCLES {
        bail!("--cycles must be between 1 and {MAX_CYCLES}");
    }
    if args.duration.is_zero() || args.duration > MAX_DURATION {
        bail!("--duration must be more than 0 and at most 1h");
    }
    if args.time_limit.is_zero() || args.time_limit > MAX_DURATION * 2 {
        bail!("--time-limit must be more than 0 and at most 2h");
    }
    if matches!(args.mode, Mode::Latency | Mode::Throughput) && args.warmup >= args.duration {
        bail!("--warmup must be shorter than --duration");
    }
    if !(args.rate > 0.0 && args.rate <= MAX_RATE) {
        bail!("--rate must be more than 0 and at most {MAX_RATE}");
    }
    if args.window == 0 || args.window > MAX_WINDOW {
        bail!("--window must be between 1 and {MAX_WINDOW}");
    }
    if args.connect_concurrency == 0 || args.concurrency == 0 {
        bail!("--connect-concurrency and --concurrency must be at least 1");
    }
    if args.per_source == 0 {
        bail!("--per-source must be at least 1");
    }
    if args.threads == 0 || args.threads > 64 {
        bail!("--threads must be between 1 and 64");
    }
    if args.mode == Mode::Failover {
        check_failover_args(&args, min_size)?;
    }
    let old_pid = if args.mode == Mode::Upgrade {
        check_upgrade_args(&args)?
    } else {
        0
    };
    for ip in &args.source_addrs {
        if !ip.is_loopback() {
            bail!("source address {ip} is not a loopback address");
        }
    }

    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("loadgen: cannot raise the open files limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024)
        }
    };
    let simultaneous = match args.mode {
        Mode::Churn => args.concurrency,
        Mode::Upgrade => args.connections + args.idle + MAX_NEW_CLIENTS_IN_FLIGHT,
        _ => args.connections,
    };
    if simultaneous as u64 + 64 > limit {
        bail!(
            "{simultaneous} simultaneous connections need more file descriptors than the \
             limit of {limit} (raise the hard limit: ulimit -Hn)"
        );
    }

    // Ports are per source address: spread over 127.0.0.x when one is not enough.
    let total = match args.mode {
        Mode::Churn => args.cycles as usize,
        Mode::Upgrade => args.connections + args.idle,
        _ => args.connections,
    };
    let sources = if !args.source_addrs.is_empty() {
        args.source_addrs.clone()
    } else if target.addr.is_ipv4() && total > args.per_source {
        let count = total.div_ceil(args.per_source).min(254);
        (1..=count as u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect()
    } else {
        Vec::new()
    };
    if sources.iter().any(|s| s.is_ipv4() != target.addr.is_ipv4()) {
        bail!("source addresses must be of the same family as the target");
    }

    let ws_config = WebSocketConfig::default()
        .read_buffer_size(args.read_buffer)
        .max_message_size(Some(MAX_SIZE + 1024))
        .max_frame_size(Some(MAX_SIZE + 1024));
    let filler = Bytes::from(vec![b'x'; args.size]);
    let upgrade = UpgradeState::new(old_pid, args.connections);
    Ok(Run {
        args,
        target,
        ws_config,
        sources,
        stats: Stats::new(),
        filler,
        failover: FailoverState::new(),
        upgrade,
    })
}

/// Phase times, reported in the JSON.
#[derive(Default)]
struct Timing {
    /// Seconds spent opening the connections.
    connect_s: Option<f64>,
    /// Seconds of the window that rates are computed over.
    measured_s: Option<f64>,
}

async fn execute(run: Arc<Run>) -> Timing {
    match run.args.mode {
        Mode::Latency | Mode::Throughput => traffic(run).await,
        Mode::Idle => idle(run).await,
        Mode::Churn => churn(run).await,
        Mode::Failover => failover(run).await,
        Mode::Upgrade => upgrade(run).await,
    }
}

/// TCP connect (from the chosen source address) and WebSocket upgrade.
async fn open(run: &Run, index: usize) -> Result<Ws, String> {
    open_url(run, index, &run.target.url).await
}

/// [`open`], to `url` (the target's URL with a query added).
async fn open_url(run: &Run, index: usize, url: &str) -> Result<Ws, String> {
    let source = if run.sources.is_empty() {
        None
    } else {
        Some(run.sources[index % run.sources.len()])
    };
    let attempt = async {
        let socket = if run.target.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {}", e.kind()))?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind: {}", e.kind()))?;
        }
        let stream = socket
            .connect(run.target.addr)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = stream.set_nodelay(true);
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(run.ws_config))
                .await
                .map_err(|e| match e {
                    WsError::Http(response) => {
                        format!("upgrade refused: HTTP {}", response.status())
                    }
                    WsError::Io(e) => format!("upgrade: {}", e.kind()),
                    e => format!("upgrade: {e}"),
                })?;
        Ok(ws)
    };
    match tokio::time::timeout(run.args.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err("connect timeout".to_string()),
    }
}

/// Open `--connections` connections, `--connect-concurrency` at a time.
async fn open_all(run: &Arc<Run>) -> Vec<Ws> {
    let n = run.args.connections;
    let stats = &run.stats;
    let mut connections = Vec::with_capacity(n);
    let mut opening = futures_util::stream::iter(0..n)
        .map(|i| {
            let run = run.clone();
            async move {
                run.stats.attempted.fetch_add(1, Ordering::Relaxed);
                open(&run, i).await
            }
        })
        .buffer_unordered(run.args.connect_concurrency);
    while let Some(result) = opening.next().await {
        match result {
            Ok(ws) => {
                stats.opened.fetch_add(1, Ordering::Relaxed);
                connections.push(ws);
            }
            Err(kind) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.error(kind);
            }
        }
    }
    connections
}

// ---------------------------------------------------------------------------
// latency and throughput

/// Per-connection state shared by its writer and reader halves.
struct Flow {
    sent: AtomicU64,
    received: AtomicU64,
    writer_done: AtomicBool,
    wake_reader: Notify,
    /// Throughput mode: free slots in the in-flight window.
    window: Semaphore,
}

/// Times shared by every connection of a latency or throughput run.
#[derive(Clone, Copy)]
struct Phases {
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

async fn traffic(run: Arc<Run>) -> Timing {
    let connect_started = Instant::now();
    let connections = open_all(&run).await;
    let connect_s = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} connections open in {connect_s:.2}s",
        connections.len()
    );
    let start = Instant::now() + Duration::from_millis(100);
    let phases = Phases {
        start,
        measure_from: start + run.args.warmup,
        end: start + run.args.duration,
    };
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|ws| tokio::spawn(drive(run.clone(), ws, phases)))
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    Timing {
        connect_s: Some(connect_s),
        measured_s: Some((phases.end - phases.measure_from).as_secs_f64()),
    }
}

/// One connection of a latency or throughput run: send, read the echoes,
/// wait for the last ones, close.
async fn drive(run: Arc<Run>, ws: Ws, phases: Phases) {
    let (mut sink, mut stream) = ws.split();
    let flow = Flow {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        writer_done: AtomicBool::new(false),
        wake_reader: Notify::new(),
        window: Semaphore::new(run.args.window),
    };
    let writer = async {
        let result = match run.args.mode {
            Mode::Latency => send_paced(&run, &mut sink, &flow, phases).await,
            _ => send_windowed(&run, &mut sink, &flow, phases).await,
        };
        if let Err(e) = result {
            run.stats.error(format!("send: {e}"));
        }
        flow.writer_done.store(true, Ordering::Release);
        flow.wake_reader.notify_one();
    };
    let reader = read_echoes(&run, &mut stream, &flow, phases);
    let (_, stream_open) = tokio::join!(writer, reader);
    if stream_open {
        close(&mut sink, &mut stream).await;
    }
}

fn message(run: &Run, seq: u64, due: Instant) -> Message {
    let size = run.args.size;
    let stamp = nanos_since_epoch(due);
    if run.args.text {
        let mut text = String::with_capacity(size);
        let _ = write!(text, "{seq:016x}{stamp:016x}");
        let filler = std::str::from_utf8(&run.filler[..size - 32]).expect("ASCII filler");
        text.push_str(filler);
        Message::Text(text.into())
    } else {
        let mut body = BytesMut::with_capacity(size);
        body.put_u64_le(seq);
        body.put_u64_le(stamp);
        body.extend_from_slice(&run.filler[..size - 16]);
        Message::Binary(body.freeze())
    }
}

/// Sequence number and time stamp of an echo, and its size.
fn parse_echo(msg: &Message) -> Option<(u64, u64, usize)> {
    match msg {
        Message::Binary(body) if body.len() >= 16 => {
            let seq = u64::from_le_bytes(body[0..8].try_into().ok()?);
            let stamp = u64::from_le_bytes(body[8..16].try_into().ok()?);
            Some((seq, stamp, body.len()))
        }
        Message::Text(text) if text.len() >= 32 => {
            let seq = u64::from_str_radix(text.get(0..16)?, 16).ok()?;
            let stamp = u64::from_str_radix(text.get(16..32)?, 16).ok()?;
            Some((seq, stamp, text.len()))
        }
        _ => None,
    }
}

/// Latency mode: one message every 1/rate seconds, from a random phase so
/// connections don't fire together. Each is stamped when it is handed to
/// the socket (tokio's timer is 1 ms coarse, so stamping the time it was
/// due would add up to a millisecond of timer error to every round trip);
/// how late it went out against its schedule is recorded apart (`send_lag_us`),
/// so a proxy that pushes back still shows.
async fn send_paced(
    run: &Run,
    sink: &mut SplitSink<Ws, Message>,
    flow: &Flow,
    phases: Phases,
) -> Result<(), WsError> {
    let period = Duration::from_secs_f64(1.0 / run.args.rate);
    let offset = Duration::from_nanos(rand::random_range(0..period.as_nanos().max(1) as u64));
    let mut ticks = tokio::time::interval_at(phases.start + offset, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut seq = 0u64;
    loop {
        let due = ticks.tick().await;
        if due >= phases.end {
            return Ok(());
        }
        let now = Instant::now();
        if due >= phases.measure_from {
            run.stats
                .record_lag(now.saturating_duration_since(due).as_nanos() as u64);
        }
        sink.send(message(run, seq, now)).await?;
        account_sent(run, flow);
        seq += 1;
    }
}

/// Throughput mode: keep `--window` messages in flight; messages that can
/// go out together are written with one flush.
async fn send_windowed(
    run: &Run,
    sink: &mut SplitSink<Ws, Message>,
    flow: &Flow,
    phases: Phases,
) -> Result<(), WsError> {
    tokio::time::sleep_until(phases.start).await;
    let mut seq = 0u64;
    loop {
        let permit = match flow.window.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                sink.flush().await?;
                tokio::select! {
                    permit = flow.window.acquire() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return Ok(()),
                    },
                    _ = tokio::time::sleep_until(phases.end) => return Ok(()),
                }
            }
        };
        permit.forget();
        let now = Instant::now();
        if now >= phases.end {
            return sink.flush().await;
        }
        sink.feed(message(run, seq, now)).await?;
        account_sent(run, flow);
        seq += 1;
    }
}

fn account_sent(run: &Run, flow: &Flow) {
    flow.sent.fetch_add(1, Ordering::Relaxed);
    run.stats.sent.fetch_add(1, Ordering::Relaxed);
    run.stats
        .sent_bytes
        .fetch_add(run.args.size as u64, Ordering::Relaxed);
}

/// What a reader gets next from its connection.
enum Received {
    /// An echo of one of our messages: sequence number, send stamp, length.
    Echo {
        msg: Message,
        seq: u64,
        stamp: u64,
        len: usize,
    },
    /// Anything else (a nudge from the writer, a ping, an unparsable message,
    /// already counted): look at the writer's state again.
    Other,
    /// The drain time is over.
    Deadline,
    /// The connection failed or was closed (counted as closed early): how.
    Ended(String),
}

/// Wait for the next message, a nudge from the writer, or `deadline`;
/// count what ends the connection or cannot be parsed.
async fn next_echo(
    stats: &Stats,
    stream: &mut SplitStream<Ws>,
    flow: &Flow,
    deadline: Instant,
) -> Received {
    let msg = tokio::select! {
        msg = stream.next() => msg,
        _ = flow.wake_reader.notified() => return Received::Other,
        _ = tokio::time::sleep_until(deadline) => return Received::Deadline,
    };
    let msg = match msg {
        Some(Ok(msg)) => msg,
        Some(Err(e)) => {
            let why = format!("receive: {}", error_kind(&e));
            stats.error(why.clone());
            stats.closed_early.fetch_add(1, Ordering::Relaxed);
            return Received::Ended(why);
        }
        None => {
            stats.error("receive: connection ended");
            stats.closed_early.fetch_add(1, Ordering::Relaxed);
            return Received::Ended("receive: connection ended".to_string());
        }
    };
    if let Message::Close(frame) = &msg {
        let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
        let why = format!("closed by peer: {code}");
        stats.error(why.clone());
        stats.closed_early.fetch_add(1, Ordering::Relaxed);
        return Received::Ended(why);
    }
    match parse_echo(&msg) {
        Some((seq, stamp, len)) => Received::Echo {
            msg,
            seq,
            stamp,
            len,
        },
        None => {
            if matches!(msg, Message::Text(_) | Message::Binary(_)) {
                stats.error("bad echo: unparsable");
            }
            Received::Other
        }
    }
}

/// Read echoes until the writer is done and every echo is back, the drain
/// time is over, or the connection ends. True while the connection is open.
async fn read_echoes(run: &Run, stream: &mut SplitStream<Ws>, flow: &Flow, phases: Phases) -> bool {
    let stats = &run.stats;
    let drain_deadline = phases.end + run.args.drain;
    let mut expected_seq = 0u64;
    loop {
        if flow.writer_done.load(Ordering::Acquire)
            && flow.received.load(Ordering::Relaxed) >= flow.sent.load(Ordering::Relaxed)
        {
            return true;
        }
        let (seq, stamp, len) = match next_echo(stats, stream, flow, drain_deadline).await {
            Received::Echo {
                seq, stamp, len, ..
            } => (seq, stamp, len),
            Received::Other => continue,
            Received::Deadline => return true,
            Received::Ended(_) => return false,
        };
        let now = Instant::now();
        if seq != expected_seq {
            stats.error("bad echo: out of order");
        }
        expected_seq = seq + 1;
        if len != run.args.size {
            stats.error("bad echo: wrong size");
        }
        flow.received.fetch_add(1, Ordering::Relaxed);
        if run.args.mode == Mode::Throughput {
            flow.window.add_permits(1);
        }
        stats.received.fetch_add(1, Ordering::Relaxed);
        stats
            .received_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let due = epoch() + Duration::from_nanos(stamp);
        if due >= phases.measure_from {
            stats.record(nanos_since_epoch(now).saturating_sub(stamp));
        }
        if now >= phases.measure_from && now < phases.end {
            stats.measured.fetch_add(1, Ordering::Relaxed);
            stats
                .measured_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
        }
    }
}

/// Close handshake, bounded.
async fn close(sink: &mut SplitSink<Ws, Message>, stream: &mut SplitStream<Ws>) {
    let closing = async {
        if sink.send(Message::Close(None)).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = stream.next().await {}
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
}

fn error_kind(e: &WsError) -> String {
    match e {
        WsError::Io(io) => io.kind().to_string(),
        WsError::Protocol(p) => format!("protocol: {p}"),
        WsError::Capacity(c) => format!("capacity: {c}"),
        e => e.to_string(),
    }
}

// ---------------------------------------------------------------------------
// idle

async fn idle(run: Arc<Run>) -> Timing {
    let connect_started = Instant::now();
    let connections = open_all(&run).await;
    let connect_s = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} idle connections open in {connect_s:.2}s; holding for {:?}",
        connections.len(),
        run.args.duration
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let holders: Vec<_> = connections
        .into_iter()
        .map(|ws| tokio::spawn(hold(run.clone(), ws, stop_rx.clone())))
        .collect();
    if let Some(path) = &run.args.ready_file {
        let line = format!("{}\n", run.stats.opened.load(Ordering::Relaxed));
        if let Err(e) = std::fs::write(path, line) {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
        }
    }
    tokio::time::sleep(run.args.duration).await;
    let _ = stop_tx.send(true);
    for holder in holders {
        let _ = holder.await;
    }
    Timing {
        connect_s: Some(connect_s),
        measured_s: Some(run.args.duration.as_secs_f64()),
    }
}

/// Hold one connection open (answering pings) until told to stop.
async fn hold(run: Arc<Run>, mut ws: Ws, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    run.stats.closed_early.fetch_add(1, Ordering::Relaxed);
                    run.stats.error("idle connection closed by peer");
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => break,
        }
    }
    let closing = async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
}

// ---------------------------------------------------------------------------
// churn

async fn churn(run: Arc<Run>) -> Timing {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..run.args.concurrency)
        .map(|_| tokio::spawn(churn_worker(run.clone(), next.clone())))
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    Timing {
        connect_s: None,
        measured_s: Some(started.elapsed().as_secs_f64()),
    }
}

async fn churn_worker(run: Arc<Run>, next: Arc<AtomicU64>) {
    let stats = &run.stats;
    loop {
        let cycle = next.fetch_add(1, Ordering::Relaxed);
        if cycle >= run.args.cycles {
            return;
        }
        stats.attempted.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut ws = match open(&run, cycle as usize).await {
            Ok(ws) => ws,
            Err(kind) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.error(kind);
                continue;
            }
        };
        stats.record(started.elapsed().as_nanos() as u64);
        stats.opened.fetch_add(1, Ordering::Relaxed);
        let closing = async {
            ws.close(None).await?;
            loop {
                match ws.next().await {
                    Some(Ok(_)) => {}
                    Some(Err(WsError::ConnectionClosed)) | None => return Ok(()),
                    Some(Err(e)) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), closing).await {
            Ok(Ok(())) => {
                stats.completed_cycles.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => stats.error(format!("close: {}", error_kind(&e))),
            Err(_) => stats.error("close: timeout"),
        }
    }
}

// ---------------------------------------------------------------------------
// failover

/// Where a marking echo backend (`echo_backend --mark C`) puts its mark: the
/// first byte after the sequence number and time stamp. Unmarked echoes
/// carry the filler byte there.
fn mark_offset(text: bool) -> usize {
    if text { 32 } else { 16 }
}

const FILLER: u8 = b'x';

fn check_failover_args(args: &Args, min_size: usize) -> anyhow::Result<()> {
    let Some(pid) = args.kill_pid else {
        bail!("failover needs --kill-pid: the backend process the sessions are on");
    };
    if pid <= 1 || pid == std::process::id() {
        bail!("--kill-pid {pid} is not a backend process");
    }
    for (flag, pid) in [("--kill-pid", Some(pid)), ("--watch-pid", args.watch_pid)] {
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            bail!("{flag} {pid}: no such process");
        }
    }
    if args.kill_after.is_zero() || args.kill_after >= args.duration {
        bail!("--kill-after must be more than 0 and shorter than --duration");
    }
    if args.size <= min_size {
        bail!(
            "failover needs --size of at least {} (the byte after the header carries the backend's mark)",
            min_size + 1
        );
    }
    if args.sample_interval < Duration::from_millis(10)
        || args.sample_interval > Duration::from_secs(10)
    {
        bail!("--sample-interval must be between 10ms and 10s");
    }
    if args.clk_tck == 0 {
        bail!("--clk-tck must be at least 1");
    }
    Ok(())
}

/// One sample of the watched process (the router).
#[derive(Clone, Copy)]
struct Sample {
    /// Nanoseconds since [`epoch`].
    at: u64,
    /// utime + stime, in clock ticks.
    ticks: u64,
    rss_kib: u64,
    /// The whole machine (every core), from /proc/stat, in clock ticks:
    /// busy (user, nice, system, irq, softirq, steal) and total.
    machine_busy: u64,
    machine_total: u64,
    /// Nanoseconds the watched process's threads spent runnable but
    /// waiting for a core (second field of /proc/PID/task/*/schedstat).
    runqueue_wait_ns: u64,
}

/// What one session saw during a failover run.
#[derive(Default)]
struct SessionOutcome {
    /// Messages sent (sequence numbers 0..sent).
    sent: u64,
    /// Echoes received per sequence number.
    counts: Vec<u8>,
    /// The backend mark of the first echo (the backend the session started on).
    first_mark: Option<u8>,
    /// The backend mark of the last echo.
    last_mark: Option<u8>,
    /// Kill to the first echo, from another backend, of a message sent after the kill.
    recovery_ns: Option<u64>,
    /// That message's own round trip.
    first_rtt_ns: Option<u64>,
    /// First echoes of a sequence number below one already echoed.
    reordered: u64,
    /// Echoes from the first backend of messages sent after the kill (the
    /// kill command had not yet taken effect).
    old_after_kill: u64,
    /// The client saw a close or an error.
    disconnected: bool,
}

/// Totals over every session of a failover run.
struct FailoverTotals {
    sessions: u64,
    recovered: u64,
    recovered_within_2s: u64,
    disconnected: u64,
    sent: u64,
    echoes: u64,
    lost: u64,
    /// Lost in sessions that were never disconnected.
    lost_connected: u64,
    sessions_with_loss: u64,
    duplicated: u64,
    extra_echoes: u64,
    sessions_with_duplicates: u64,
    max_duplicates_per_session: u64,
    reordered: u64,
    old_after_kill: u64,
    first_backend: BTreeMap<String, u64>,
    last_backend: BTreeMap<String, u64>,
    recovery: Histogram<u64>,
    first_rtt: Histogram<u64>,
}

/// Shared state of a failover run.
struct FailoverState {
    /// When the kill was issued, in nanoseconds since [`epoch`] (0: not yet).
    killed_at: AtomicU64,
    /// How long the kill command took.
    kill_command_ns: AtomicU64,
    kill_error: Mutex<Option<String>>,
    totals: Mutex<FailoverTotals>,
    samples: Mutex<Vec<Sample>>,
}

impl FailoverState {
    fn new() -> FailoverState {
        FailoverState {
            killed_at: AtomicU64::new(0),
            kill_command_ns: AtomicU64::new(0),
            kill_error: Mutex::new(None),
            totals: Mutex::new(FailoverTotals {
                sessions: 0,
                recovered: 0,
                recovered_within_2s: 0,
                disconnected: 0,
                sent: 0,
                echoes: 0,
                lost: 0,
                lost_connected: 0,
                sessions_with_loss: 0,
                duplicated: 0,
                extra_echoes: 0,
                sessions_with_duplicates: 0,
                max_duplicates_per_session: 0,
                reordered: 0,
                old_after_kill: 0,
                first_backend: BTreeMap::new(),
                last_backend: BTreeMap::new(),
                recovery: new_histogram(),
                first_rtt: new_histogram(),
            }),
            samples: Mutex::new(Vec::new()),
        }
    }

    fn add(&self, outcome: &SessionOutcome) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.sessions += 1;
        t.sent += outcome.sent;
        if outcome.disconnected {
            t.disconnected += 1;
        }
        if let Some(ns) = outcome.recovery_ns {
            t.recovered += 1;
            if ns <= 2_000_000_000 {
                t.recovered_within_2s += 1;
            }
            t.recovery.saturating_record(ns.max(1));
        }
        if let Some(ns) = outcome.first_rtt_ns {
            t.first_rtt.saturating_record(ns.max(1));
        }
        let (mut lost, mut duplicated, mut extra) = (0, 0, 0);
        for seq in 0..outcome.sent as usize {
            match outcome.counts.get(seq).copied().unwrap_or(0) {
                0 => lost += 1,
                1 => {}
                n => {
                    duplicated += 1;
                    extra += u64::from(n) - 1;
                }
            }
        }
        t.echoes += outcome.counts.iter().map(|&n| u64::from(n)).sum::<u64>();
        t.lost += lost;
        if !outcome.disconnected {
            t.lost_connected += lost;
        }
        t.sessions_with_loss += u64::from(lost > 0);
        t.duplicated += duplicated;
        t.extra_echoes += extra;
        t.sessions_with_duplicates += u64::from(duplicated > 0);
        t.max_duplicates_per_session = t.max_duplicates_per_session.max(duplicated);
        t.reordered += outcome.reordered;
        t.old_after_kill += outcome.old_after_kill;
        *t.first_backend
            .entry(mark_name(outcome.first_mark))
            .or_insert(0) += 1;
        *t.last_backend
            .entry(mark_name(outcome.last_mark))
            .or_insert(0) += 1;
    }
}

fn mark_name(mark: Option<u8>) -> String {
    match mark {
        None => "no echo".to_string(),
        Some(FILLER) => "unmarked".to_string(),
        Some(m) if m.is_ascii_graphic() => (m as char).to_string(),
        Some(m) => format!("0x{m:02x}"),
    }
}

fn mark_of(msg: &Message, text: bool) -> Option<u8> {
    let at = mark_offset(text);
    match msg {
        Message::Binary(body) => body.get(at).copied(),
        Message::Text(t) => t.as_bytes().get(at).copied(),
        _ => None,
    }
}

/// Open the sessions, send a paced numbered stream on each, SIGKILL the
/// backend they are on after `--kill-after`, keep sending until
/// `--duration`, wait for the last echoes, and tally per session.
async fn failover(run: Arc<Run>) -> Timing {
    let helper = spawn_signaller("KILL", run.args.kill_pid.unwrap_or(0));
    let connect_started = Instant::now();
    let connections = open_all(&run).await;
    let connect_s = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} sessions open in {connect_s:.2}s; the backend is killed {:?} into the send phase",
        connections.len(),
        run.args.kill_after
    );
    let start = Instant::now() + Duration::from_millis(100);
    let phases = Phases {
        start,
        measure_from: start,
        end: start + run.args.duration,
    };
    let sampler = run
        .args
        .watch_pid
        .map(|pid| tokio::spawn(sample_process(run.clone(), pid)));
    let killer = tokio::spawn(kill_backend(
        run.clone(),
        start + run.args.kill_after,
        helper,
    ));
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|ws| tokio::spawn(drive_failover(run.clone(), ws, phases)))
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let _ = killer.await;
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    Timing {
        connect_s: Some(connect_s),
        measured_s: Some(run.args.duration.as_secs_f64()),
    }
}

/// A shell, started ahead of time, that sends `signal` (KILL, USR2) to
/// `pid` once a line arrives on its stdin (its `kill` is a builtin).
/// Nothing has to be forked at the moment of the kill, which on a busy
/// machine takes hundreds of milliseconds. If the load generator ends
/// first, the pipe closes, `read` fails and nothing is signalled.
fn spawn_signaller(signal: &str, pid: u32) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg("read go && kill -\"$1\" \"$2\"")
        .arg("sh")
        .arg(signal)
        .arg(pid.to_string())
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// Tell a helper from [`spawn_signaller`] (sending `signal` to `pid`) to
/// go: how long until it exited, and what went wrong, if anything.
async fn fire_signaller(
    mut helper: tokio::process::Child,
    signal: &str,
    pid: u32,
) -> (Duration, Option<String>) {
    let issued = Instant::now();
    let told = match helper.stdin.take() {
        Some(mut stdin) => stdin.write_all(b"go\n").await,
        None => Err(std::io::ErrorKind::BrokenPipe.into()),
    };
    let status = helper.wait().await;
    let error = match (told, status) {
        (Ok(()), Ok(s)) if s.success() => None,
        (Ok(()), Ok(s)) => Some(format!("kill -{signal} {pid} exited with {s}")),
        (Err(e), _) | (_, Err(e)) => Some(format!("signal helper: {e}")),
    };
    (issued.elapsed(), error)
}

/// SIGKILL the backend at `at` through the helper. The kill instant is
/// taken just before the helper is told, so recovery times include its
/// wake-up (they err long, never short); how long it took until the helper
/// exited is reported as `kill_command_ms`.
async fn kill_backend(run: Arc<Run>, at: Instant, helper: std::io::Result<tokio::process::Child>) {
    let Some(pid) = run.args.kill_pid else { return };
    let error = match helper {
        Err(e) => Some(format!("cannot start the kill helper: {e}")),
        Ok(helper) => {
            tokio::time::sleep_until(at).await;
            let issued = Instant::now();
            run.failover
                .killed_at
                .store(nanos_since_epoch(issued), Ordering::Release);
            let (took, error) = fire_signaller(helper, "KILL", pid).await;
            run.failover
                .kill_command_ns
                .store(took.as_nanos() as u64, Ordering::Relaxed);
            error
        }
    };
    match &error {
        None => eprintln!("loadgen: SIGKILL sent to pid {pid}"),
        Some(e) => eprintln!("loadgen: {e}"),
    }
    *run.failover
        .kill_error
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = error;
}

/// utime + stime (clock ticks) and VmRSS (KiB) of a process, from /proc.
fn read_proc(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm) ": state first, utime 12th, stime 13th.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((ticks, rss))
}

/// Time the process's threads have waited on a run queue, in nanoseconds.
fn read_runqueue_wait(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Busy and total clock ticks of the whole machine, from /proc/stat.
fn read_machine() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    let total = v.iter().take(8).sum();
    Some((busy, total))
}

/// Sample the watched process until aborted or it exits.
async fn sample_process(run: Arc<Run>, pid: u32) {
    let mut ticks = tokio::time::interval(run.args.sample_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some((cpu, rss_kib)) = read_proc(pid) else {
            eprintln!("loadgen: watched process {pid} is gone");
            return;
        };
        let (machine_busy, machine_total) = read_machine().unwrap_or((0, 0));
        run.failover
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Sample {
                at: nanos_since_epoch(Instant::now()),
                ticks: cpu,
                rss_kib,
                machine_busy,
                machine_total,
                runqueue_wait_ns: read_runqueue_wait(pid),
            });
    }
}

/// One session of a failover run.
async fn drive_failover(run: Arc<Run>, ws: Ws, phases: Phases) {
    let (mut sink, mut stream) = ws.split();
    let flow = Flow {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        writer_done: AtomicBool::new(false),
        wake_reader: Notify::new(),
        window: Semaphore::new(1),
    };
    let writer = async {
        if let Err(e) = send_paced(&run, &mut sink, &flow, phases).await {
            run.stats.error(format!("send: {}", error_kind(&e)));
        }
        flow.writer_done.store(true, Ordering::Release);
        flow.wake_reader.notify_one();
    };
    let reader = read_failover(&run, &mut stream, &flow, phases);
    let (_, mut outcome) = tokio::join!(writer, reader);
    outcome.sent = flow.sent.load(Ordering::Relaxed);
    if !outcome.disconnected {
        close(&mut sink, &mut stream).await;
    }
    run.failover.add(&outcome);
}

/// Read echoes until every message sent has been echoed at least once
/// after the writer finished, the drain time is over, or the connection
/// ends; count echoes per sequence number and note when the session
/// relays again after the kill.
async fn read_failover(
    run: &Run,
    stream: &mut SplitStream<Ws>,
    flow: &Flow,
    phases: Phases,
) -> SessionOutcome {
    let stats = &run.stats;
    let drain_deadline = phases.end + run.args.drain;
    let mut outcome = SessionOutcome::default();
    let mut distinct = 0u64;
    let mut highest: Option<u64> = None;
    loop {
        if flow.writer_done.load(Ordering::Acquire) && distinct >= flow.sent.load(Ordering::Relaxed)
        {
            return outcome;
        }
        let (msg, seq, stamp, len) = match next_echo(stats, stream, flow, drain_deadline).await {
            Received::Echo {
                msg,
                seq,
                stamp,
                len,
            } => (msg, seq, stamp, len),
            Received::Other => continue,
            Received::Deadline => return outcome,
            Received::Ended(_) => {
                outcome.disconnected = true;
                return outcome;
            }
        };
        let now = nanos_since_epoch(Instant::now());
        // The writer counts a message before it can be echoed (same task).
        if seq >= flow.sent.load(Ordering::Relaxed) {
            stats.error("bad echo: never sent");
            continue;
        }
        if len != run.args.size {
            stats.error("bad echo: wrong size");
        }
        stats.received.fetch_add(1, Ordering::Relaxed);
        stats
            .received_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let index = seq as usize;
        if index >= outcome.counts.len() {
            outcome.counts.resize(index + 1, 0);
        }
        outcome.counts[index] = outcome.counts[index].saturating_add(1);
        if outcome.counts[index] == 1 {
            distinct += 1;
            if highest.is_some_and(|h| seq < h) {
                outcome.reordered += 1;
            }
            highest = Some(highest.map_or(seq, |h| h.max(seq)));
            stats.record(now.saturating_sub(stamp));
        }
        let mark = mark_of(&msg, run.args.text);
        let first_mark = *outcome.first_mark.get_or_insert(mark.unwrap_or(FILLER));
        outcome.last_mark = mark;
        let killed_at = run.failover.killed_at.load(Ordering::Acquire);
        if killed_at != 0 && stamp >= killed_at {
            // Marked backends tell the old one from the new; unmarked, any
            // echo of a message sent after the kill counts.
            let from_old = first_mark != FILLER && mark == Some(first_mark);
            if from_old {
                outcome.old_after_kill += 1;
            } else if outcome.recovery_ns.is_none() {
                outcome.recovery_ns = Some(now.saturating_sub(killed_at));
                outcome.first_rtt_ns = Some(now.saturating_sub(stamp));
            }
        }
    }
}

/// The failover part of the report.
fn failover_report(run: &Run) -> Value {
    let f = &run.failover;
    let t = f.totals.lock().unwrap_or_else(|e| e.into_inner());
    let killed_at = f.killed_at.load(Ordering::Acquire);
    let ms = |nanos: u64| (nanos as f64 / 1e4).round() / 100.0;
    let percentiles = |h: &Histogram<u64>| {
        if h.is_empty() {
            Value::Null
        } else {
            json!({
                "min": ms(h.min()),
                "p50": ms(h.value_at_quantile(0.50)),
                "p90": ms(h.value_at_quantile(0.90)),
                "p99": ms(h.value_at_quantile(0.99)),
                "max": ms(h.max()),
            })
        }
    };
    // The failover window: from the kill until the last session relayed
    // again, plus one second (to the end of the samples if some never did).
    let samples = f.samples.lock().unwrap_or_else(|e| e.into_inner());
    let window_end = if t.recovered == t.sessions && !t.recovery.is_empty() {
        killed_at + t.recovery.max() + 1_000_000_000
    } else {
        u64::MAX
    };
    let tck = run.args.clk_tck as f64;
    let pct = |a: &Sample, b: &Sample| {
        let dt = (b.at - a.at) as f64 / 1e9;
        if dt > 0.0 {
            (b.ticks - a.ticks) as f64 / tck / dt * 100.0
        } else {
            0.0
        }
    };
    let router = if samples.len() < 2 || killed_at == 0 {
        Value::Null
    } else {
        let before: Vec<&Sample> = samples.iter().filter(|s| s.at <= killed_at).collect();
        let during: Vec<(&Sample, &Sample)> = samples
            .windows(2)
            .map(|w| (&w[0], &w[1]))
            .filter(|(_, b)| b.at > killed_at && b.at <= window_end)
            .collect();
        let steady = before
            .iter()
            .rev()
            .find(|s| killed_at - s.at >= 2_000_000_000)
            .zip(before.last())
            .map(|(a, b)| round1(pct(a, b)));
        let peak_cpu = during.iter().map(|(a, b)| pct(a, b)).fold(0.0, f64::max);
        // Busy share of every core together (100 = the whole machine).
        let machine = |a: &Sample, b: &Sample| {
            let total = b.machine_total.saturating_sub(a.machine_total);
            if total > 0 {
                b.machine_busy.saturating_sub(a.machine_busy) as f64 / total as f64 * 100.0
            } else {
                0.0
            }
        };
        let machine_peak = during
            .iter()
            .map(|(a, b)| machine(a, b))
            .fold(0.0, f64::max);
        // How much the router's threads waited for a core (100 = one thread
        // waiting the whole time).
        let waiting = |a: &Sample, b: &Sample| {
            let dt = b.at.saturating_sub(a.at) as f64;
            if dt > 0.0 {
                b.runqueue_wait_ns.saturating_sub(a.runqueue_wait_ns) as f64 / dt * 100.0
            } else {
                0.0
            }
        };
        let wait_peak = during
            .iter()
            .map(|(a, b)| waiting(a, b))
            .fold(0.0, f64::max);
        let wait_mean = before
            .last()
            .zip(during.last())
            .map(|(a, (_, b))| round1(waiting(a, b)));
        let machine_before = before
            .iter()
            .rev()
            .find(|s| killed_at - s.at >= 2_000_000_000)
            .zip(before.last())
            .map(|(a, b)| round1(machine(a, b)));
        let machine_mean = before
            .last()
            .zip(during.last())
            .map(|(a, (_, b))| round1(machine(a, b)));
        let failover_cpu_s = before
            .last()
            .zip(during.last())
            .map(|(a, (_, b))| ((b.ticks - a.ticks) as f64 / tck * 100.0).round() / 100.0);
        json!({
            "sample_interval_ms": run.args.sample_interval.as_millis() as u64,
            "cpu_pct_before_kill": steady,
            "cpu_pct_peak": round1(peak_cpu),
            "cpu_s_failover": failover_cpu_s,
            "machine_busy_pct_before_kill": machine_before,
            "machine_busy_pct_failover": machine_mean,
            "machine_busy_pct_peak": round1(machine_peak),
            "runqueue_wait_pct_failover": wait_mean,
            "runqueue_wait_pct_peak": round1(wait_peak),
            "rss_kib_before_kill": before.last().map(|s| s.rss_kib),
            "rss_kib_peak": during.iter().map(|(_, b)| b.rss_kib).max(),
            "rss_kib_end": samples.last().map(|s| s.rss_kib),
            "window_s": if window_end == u64::MAX { Value::Null } else {
                json!(((window_end - killed_at) as f64 / 1e7).round() / 100.0)
            },
        })
    };
    json!({
        "kill_pid": run.args.kill_pid,
        "kill_after_s": run.args.kill_after.as_secs_f64(),
        "killed": killed_at != 0,
        "kill_error": f.kill_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        "kill_command_ms": ms(f.kill_command_ns.load(Ordering::Relaxed)),
        "sessions": t.sessions,
        "first_backend": t.first_backend,
        "last_backend": t.last_backend,
        "recovered": t.recovered,
        "not_recovered": t.sessions - t.recovered,
        "recovered_within_2s": t.recovered_within_2s,
        "recovery_ms": percentiles(&t.recovery),
        "first_echo_round_trip_ms": percentiles(&t.first_rtt),
        "disconnects": t.disconnected,
        "messages": {
            "sent": t.sent,
            "echoes": t.echoes,
            "lost": t.lost,
            "lost_in_connected_sessions": t.lost_connected,
            "sessions_with_loss": t.sessions_with_loss,
            "duplicated": t.duplicated,
            "extra_echoes": t.extra_echoes,
            "sessions_with_duplicates": t.sessions_with_duplicates,
            "max_duplicated_per_session": t.max_duplicates_per_session,
            "reordered": t.reordered,
            "old_backend_after_kill": t.old_after_kill,
        },
        "router": router,
    })
}

// ---------------------------------------------------------------------------
// upgrade

/// New clients (upgrade mode) in flight at once; a tick that finds this
/// many still running is skipped and counted.
const MAX_NEW_CLIENTS_IN_FLIGHT: usize = 200;
/// How often the upgrade mode looks at the old process (exit) and the pid
/// file (the new process).
const WATCH_TICK: Duration = Duration::from_millis(10);
/// The query parameter that carries the session key (the router's default
/// `[session_key]`).
const SESSION_PARAM: &str = "session";
/// The router's metrics are read this long after the signal, or at the
/// old process's exit if that comes first.
const EARLY_SCRAPE_AFTER: Duration = Duration::from_secs(2);
/// Largest metrics page read.
const MAX_METRICS_BYTES: u64 = 4 * 1024 * 1024;

fn check_upgrade_args(args: &Args) -> anyhow::Result<u32> {
    let Some(path) = &args.pid_file else {
        bail!("upgrade needs --pid-file: the router's pid file (SIGUSR2 goes to that pid)");
    };
    let pid = read_pid_file(path).with_context(|| format!("--pid-file {}", path.display()))?;
    if pid <= 1 || pid == std::process::id() {
        bail!("--pid-file names pid {pid}, which is not a router");
    }
    if !process_alive(pid) {
        bail!("--pid-file names pid {pid}, which is not running");
    }
    if args.idle > MAX_CONNECTIONS {
        bail!("--idle must be at most {MAX_CONNECTIONS}");
    }
    if let Some(url) = &args.metrics_url {
        MetricsTarget::parse(url)?;
    }
    if args.connect_every < Duration::from_millis(1) || args.connect_every > Duration::from_secs(10)
    {
        bail!("--connect-every must be between 1ms and 10s");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.batch_interval > Duration::from_secs(60) {
        bail!("--batch-interval must be at most 60s");
    }
    let ten_minutes = Duration::from_secs(600);
    if args.steady > ten_minutes || args.after_exit > ten_minutes || args.drain > ten_minutes {
        bail!("--steady, --after-exit and --drain must be at most 10m");
    }
    if args.exit_timeout.is_zero() || args.exit_timeout > MAX_DURATION {
        bail!("--exit-timeout must be more than 0 and at most 1h");
    }
    if args.sample_interval < Duration::from_millis(10)
        || args.sample_interval > Duration::from_secs(10)
    {
        bail!("--sample-interval must be between 10ms and 10s");
    }
    Ok(pid)
}

fn read_pid_file(path: &std::path::Path) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(path)?;
    text.trim()
        .parse::<u32>()
        .with_context(|| format!("not a pid: {:?}", text.trim()))
}

/// The state letter of /proc/PID/stat; `None` once the process is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 2..)?.chars().next()
}

/// Running: there and not a zombie (the old router stays a zombie until
/// the script that started it reaps it).
fn process_alive(pid: u32) -> bool {
    matches!(process_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// VmRSS and VmHWM of a process, in KiB.
fn read_memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// `url` with the session key `key` added to its query.
fn keyed_url(url: &str, key: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{SESSION_PARAM}={key}")
}

/// A checked loopback `http://` address of a metrics page.
struct MetricsTarget {
    addr: SocketAddr,
    path: String,
}

impl MetricsTarget {
    fn parse(url: &str) -> anyhow::Result<MetricsTarget> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("--metrics-url {url:?} must start with http://"))?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority.parse().with_context(|| {
            format!("--metrics-url host {authority:?} must be an IP address and port")
        })?;
        if !addr.ip().is_loopback() {
            bail!("--metrics-url {addr}: refusing a non-loopback address");
        }
        Ok(MetricsTarget {
            addr,
            path: path.to_string(),
        })
    }
}

/// GET the metrics page (HTTP/1.0, so the body is not chunked), bounded.
async fn scrape_metrics(url: &str) -> Result<String, String> {
    let target = MetricsTarget::parse(url).map_err(|e| e.to_string())?;
    let fetch = async {
        let mut stream = TcpStream::connect(target.addr)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
            target.path, target.addr
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {}", e.kind()))?;
        let mut response = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(
            &mut tokio::io::AsyncReadExt::take(stream, MAX_METRICS_BYTES),
            &mut response,
        )
        .await
        .map_err(|e| format!("read: {}", e.kind()))?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| "no HTTP header".to_string())?;
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(format!("HTTP status line {status:?}"));
        }
        Ok(body.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), fetch).await {
        Ok(result) => result,
        Err(_) => Err("timeout".to_string()),
    }
}

/// One sample `name{labels} value` of a Prometheus text page.
struct PromSample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl PromSample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_prometheus(text: &str) -> Vec<PromSample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find(['{', ' ']) {
            Some(at) if line.as_bytes()[at] == b'{' => {
                let Some(close) = line[at..].find('}') else {
                    continue;
                };
                let inner = &line[at + 1..at + close];
                let labels = inner
                    .split(',')
                    .filter_map(|pair| {
                        let (k, v) = pair.split_once('=')?;
                        Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                    })
                    .collect();
                (&line[..at], labels, &line[at + close + 1..])
            }
            Some(at) => (&line[..at], Vec::new(), &line[at..]),
            None => continue,
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        samples.push(PromSample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

/// The router's upgrade figures from a metrics page: sessions handed over
/// (by result), the pause histogram (p50, p99 from its buckets, or its
/// quantiles when the exporter renders it as a summary), sessions active,
/// and process upgrades (by result).
fn upgrade_metrics(text: &str) -> Value {
    const PAUSE: &str = "wsrouter_handover_pause_seconds";
    let samples = parse_prometheus(text);
    let by_result = |name: &str| {
        let mut map = serde_json::Map::new();
        for s in samples.iter().filter(|s| s.name == name) {
            let key = s.label("result").unwrap_or("").to_string();
            let entry = map.entry(key).or_insert(json!(0.0));
            *entry = json!(entry.as_f64().unwrap_or(0.0) + s.value);
        }
        Value::Object(map)
    };
    let sum_of = |name: &str| {
        let matching: Vec<f64> = samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .collect();
        if matching.is_empty() {
            Value::Null
        } else {
            json!(matching.iter().sum::<f64>())
        }
    };
    let ms = |seconds: f64| {
        if seconds.is_finite() {
            json!((seconds * 1e5).round() / 100.0)
        } else {
            json!("+Inf")
        }
    };
    let count = samples
        .iter()
        .find(|s| s.name == format!("{PAUSE}_count"))
        .map(|s| s.value);
    let sum = samples
        .iter()
        .find(|s| s.name == format!("{PAUSE}_sum"))
        .map(|s| s.value);
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == format!("{PAUSE}_bucket"))
        .filter_map(|s| {
            let le = s.label("le")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, s.value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let quantiles: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == PAUSE)
        .filter_map(|s| Some((s.label("quantile")?.parse::<f64>().ok()?, s.value)))
        .collect();
    let pause = if !buckets.is_empty() {
        let total = count.unwrap_or_else(|| buckets.last().map_or(0.0, |b| b.1));
        // The upper bound of the first bucket holding the q-th pause.
        let at = |q: f64| {
            buckets
                .iter()
                .find(|(_, cumulative)| *cumulative >= (q * total).ceil().max(1.0))
                .map_or(Value::Null, |(le, _)| ms(*le))
        };
        json!({
            "format": "histogram",
            "count": total,
            "sum_s": sum,
            "mean_ms": match (sum, total) { (Some(s), t) if t > 0.0 => ms(s / t), _ => Value::Null },
            "p50_ms_bucket_bound": at(0.50),
            "p99_ms_bucket_bound": at(0.99),
            "max_ms_bucket_bound": at(1.0),
            "buckets": buckets.iter().map(|(le, c)| json!([ms(*le), c])).collect::<Vec<_>>(),
        })
    } else if !quantiles.is_empty() {
        let q = |wanted: f64| {
            quantiles
                .iter()
                .find(|(at, _)| (*at - wanted).abs() < 1e-9)
                .map_or(Value::Null, |(_, v)| ms(*v))
        };
        json!({
            "format": "summary",
            "count": count,
            "sum_s": sum,
            "mean_ms": match (sum, count) { (Some(s), Some(c)) if c > 0.0 => ms(s / c), _ => Value::Null },
            "p50_ms": q(0.5),
            "p90_ms": q(0.9),
            "p99_ms": q(0.99),
            "p99_9_ms": q(0.999),
            "max_ms": q(1.0),
        })
    } else {
        json!({ "format": "absent", "count": count, "sum_s": sum })
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("wsrouter_handover")
                || l.starts_with("wsrouter_sessions_active")
                || l.starts_with("wsrouter_process_upgrades")
        })
        .collect();
    json!({
        "handover_sessions": by_result("wsrouter_handover_sessions_total"),
        "handover_pause": pause,
        "sessions_active": sum_of("wsrouter_sessions_active"),
        "process_upgrades": by_result("wsrouter_process_upgrades_total"),
        "lines": lines,
    })
}

/// What one active session saw.
#[derive(Default)]
struct ActiveRecord {
    opened: bool,
    /// Messages sent (sequence numbers 0..sent).
    sent: u64,
    /// Echoes per sequence number.
    counts: Vec<u8>,
    /// Every echo: arrival (nanoseconds since [`epoch`]) and round trip.
    echoes: Vec<(u64, u64)>,
    highest: Option<u64>,
    /// First echoes of a number below one already echoed.
    reordered: u64,
    /// Echoes of numbers never sent.
    never_sent: u64,
    /// When and how the client saw the session end (close frame, error).
    closed: Option<(u64, String)>,
}

/// A new client's attempt: start, connect + upgrade time, outcome.
struct NewClient {
    start: u64,
    connect_ns: Option<u64>,
    outcome: Result<(), String>,
}

/// VmRSS and VmHWM of one router process at one watch tick.
struct MemorySample {
    tick: u64,
    at: u64,
    pid: u32,
    rss_kib: u64,
    hwm_kib: u64,
}

/// Shared state of an upgrade run. Times are nanoseconds since [`epoch`],
/// 0 while not yet.
struct UpgradeState {
    old_pid: u32,
    new_pid: AtomicU64,
    steady_from: AtomicU64,
    signal_at: AtomicU64,
    signal_command_ns: AtomicU64,
    signal_error: Mutex<Option<String>>,
    new_pid_at: AtomicU64,
    old_exit_at: AtomicU64,
    old_died_before_signal: AtomicBool,
    stop_at: AtomicU64,
    active: Vec<Mutex<ActiveRecord>>,
    active_failed: AtomicU64,
    idle_opened: AtomicU64,
    idle_failed: AtomicU64,
    idle_closes: Mutex<Vec<(u64, String)>>,
    /// When each idle session got its first ping from the router.
    idle_first_pings: Mutex<Vec<u64>>,
    new_clients: Mutex<Vec<NewClient>>,
    new_clients_skipped: AtomicU64,
    memory: Mutex<Vec<MemorySample>>,
    metrics_before: Mutex<Option<Result<String, String>>>,
    metrics_early: Mutex<Option<Result<String, String>>>,
    metrics_after: Mutex<Option<Result<String, String>>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl UpgradeState {
    fn new(old_pid: u32, active: usize) -> UpgradeState {
        UpgradeState {
            old_pid,
            new_pid: AtomicU64::new(0),
            steady_from: AtomicU64::new(0),
            signal_at: AtomicU64::new(0),
            signal_command_ns: AtomicU64::new(0),
            signal_error: Mutex::new(None),
            new_pid_at: AtomicU64::new(0),
            old_exit_at: AtomicU64::new(0),
            old_died_before_signal: AtomicBool::new(false),
            stop_at: AtomicU64::new(0),
            active: (0..active)
                .map(|_| Mutex::new(ActiveRecord::default()))
                .collect(),
            active_failed: AtomicU64::new(0),
            idle_opened: AtomicU64::new(0),
            idle_failed: AtomicU64::new(0),
            idle_closes: Mutex::new(Vec::new()),
            idle_first_pings: Mutex::new(Vec::new()),
            new_clients: Mutex::new(Vec::new()),
            new_clients_skipped: AtomicU64::new(0),
            memory: Mutex::new(Vec::new()),
            metrics_before: Mutex::new(None),
            metrics_early: Mutex::new(None),
            metrics_after: Mutex::new(None),
        }
    }

    /// Sequence numbers sent on active sessions and never echoed.
    fn lost(&self) -> u64 {
        self.active
            .iter()
            .map(|r| {
                let r = locked(r);
                (0..r.sent as usize)
                    .filter(|&seq| r.counts.get(seq).copied().unwrap_or(0) == 0)
                    .count() as u64
            })
            .sum()
    }
}

/// Open sessions `first..first + count`, each with the key `{kind}-{i}`,
/// `--connect-concurrency` at a time.
async fn open_keyed(run: &Arc<Run>, first: usize, count: usize, kind: &str) -> Vec<(usize, Ws)> {
    let mut opened = Vec::with_capacity(count);
    let mut opening = futures_util::stream::iter(first..first + count)
        .map(|i| {
            let run = run.clone();
            let url = keyed_url(&run.target.url, &format!("{kind}-{i}"));
            async move {
                run.stats.attempted.fetch_add(1, Ordering::Relaxed);
                (i, open_url(&run, i, &url).await)
            }
        })
        .buffer_unordered(run.args.connect_concurrency);
    while let Some((i, result)) = opening.next().await {
        match result {
            Ok(ws) => {
                run.stats.opened.fetch_add(1, Ordering::Relaxed);
                opened.push((i, ws));
            }
            Err(kind) => {
                run.stats.failed.fetch_add(1, Ordering::Relaxed);
                run.stats.error(format!("session open: {kind}"));
            }
        }
    }
    opened
}

/// Open the active sessions, start the new clients, open the idle sessions
/// in batches, wait `--steady`, send SIGUSR2 to the router, wait for the
/// old process to exit, go on `--after-exit`, stop, and tally.
async fn upgrade(run: Arc<Run>) -> Timing {
    let u = &run.upgrade;
    let helper = spawn_signaller("USR2", u.old_pid);
    let watcher = tokio::spawn(watch_processes(run.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect_started = Instant::now();

    let active_count = run.args.connections;
    let mut active_tasks = Vec::with_capacity(active_count);
    for (i, ws) in open_keyed(&run, 0, active_count, "active").await {
        locked(&u.active[i]).opened = true;
        active_tasks.push(tokio::spawn(drive_active(
            run.clone(),
            ws,
            i,
            stop_rx.clone(),
        )));
    }
    u.active_failed.store(
        (active_count - active_tasks.len()) as u64,
        Ordering::Relaxed,
    );
    eprintln!(
        "loadgen: {} active sessions open and sending; new clients every {:?}",
        active_tasks.len(),
        run.args.connect_every
    );
    let connector = tokio::spawn(new_clients(run.clone(), stop_rx.clone()));

    let mut idle_tasks = Vec::with_capacity(run.args.idle);
    let mut next = 0;
    while next < run.args.idle {
        let batch_started = Instant::now();
        let count = run.args.batch.min(run.args.idle - next);
        let opened = open_keyed(&run, active_count + next, count, "idle").await;
        u.idle_opened
            .fetch_add(opened.len() as u64, Ordering::Relaxed);
        u.idle_failed
            .fetch_add((count - opened.len()) as u64, Ordering::Relaxed);
        for (_, ws) in opened {
            idle_tasks.push(tokio::spawn(hold_idle(run.clone(), ws, stop_rx.clone())));
        }
        next += count;
        if next < run.args.idle {
            tokio::time::sleep_until(batch_started + run.args.batch_interval).await;
        }
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} idle sessions open ({} failed) in {connect_s:.2}s in all; signal in {:?}",
        u.idle_opened.load(Ordering::Relaxed),
        u.idle_failed.load(Ordering::Relaxed),
        run.args.steady
    );
    let steady_from = Instant::now();
    u.steady_from
        .store(nanos_since_epoch(steady_from), Ordering::Release);
    tokio::time::sleep(run.args.steady).await;
    if let Some(url) = &run.args.metrics_url {
        *locked(&u.metrics_before) = Some(scrape_metrics(url).await);
    }

    send_upgrade_signal(&run, helper).await;
    if u.signal_at.load(Ordering::Acquire) != 0 {
        let signalled = Instant::now();
        let deadline = signalled + run.args.exit_timeout;
        let mut early_scraped = false;
        while u.old_exit_at.load(Ordering::Acquire) == 0 {
            // The pause quantiles are a rolling summary (the last minute
            // or so): read them while the hand-over is fresh too.
            if !early_scraped && Instant::now() >= signalled + EARLY_SCRAPE_AFTER {
                early_scraped = true;
                if let Some(url) = &run.args.metrics_url {
                    *locked(&u.metrics_early) = Some(scrape_metrics(url).await);
                }
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "loadgen: the old process {} did not exit within {:?}",
                    u.old_pid, run.args.exit_timeout
                );
                break;
            }
            tokio::time::sleep(WATCH_TICK).await;
        }
    }
    if let Some(url) = &run.args.metrics_url
        && locked(&u.metrics_early).is_none()
    {
        *locked(&u.metrics_early) = Some(scrape_metrics(url).await);
    }
    tokio::time::sleep(run.args.after_exit).await;
    if let Some(url) = &run.args.metrics_url {
        *locked(&u.metrics_after) = Some(scrape_metrics(url).await);
    }

    let stop_at = Instant::now();
    u.stop_at
        .store(nanos_since_epoch(stop_at), Ordering::Release);
    let _ = stop_tx.send(true);
    eprintln!("loadgen: stopping: last echoes, then every session closes");
    for task in active_tasks {
        let _ = task.await;
    }
    for task in idle_tasks {
        let _ = task.await;
    }
    let _ = connector.await;
    watcher.abort();
    Timing {
        connect_s: Some(connect_s),
        measured_s: Some((stop_at - steady_from).as_secs_f64()),
    }
}

/// SIGUSR2 to the old process through the helper; the instant is taken
/// just before the helper is told (the pause and exit times err long).
async fn send_upgrade_signal(run: &Run, helper: std::io::Result<tokio::process::Child>) {
    let u = &run.upgrade;
    let pid = u.old_pid;
    let error = if !process_alive(pid) {
        u.old_died_before_signal.store(true, Ordering::Relaxed);
        Some(format!("the router {pid} is gone before the signal"))
    } else {
        match helper {
            Err(e) => Some(format!("cannot start the signal helper: {e}")),
            Ok(helper) => {
                let issued = Instant::now();
                u.signal_at
                    .store(nanos_since_epoch(issued), Ordering::Release);
                let (took, error) = fire_signaller(helper, "USR2", pid).await;
                u.signal_command_ns
                    .store(took.as_nanos() as u64, Ordering::Relaxed);
                error
            }
        }
    };
    match &error {
        None => eprintln!("loadgen: SIGUSR2 sent to the router, pid {pid}"),
        Some(e) => eprintln!("loadgen: {e}"),
    }
    *locked(&u.signal_error) = error;
}

/// Every [`WATCH_TICK`]: has the old process exited, has the new one
/// written the pid file; every `--sample-interval`: both processes' VmRSS
/// and VmHWM. Runs until aborted.
async fn watch_processes(run: Arc<Run>) {
    let u = &run.upgrade;
    let every = (run.args.sample_interval.as_millis() / WATCH_TICK.as_millis()).max(1) as u64;
    let mut ticks = tokio::time::interval(WATCH_TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tick = 0u64;
    loop {
        ticks.tick().await;
        let now = nanos_since_epoch(Instant::now());
        let signalled = u.signal_at.load(Ordering::Acquire) != 0;
        let old_gone = u.old_exit_at.load(Ordering::Acquire) != 0;
        if signalled && !old_gone && !process_alive(u.old_pid) {
            u.old_exit_at.store(now, Ordering::Release);
            eprintln!("loadgen: the old process {} exited", u.old_pid);
        }
        let mut new_pid = u.new_pid.load(Ordering::Acquire) as u32;
        if signalled
            && new_pid == 0
            && let Some(path) = &run.args.pid_file
            && let Ok(pid) = read_pid_file(path)
            && pid != u.old_pid
        {
            new_pid = pid;
            u.new_pid_at.store(now, Ordering::Release);
            u.new_pid.store(u64::from(pid), Ordering::Release);
            eprintln!("loadgen: the pid file names the new process {pid}");
        }
        if tick.is_multiple_of(every) {
            let mut pids = Vec::with_capacity(2);
            if !old_gone {
                pids.push(u.old_pid);
            }
            if new_pid != 0 {
                pids.push(new_pid);
            }
            for pid in pids {
                if let Some((rss_kib, hwm_kib)) = read_memory(pid) {
                    locked(&u.memory).push(MemorySample {
                        tick,
                        at: now,
                        pid,
                        rss_kib,
                        hwm_kib,
                    });
                }
            }
        }
        tick += 1;
    }
}

/// One active session: a numbered message every 1/rate s (random phase)
/// until the stop, every echo noted; then the last echoes, and a close.
async fn drive_active(run: Arc<Run>, ws: Ws, index: usize, stop: watch::Receiver<bool>) {
    let (mut sink, mut stream) = ws.split();
    let record = &run.upgrade.active[index];
    let flow = Flow {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        writer_done: AtomicBool::new(false),
        wake_reader: Notify::new(),
        window: Semaphore::new(1),
    };
    // The reader saw the session end: nothing more is sent (a message
    // written after the close would count as lost).
    let ended = Notify::new();
    let writer = async {
        let mut stop = stop;
        let period = Duration::from_secs_f64(1.0 / run.args.rate);
        let offset = Duration::from_nanos(rand::random_range(0..period.as_nanos().max(1) as u64));
        let mut ticks = tokio::time::interval_at(Instant::now() + offset, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stopped| *stopped) => break,
                _ = ended.notified() => break,
            }
            if let Err(e) = sink.send(message(&run, seq, Instant::now())).await {
                run.stats.error(format!("send: {}", error_kind(&e)));
                break;
            }
            account_sent(&run, &flow);
            seq += 1;
            locked(record).sent = seq;
        }
        flow.writer_done.store(true, Ordering::Release);
        flow.wake_reader.notify_one();
    };
    let reader = async {
        let open = read_active(&run, &mut stream, &flow, record).await;
        if !open {
            ended.notify_one();
        }
        open
    };
    let (_, open) = tokio::join!(writer, reader);
    if open {
        close(&mut sink, &mut stream).await;
    }
}

/// Read an active session's echoes until the writer stopped and every
/// number is back, `--drain` after the stop, or the session ends. True
/// while it is open.
async fn read_active(
    run: &Run,
    stream: &mut SplitStream<Ws>,
    flow: &Flow,
    record: &Mutex<ActiveRecord>,
) -> bool {
    let stats = &run.stats;
    let mut distinct = 0u64;
    loop {
        let writer_done = flow.writer_done.load(Ordering::Acquire);
        if writer_done && distinct >= flow.sent.load(Ordering::Relaxed) {
            return true;
        }
        let deadline = match run.upgrade.stop_at.load(Ordering::Acquire) {
            0 if writer_done => Instant::now() + run.args.drain,
            0 => Instant::now() + MAX_DURATION,
            stop => epoch() + Duration::from_nanos(stop) + run.args.drain,
        };
        let (seq, stamp, len) = match next_echo(stats, stream, flow, deadline).await {
            Received::Echo {
                seq, stamp, len, ..
            } => (seq, stamp, len),
            Received::Other => continue,
            Received::Deadline => return true,
            Received::Ended(why) => {
                let now = nanos_since_epoch(Instant::now());
                locked(record).closed = Some((now, why));
                return false;
            }
        };
        let now = nanos_since_epoch(Instant::now());
        let mut r = locked(record);
        if seq >= r.sent {
            stats.error("bad echo: never sent");
            r.never_sent += 1;
            continue;
        }
        if len != run.args.size {
            stats.error("bad echo: wrong size");
        }
        stats.received.fetch_add(1, Ordering::Relaxed);
        stats
            .received_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        flow.received.fetch_add(1, Ordering::Relaxed);
        let i = seq as usize;
        if i >= r.counts.len() {
            r.counts.resize(i + 1, 0);
        }
        r.counts[i] = r.counts[i].saturating_add(1);
        let rtt = now.saturating_sub(stamp);
        r.echoes.push((now, rtt));
        if r.counts[i] == 1 {
            distinct += 1;
            if r.highest.is_some_and(|h| seq < h) {
                r.reordered += 1;
            }
            r.highest = Some(r.highest.map_or(seq, |h| h.max(seq)));
            stats.record(rtt);
        }
    }
}

/// Hold one idle session (answering pings) until the stop; note a close
/// or error seen before it.
async fn hold_idle(run: Arc<Run>, mut ws: Ws, mut stop: watch::Receiver<bool>) {
    let mut pinged = false;
    let ended = loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(frame))) => {
                    break Some(format!(
                        "closed by peer: {}",
                        frame.as_ref().map_or(1005, |f| u16::from(f.code))
                    ));
                }
                Some(Err(e)) => break Some(format!("receive: {}", error_kind(&e))),
                None => break Some("receive: connection ended".to_string()),
                Some(Ok(Message::Ping(_))) if !pinged => {
                    pinged = true;
                    locked(&run.upgrade.idle_first_pings).push(nanos_since_epoch(Instant::now()));
                }
                Some(Ok(_)) => {}
            },
            _ = stop.wait_for(|stopped| *stopped) => break None,
        }
    };
    if let Some(why) = ended {
        run.stats.closed_early.fetch_add(1, Ordering::Relaxed);
        run.stats.error(format!("idle session: {why}"));
        locked(&run.upgrade.idle_closes).push((nanos_since_epoch(Instant::now()), why));
        return;
    }
    let closing = async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
}

/// A new client every `--connect-every` until the stop, at most
/// [`MAX_NEW_CLIENTS_IN_FLIGHT`] at once.
async fn new_clients(run: Arc<Run>, mut stop: watch::Receiver<bool>) {
    let in_flight = Arc::new(Semaphore::new(MAX_NEW_CLIENTS_IN_FLIGHT));
    let mut ticks = tokio::time::interval(run.args.connect_every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut clients = tokio::task::JoinSet::new();
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            run.upgrade
                .new_clients_skipped
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let client = run.clone();
        let index = n;
        n += 1;
        clients.spawn(async move {
            let _permit = permit;
            new_client(&client, index).await;
        });
        while clients.try_join_next().is_some() {}
    }
    while clients.join_next().await.is_some() {}
}

/// Connect, upgrade, one echo, close; note the outcome.
async fn new_client(run: &Run, n: u64) {
    let started = Instant::now();
    let url = keyed_url(&run.target.url, &format!("new-{n}"));
    let index = run.args.connections + run.args.idle + n as usize;
    let (connect_ns, outcome) = match open_url(run, index, &url).await {
        Err(kind) => (None, Err(kind)),
        Ok(mut ws) => {
            let connect_ns = started.elapsed().as_nanos() as u64;
            (Some(connect_ns), one_echo(run, &mut ws).await)
        }
    };
    locked(&run.upgrade.new_clients).push(NewClient {
        start: nanos_since_epoch(started),
        connect_ns,
        outcome,
    });
}

/// Send message 0, wait for its echo, close; bounded by `--connect-timeout`.
async fn one_echo(run: &Run, ws: &mut Ws) -> Result<(), String> {
    let exchange = async {
        ws.send(message(run, 0, Instant::now()))
            .await
            .map_err(|e| format!("send: {}", error_kind(&e)))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!(
                        "closed by peer: {}",
                        frame.as_ref().map_or(1005, |f| u16::from(f.code))
                    ));
                }
                Some(Ok(msg)) => match parse_echo(&msg) {
                    Some((0, _, len)) if len == run.args.size => break,
                    Some(_) => return Err("bad echo".to_string()),
                    None => {}
                },
                Some(Err(e)) => return Err(format!("receive: {}", error_kind(&e))),
                None => return Err("receive: connection ended".to_string()),
            }
        }
        ws.close(None)
            .await
            .map_err(|e| format!("close: {}", error_kind(&e)))?;
        loop {
            match ws.next().await {
                Some(Ok(_)) => {}
                Some(Err(WsError::ConnectionClosed)) | None => return Ok(()),
                Some(Err(e)) => return Err(format!("close: {}", error_kind(&e))),
            }
        }
    };
    match tokio::time::timeout(run.args.connect_timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err("echo or close: timeout".to_string()),
    }
}

/// What a failed new client ran into, for the report.
fn failure_class(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("refused") {
        "refused"
    } else if e.contains("reset") || e.contains("connection ended") || e.contains("broken pipe") {
        "reset"
    } else if e.contains("timeout") || e.contains("timed out") {
        "timeout"
    } else if e.contains("closed by peer") {
        "closed"
    } else {
        "other"
    }
}

/// The first seconds after the signal, where the hand-over itself happens
/// (`echo_gap_ms.first_5s`), apart from whatever the old process's life
/// brings later.
const FIRST_SECONDS_NS: u64 = 5_000_000_000;

/// Echoes this long after the old process's exit still count as around the
/// upgrade (the new process may resume a session after the old one left).
const UPGRADE_ECHO_MARGIN_NS: u64 = 1_000_000_000;

/// Min, p50 and max of `times` as milliseconds after `origin` (negative:
/// before it).
fn offsets_ms(mut times: Vec<u64>, origin: u64) -> Value {
    if times.is_empty() || origin == 0 {
        return Value::Null;
    }
    times.sort_unstable();
    let ms = |t: u64| ((t as f64 - origin as f64) / 1e4).round() / 100.0;
    json!({
        "min": ms(times[0]),
        "p50": ms(times[(times.len() - 1) / 2]),
        "max": ms(times[times.len() - 1]),
    })
}

/// Nearest-rank percentiles of `values` (milliseconds), with the count.
fn spread_ms(mut values: Vec<u64>) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_unstable();
    let ms = |nanos: u64| (nanos as f64 / 1e4).round() / 100.0;
    let rank = |q: f64| {
        let i = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
        ms(values[i])
    };
    json!({
        "count": values.len(),
        "p50": rank(0.50),
        "p99": rank(0.99),
        "max": ms(values[values.len() - 1]),
    })
}

/// The upgrade part of the report.
fn upgrade_report(run: &Run) -> Value {
    let u = &run.upgrade;
    let load = |a: &AtomicU64| a.load(Ordering::Acquire);
    let now = nanos_since_epoch(Instant::now());
    let signal_at = load(&u.signal_at);
    let exit_at = load(&u.old_exit_at);
    let stop_at = load(&u.stop_at);
    let steady_from = load(&u.steady_from);
    let end = if stop_at != 0 { stop_at } else { now };
    // The upgrade: from the signal until the old process exited (or the
    // stop); for echoes, until a second after that (the new process may
    // resume a session after the old one is gone).
    let window_end = if exit_at != 0 { exit_at } else { end };
    let echo_window_end = (window_end + UPGRADE_ECHO_MARGIN_NS).min(end);
    let ms = |nanos: u64| (nanos as f64 / 1e4).round() / 100.0;
    let since_signal = |at: u64| {
        if signal_at != 0 && at != 0 {
            json!(ms(at.saturating_sub(signal_at)))
        } else {
            Value::Null
        }
    };
    let phase = |at: u64| {
        if signal_at == 0 || at < signal_at {
            "before"
        } else if at <= window_end {
            "during"
        } else {
            "after"
        }
    };

    // Active sessions.
    let (mut sent, mut echoes, mut lost, mut duplicated, mut extra) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut reordered, mut never_sent, mut with_loss, mut with_dup) = (0u64, 0u64, 0u64, 0u64);
    let mut lost_open = 0u64;
    let mut gaps_first = Vec::new();
    let mut gaps_during = Vec::new();
    let mut gap_starts = Vec::new();
    let mut gap_ends = Vec::new();
    let mut gaps_before = Vec::new();
    let mut rtt_during_max = Vec::new();
    let mut rtt_during = new_histogram();
    let mut rtt_before = new_histogram();
    let mut active_closes: BTreeMap<String, u64> = BTreeMap::new();
    let mut active_closes_by_phase: BTreeMap<&str, u64> = BTreeMap::new();
    let mut active_opened = 0u64;
    let mut silent_after_signal = 0u64;
    for record in &u.active {
        let r = locked(record);
        if !r.opened {
            continue;
        }
        active_opened += 1;
        sent += r.sent;
        echoes += r.echoes.len() as u64;
        let (mut l, mut d) = (0u64, 0u64);
        for seq in 0..r.sent as usize {
            match r.counts.get(seq).copied().unwrap_or(0) {
                0 => l += 1,
                1 => {}
                n => {
                    d += 1;
                    extra += u64::from(n) - 1;
                }
            }
        }
        lost += l;
        if r.closed.is_none() {
            lost_open += l;
        }
        duplicated += d;
        with_loss += u64::from(l > 0);
        with_dup += u64::from(d > 0);
        reordered += r.reordered;
        never_sent += r.never_sent;
        if let Some((at, why)) = &r.closed {
            *active_closes.entry(why.clone()).or_insert(0) += 1;
            *active_closes_by_phase.entry(phase(*at)).or_insert(0) += 1;
        }
        let (mut max_before, mut max_rtt) = (None::<u64>, None::<u64>);
        // The largest gap around the upgrade: (length, start, end).
        let mut max_during: Option<(u64, u64, u64)> = None;
        let mut max_first = None::<u64>;
        for pair in r.echoes.windows(2) {
            let (a, b) = (pair[0].0, pair[1].0);
            let gap = b.saturating_sub(a);
            if signal_at != 0 && b >= signal_at && a <= signal_at + FIRST_SECONDS_NS {
                max_first = Some(max_first.unwrap_or(0).max(gap));
            }
            if steady_from != 0 && a >= steady_from && (signal_at == 0 || b < signal_at) {
                max_before = Some(max_before.unwrap_or(0).max(gap));
            }
            if signal_at != 0
                && b >= signal_at
                && a <= echo_window_end
                && max_during.is_none_or(|m| gap > m.0)
            {
                max_during = Some((gap, a, b));
            }
        }
        // A session that went quiet and never echoed again: its gap runs
        // to the stop (or its close).
        if signal_at != 0 {
            let last = r.echoes.last().map_or(0, |e| e.0);
            if last <= echo_window_end {
                let until = r.closed.as_ref().map_or(end, |(at, _)| *at);
                let gap = until.saturating_sub(last);
                if max_during.is_none_or(|m| gap > m.0) {
                    max_during = Some((gap, last, until));
                }
                silent_after_signal += 1;
            }
        }
        if let Some((gap, a, b)) = max_during {
            gaps_during.push(gap);
            gap_starts.push(a);
            gap_ends.push(b);
        }
        for &(at, rtt) in &r.echoes {
            if signal_at != 0 && at >= signal_at && at <= echo_window_end {
                max_rtt = Some(max_rtt.unwrap_or(0).max(rtt));
                rtt_during.saturating_record(rtt.max(1));
            } else if steady_from != 0 && at >= steady_from && (signal_at == 0 || at < signal_at) {
                rtt_before.saturating_record(rtt.max(1));
            }
        }
        gaps_before.extend(max_before);
        gaps_first.extend(max_first);
        rtt_during_max.extend(max_rtt);
    }
    let percentiles = |h: &Histogram<u64>| {
        if h.is_empty() {
            Value::Null
        } else {
            json!({
                "count": h.len(),
                "p50": ms(h.value_at_quantile(0.50)),
                "p99": ms(h.value_at_quantile(0.99)),
                "p99_9": ms(h.value_at_quantile(0.999)),
                "max": ms(h.max()),
            })
        }
    };

    // Idle sessions.
    let idle_closes = locked(&u.idle_closes);
    let mut idle_reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut idle_by_phase: BTreeMap<&str, u64> = BTreeMap::new();
    for (at, why) in idle_closes.iter() {
        *idle_reasons.entry(why.clone()).or_insert(0) += 1;
        *idle_by_phase.entry(phase(*at)).or_insert(0) += 1;
    }

    // New clients.
    let clients = locked(&u.new_clients);
    let mut by_phase = serde_json::Map::new();
    let mut connect_during = Vec::new();
    let mut connect_outside = Vec::new();
    let (mut failed_total, mut failed_during) = (0u64, 0u64);
    for name in ["before", "during", "after"] {
        let mut attempted = 0u64;
        let mut ok = 0u64;
        let mut classes: BTreeMap<&str, u64> = BTreeMap::new();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for c in clients.iter().filter(|c| phase(c.start) == name) {
            attempted += 1;
            match &c.outcome {
                Ok(()) => ok += 1,
                Err(e) => {
                    *classes.entry(failure_class(e)).or_insert(0) += 1;
                    *errors.entry(e.clone()).or_insert(0) += 1;
                }
            }
            if let Some(ns) = c.connect_ns {
                if name == "during" {
                    connect_during.push(ns);
                } else {
                    connect_outside.push(ns);
                }
            }
        }
        failed_total += attempted - ok;
        if name == "during" {
            failed_during = attempted - ok;
        }
        by_phase.insert(
            name.to_string(),
            json!({
                "attempted": attempted,
                "ok": ok,
                "failed": attempted - ok,
                "refused": classes.get("refused").copied().unwrap_or(0),
                "reset": classes.get("reset").copied().unwrap_or(0),
                "timeout": classes.get("timeout").copied().unwrap_or(0),
                "closed": classes.get("closed").copied().unwrap_or(0),
                "other": classes.get("other").copied().unwrap_or(0),
                "errors": errors,
            }),
        );
    }

    // The two router processes.
    let memory = locked(&u.memory);
    let new_pid = load(&u.new_pid) as u32;
    let process = |pid: u32| {
        let mine: Vec<&MemorySample> = memory.iter().filter(|s| s.pid == pid).collect();
        if pid == 0 || mine.is_empty() {
            return Value::Null;
        }
        let before_signal = mine
            .iter()
            .rev()
            .find(|s| signal_at == 0 || s.at < signal_at)
            .map(|s| s.rss_kib);
        json!({
            "pid": pid,
            "samples": mine.len(),
            "rss_kib_before_signal": before_signal,
            "rss_kib_peak": mine.iter().map(|s| s.rss_kib).max(),
            "hwm_kib": mine.iter().map(|s| s.hwm_kib).max(),
            "rss_kib_last": mine.last().map(|s| s.rss_kib),
        })
    };
    let mut per_tick: BTreeMap<u64, u64> = BTreeMap::new();
    for s in memory.iter() {
        *per_tick.entry(s.tick).or_insert(0) += s.rss_kib;
    }
    let metrics = |m: &Mutex<Option<Result<String, String>>>| match &*locked(m) {
        None => Value::Null,
        Some(Ok(text)) => upgrade_metrics(text),
        Some(Err(e)) => json!({ "error": e }),
    };
    let idle_opened = load(&u.idle_opened);
    let idle_closed = idle_closes.len() as u64;
    let active_closed = active_closes.values().sum::<u64>();
    json!({
        "old_pid": u.old_pid,
        "new_pid": if new_pid == 0 { Value::Null } else { json!(new_pid) },
        "signalled": signal_at != 0,
        "signal_error": locked(&u.signal_error).clone(),
        "signal_command_ms": ms(load(&u.signal_command_ns)),
        "old_died_before_signal": u.old_died_before_signal.load(Ordering::Relaxed),
        "old_exited": exit_at != 0,
        "signal_to_new_pid_file_ms": since_signal(load(&u.new_pid_at)),
        "signal_to_old_exit_ms": since_signal(exit_at),
        "steady_to_signal_s": if signal_at != 0 && steady_from != 0 { json!(ms(signal_at - steady_from) / 1000.0) } else { Value::Null },
        "old_exit_to_stop_s": if exit_at != 0 && stop_at != 0 { json!(ms(stop_at.saturating_sub(exit_at)) / 1000.0) } else { Value::Null },
        "sessions": {
            "active": active_opened,
            "active_failed_to_open": load(&u.active_failed),
            "idle": idle_opened,
            "idle_failed_to_open": load(&u.idle_failed),
        },
        "closes": {
            "total": idle_closed + active_closed,
            "idle": idle_closed,
            "idle_survived": idle_opened - idle_closed,
            "idle_by_phase": idle_by_phase,
            "idle_reasons": idle_reasons,
            "idle_pinged": locked(&u.idle_first_pings).len(),
            "idle_first_ping_after_signal_ms": offsets_ms(locked(&u.idle_first_pings).clone(), signal_at),
            "active": active_closed,
            "active_by_phase": active_closes_by_phase,
            "active_reasons": active_closes,
        },
        "messages": {
            "sent": sent,
            "echoes": echoes,
            "lost": lost,
            "lost_in_open_sessions": lost_open,
            "sessions_with_loss": with_loss,
            "duplicated": duplicated,
            "extra_echoes": extra,
            "sessions_with_duplicates": with_dup,
            "reordered": reordered,
            "never_sent": never_sent,
        },
        "echo_gap_ms": {
            "period": ms((1e9 / run.args.rate) as u64),
            "during": spread_ms(gaps_during),
            "first_5s": spread_ms(gaps_first),
            "before": spread_ms(gaps_before),
            "during_starts_after_signal": offsets_ms(gap_starts, signal_at),
            "during_ends_after_signal": offsets_ms(gap_ends, signal_at),
            "sessions_without_echo_after_upgrade": silent_after_signal,
        },
        "round_trip_ms": {
            "per_session_max_during": spread_ms(rtt_during_max),
            "during": percentiles(&rtt_during),
            "before": percentiles(&rtt_before),
        },
        "new_clients": {
            "interval_ms": ms(run.args.connect_every.as_nanos() as u64),
            "attempted": clients.len(),
            "failed": failed_total,
            "failed_during_upgrade": failed_during,
            "skipped_ticks": load(&u.new_clients_skipped),
            "by_phase": by_phase,
            "connect_ms_during": spread_ms(connect_during),
            "connect_ms_outside": spread_ms(connect_outside),
        },
        "processes": {
            "sample_interval_ms": run.args.sample_interval.as_millis() as u64,
            "old": process(u.old_pid),
            "new": process(new_pid),
            "rss_kib_both_peak": per_tick.values().max(),
        },
        "router_before_signal": metrics(&u.metrics_before),
        "router_early": metrics(&u.metrics_early),
        "router_after_exit": metrics(&u.metrics_after),
    })
}

// ---------------------------------------------------------------------------
// report

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn report(run: &Run, status: &str, timing: &Timing, elapsed: Duration) -> Value {
    let args = &run.args;
    let stats = &run.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let histogram = stats.histogram.lock().unwrap_or_else(|e| e.into_inner());
    let us = |nanos: u64| round1(nanos as f64 / 1000.0);
    let percentiles = |h: &Histogram<u64>| {
        if h.is_empty() {
            Value::Null
        } else {
            json!({
                "count": h.len(),
                "min": us(h.min()),
                "mean": round1(h.mean() / 1000.0),
                "p50": us(h.value_at_quantile(0.50)),
                "p90": us(h.value_at_quantile(0.90)),
                "p99": us(h.value_at_quantile(0.99)),
                "p99_9": us(h.value_at_quantile(0.999)),
                "max": us(h.max()),
            })
        }
    };
    let latency = percentiles(&histogram);
    let send_lag = percentiles(&stats.send_lag.lock().unwrap_or_else(|e| e.into_inner()));
    let errors: BTreeMap<String, u64> = stats
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let error_total: u64 = errors.values().sum();
    let window = timing.measured_s.unwrap_or(0.0);
    let per_s = |n: u64| {
        if window > 0.0 {
            round1(n as f64 / window)
        } else {
            0.0
        }
    };
    let mib_per_s = if window > 0.0 {
        (load(&stats.measured_bytes) as f64 / (1024.0 * 1024.0) / window * 1000.0).round() / 1000.0
    } else {
        0.0
    };
    let sent = load(&stats.sent);
    let received = load(&stats.received);
    let mut params = json!({
        "connections": args.connections,
        "size": args.size,
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "connect_concurrency": args.connect_concurrency,
        "text": args.text,
        "threads": args.threads,
        "source_addrs": run.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    });
    match args.mode {
        Mode::Latency => params["rate"] = json!(args.rate),
        Mode::Throughput => params["window"] = json!(args.window),
        Mode::Failover => {
            params["rate"] = json!(args.rate);
            params["kill_after_s"] = json!(args.kill_after.as_secs_f64());
            params["drain_s"] = json!(args.drain.as_secs_f64());
            if let Some(p) = params.as_object_mut() {
                p.remove("warmup_s");
            }
        }
        Mode::Upgrade => {
            params["rate"] = json!(args.rate);
            params["idle"] = json!(args.idle);
            params["connect_every_ms"] = json!(args.connect_every.as_secs_f64() * 1000.0);
            params["batch"] = json!(args.batch);
            params["batch_interval_ms"] = json!(args.batch_interval.as_millis() as u64);
            params["steady_s"] = json!(args.steady.as_secs_f64());
            params["after_exit_s"] = json!(args.after_exit.as_secs_f64());
            params["drain_s"] = json!(args.drain.as_secs_f64());
            params["sample_interval_ms"] = json!(args.sample_interval.as_millis() as u64);
            if let Some(p) = params.as_object_mut() {
                for key in ["duration_s", "warmup_s"] {
                    p.remove(key);
                }
            }
        }
        Mode::Idle => {
            if let Some(p) = params.as_object_mut() {
                for key in ["size", "warmup_s", "text"] {
                    p.remove(key);
                }
            }
        }
        Mode::Churn => {
            params = json!({
                "cycles": args.cycles,
                "concurrency": args.concurrency,
                "threads": args.threads,
                "source_addrs": run.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            });
        }
    }
    let mut rates = json!({});
    match args.mode {
        Mode::Latency | Mode::Throughput => {
            rates["messages_per_s"] = json!(per_s(load(&stats.measured)));
            rates["mib_per_s"] = json!(mib_per_s);
        }
        Mode::Idle | Mode::Failover | Mode::Upgrade => {
            if let Some(c) = timing.connect_s.filter(|c| *c > 0.0) {
                rates["connects_per_s"] = json!(round1(load(&stats.opened) as f64 / c));
            }
        }
        Mode::Churn => {
            rates["upgrades_per_s"] = json!(per_s(load(&stats.completed_cycles)));
        }
    }
    json!({
        "tool": "wsrouter-loadgen",
        "mode": args.mode.name(),
        "label": args.label,
        "url": run.target.url,
        "status": status,
        "params": params,
        "connections": {
            "attempted": load(&stats.attempted),
            "opened": load(&stats.opened),
            "failed": load(&stats.failed),
            "closed_early": load(&stats.closed_early),
        },
        "messages": {
            "sent": sent,
            "received": received,
            "measured": load(&stats.measured),
            // Failover: sequence numbers never echoed (duplicates would hide them here).
            "lost": if args.mode == Mode::Failover {
                run.failover.totals.lock().unwrap_or_else(|e| e.into_inner()).lost
            } else if args.mode == Mode::Upgrade {
                run.upgrade.lost()
            } else {
                sent.saturating_sub(received)
            },
            "sent_bytes": load(&stats.sent_bytes),
            "received_bytes": load(&stats.received_bytes),
        },
        "cycles_completed": if args.mode == Mode::Churn { json!(load(&stats.completed_cycles)) } else { Value::Null },
        "errors": errors,
        "error_total": error_total,
        "latency_of": match args.mode {
            Mode::Latency | Mode::Throughput => json!("echo_round_trip"),
            Mode::Churn => json!("connect_and_upgrade"),
            Mode::Failover => json!("echo_round_trip_first_echoes"),
            Mode::Upgrade => json!("echo_round_trip_active_sessions"),
            Mode::Idle => Value::Null,
        },
        "failover": if args.mode == Mode::Failover { failover_report(run) } else { Value::Null },
        "upgrade": if args.mode == Mode::Upgrade { upgrade_report(run) } else { Value::Null },
        "latency_us": latency,
        "send_lag_us": send_lag,
        "rates": rates,
        "connect_s": timing.connect_s.map(|c| (c * 1000.0).round() / 1000.0),
        "measured_s": timing.measured_s.map(|m| (m * 1000.0).round() / 1000.0),
        "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
    })
}
