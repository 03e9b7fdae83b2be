//! WebSocket load generator for wsrouter's benchmarks (see BENCHMARKS.md).
//!
//! ```text
//! cargo run --release -p wsrouter-bench --bin loadgen -- latency    --url ws://127.0.0.1:18080/chat -c 100 --rate 100 --size 64 --duration 10s
//! cargo run --release -p wsrouter-bench --bin loadgen -- throughput --url ws://127.0.0.1:18080/chat -c 50 --window 16 --size 64 --duration 10s
//! cargo run --release -p wsrouter-bench --bin loadgen -- idle       --url ws://127.0.0.1:18080/chat -c 8000 --duration 10s
//! cargo run --release -p wsrouter-bench --bin loadgen -- churn      --url ws://127.0.0.1:18080/chat --cycles 5000 --concurrency 100
//! cargo run --release -p wsrouter-bench --bin loadgen -- failover   --url ws://127.0.0.1:18180/chat -c 8000 --rate 2 --duration 25s --kill-after 10s --kill-pid PID --watch-pid ROUTER_PID
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
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Latency => "latency",
            Mode::Throughput => "throughput",
            Mode::Idle => "idle",
            Mode::Churn => "churn",
            Mode::Failover => "failover",
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
    /// Connections (latency, throughput, idle).
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
    /// Failover: how often the watched process is sampled.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    sample_interval: Duration,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
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
    Ok(Run {
        args,
        target,
        ws_config,
        sources,
        stats: Stats::new(),
        filler,
        failover: FailoverState::new(),
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
    }
}

/// TCP connect (from the chosen source address) and WebSocket upgrade.
async fn open(run: &Run, index: usize) -> Result<Ws, String> {
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
        let (ws, _response) = tokio_tungstenite::client_async_with_config(
            run.target.url.as_str(),
            stream,
            Some(run.ws_config),
        )
        .await
        .map_err(|e| match e {
            WsError::Http(response) => format!("upgrade refused: HTTP {}", response.status()),
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
    /// The connection failed or was closed (counted as closed early).
    Ended,
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
            stats.error(format!("receive: {}", error_kind(&e)));
            stats.closed_early.fetch_add(1, Ordering::Relaxed);
            return Received::Ended;
        }
        None => {
            stats.error("receive: connection ended");
            stats.closed_early.fetch_add(1, Ordering::Relaxed);
            return Received::Ended;
        }
    };
    if let Message::Close(frame) = &msg {
        let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
        stats.error(format!("closed by peer: {code}"));
        stats.closed_early.fetch_add(1, Ordering::Relaxed);
        return Received::Ended;
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
            Received::Ended => return false,
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
    let helper = spawn_killer(run.args.kill_pid.unwrap_or(0));
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

/// A shell, started ahead of time, that sends SIGKILL to `pid` once a line
/// arrives on its stdin (its `kill` is a builtin). Nothing has to be forked
/// at the moment of the kill, which on a busy machine takes hundreds of
/// milliseconds. If the load generator ends first, the pipe closes, `read`
/// fails and nothing is killed.
fn spawn_killer(pid: u32) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg("read go && kill -KILL \"$1\"")
        .arg("sh")
        .arg(pid.to_string())
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// SIGKILL the backend at `at` through the helper. The kill instant is
/// taken just before the helper is told, so recovery times include its
/// wake-up (they err long, never short); how long it took until the helper
/// exited is reported as `kill_command_ms`.
async fn kill_backend(run: Arc<Run>, at: Instant, helper: std::io::Result<tokio::process::Child>) {
    let Some(pid) = run.args.kill_pid else { return };
    let error = match helper {
        Err(e) => Some(format!("cannot start the kill helper: {e}")),
        Ok(mut helper) => {
            tokio::time::sleep_until(at).await;
            let issued = Instant::now();
            run.failover
                .killed_at
                .store(nanos_since_epoch(issued), Ordering::Release);
            let told = match helper.stdin.take() {
                Some(mut stdin) => stdin.write_all(b"go\n").await,
                None => Err(std::io::ErrorKind::BrokenPipe.into()),
            };
            let status = helper.wait().await;
            run.failover
                .kill_command_ns
                .store(issued.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match (told, status) {
                (Ok(()), Ok(s)) if s.success() => None,
                (Ok(()), Ok(s)) => Some(format!("kill -KILL {pid} exited with {s}")),
                (Err(e), _) | (_, Err(e)) => Some(format!("kill helper: {e}")),
            }
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
            Received::Ended => {
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
        Mode::Idle | Mode::Failover => {
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
            Mode::Idle => Value::Null,
        },
        "failover": if args.mode == Mode::Failover { failover_report(run) } else { Value::Null },
        "latency_us": latency,
        "send_lag_us": send_lag,
        "rates": rates,
        "connect_s": timing.connect_s.map(|c| (c * 1000.0).round() / 1000.0),
        "measured_s": timing.measured_s.map(|m| (m * 1000.0).round() / 1000.0),
        "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
    })
}
