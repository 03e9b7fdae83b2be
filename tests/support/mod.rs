//! Test harness shared by the integration tests: real WebSocket backends,
//! in-process routers, clients, and bounded waiting.
//!
//! Everything listens on `127.0.0.1:0`, so tests run in parallel without
//! fixed ports. A [`TestBackend`] is a small WebSocket server that greets each
//! session with what it was sent (so a test sees what the router forwarded),
//! echoes, closes on request and records the closes it receives; it answers
//! health checks on the same port. [`RouterBuilder`] writes a TOML file's worth
//! of configuration, validates it with `Config::from_toml` and runs
//! `wsrouter::run` on ephemeral listeners. Nothing here sleeps to wait for
//! something: [`eventually`] polls a condition under a generous bound.
//!
//! This is a folder module (`tests/support/mod.rs`) so cargo does not build it
//! as a test binary of its own; every test file has `mod support;`, and each
//! uses only part of it.
#![allow(dead_code)]

pub mod socketio;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The bound on every wait in these tests: long, because the machine that
/// runs them may be slow and busy; a passing test never waits this long.
pub const WAIT: Duration = Duration::from_secs(15);

/// Install a tracing subscriber for the current test (thread-local, so the
/// output of parallel tests does not mix). `#[tokio::test]` runs the router,
/// backends and client on the test's thread, so everything they log is
/// captured with the test. `RUST_LOG` overrides the default filter.
pub fn trace_init() -> tracing::subscriber::DefaultGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("wsrouter=debug"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_default(subscriber)
}

/// Poll `condition` every 50 ms until it holds; panic naming `what` when it
/// still does not after `timeout`.
pub async fn eventually<F>(what: &str, timeout: Duration, mut condition: F)
where
    F: AsyncFnMut() -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Await `future`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// The crate's directory; relative paths in test configs resolve against it.
pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The default GeoIP database (City schema, with coordinates).
pub const CITY_DB: &str = "geoip/GeoLite2-City-Test.mmdb";
/// A Country-schema database: country and continent, no coordinates.
pub const COUNTRY_DB: &str = "tests/data/GeoLite2-Country-Test.mmdb";

/// Addresses the test databases know (see the GeoIP fixture README).
pub const LONDON: &str = "81.2.69.142"; // GB, EU
pub const MILTON_US: &str = "216.160.83.56"; // US, NA
pub const JAPAN: &str = "2001:218::1"; // JP, AS
pub const NOT_IN_DB: &str = "1.1.1.1";

// === test backend ===

/// A refusal a backend answers upgrades with, instead of 101.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub set_cookie: Option<String>,
    pub body: String,
}

/// How a [`TestBackend`] behaves; `Default` is a plain healthy echo server.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Answer every upgrade with this instead of 101.
    pub refuse: Option<Refusal>,
    /// Pick this subprotocol when the client offers it.
    pub subprotocol: Option<String>,
    /// A Set-Cookie header on the 101.
    pub set_cookie: Option<String>,
    /// Wait this long before answering an upgrade (a slow backend).
    pub upgrade_delay: Option<Duration>,
    /// Wait this long after each message before reading the next (a
    /// backend that reads slower than its clients send).
    pub read_delay: Option<Duration>,
    /// Acknowledge client messages (`X-Wsrouter-Ack: pong` on the 101, a
    /// `wsrouter-ack N` pong after handling each message), or misbehave.
    pub acks: Acks,
}

/// How a [`TestBackend`] acknowledges client messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Acks {
    /// It does not (no header, no acknowledgements).
    #[default]
    None,
    /// After handling each message: the count handled on the connection.
    Each,
    /// Opted in, but its acknowledgements carry no number.
    Malformed,
    /// Opted in, acknowledges, then goes back one.
    Decreasing,
}

/// What a backend's connection tasks share with the test.
struct BackendShared {
    id: String,
    options: BackendOptions,
    /// Status answered on `GET /healthz`; the test changes it at run time.
    health: AtomicU16,
    /// Requests that were not health checks (upgrades or anything else).
    requests: AtomicUsize,
    /// Health check requests answered.
    health_checks: AtomicUsize,
    /// WebSocket sessions accepted (101 sent).
    sessions: AtomicUsize,
    /// Close frames clients sent to this backend: (code, reason); 1005 when
    /// the frame had no code.
    closes: parking_lot::Mutex<Vec<(u16, String)>>,
    /// Every text message received, in arrival order per session; with the
    /// session key (X-Wsrouter-Session) it came under.
    received: parking_lot::Mutex<Vec<(String, String)>>,
    /// Binary messages received: (session key, length, first byte).
    received_binary: parking_lot::Mutex<Vec<(String, usize, u8)>>,
    /// Payloads of the pings received (all sessions).
    pings: parking_lot::Mutex<Vec<Vec<u8>>>,
    /// Announcements sent: (session key, text), in order.
    announced: parking_lot::Mutex<Vec<(String, String)>>,
    /// [`TestBackend::close_all`] sends (code, reason) to every session.
    closer: tokio::sync::broadcast::Sender<(u16, String)>,
    /// [`TestBackend::announce`] sends a text to every session.
    announcer: tokio::sync::broadcast::Sender<String>,
}

/// A WebSocket backend on an ephemeral loopback port. On each session it
/// sends a JSON welcome `{"backend", "headers", "path"}` with every request
/// header (names lower-cased, repeated headers joined with ", "), then
/// echoes text and binary messages. A text `close:CODE:reason` makes it close
/// the session with that code and reason (it is recorded as received too).
/// `GET /healthz` on the same port answers the current health status.
/// Dropping it stops it: the listener closes and its sessions are cut.
pub struct TestBackend {
    pub id: String,
    pub addr: SocketAddr,
    shared: Arc<BackendShared>,
    task: JoinHandle<()>,
}

impl TestBackend {
    /// A healthy echo backend.
    pub async fn start(id: &str) -> TestBackend {
        TestBackend::start_with(id, BackendOptions::default()).await
    }

    pub async fn start_with(id: &str, options: BackendOptions) -> TestBackend {
        TestBackend::start_on(id, options, "127.0.0.1:0".parse().expect("address")).await
    }

    /// Start on a given address: `restart` a stopped backend on its port.
    pub async fn start_on(id: &str, options: BackendOptions, addr: SocketAddr) -> TestBackend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let shared = Arc::new(BackendShared {
            id: id.to_string(),
            options,
            health: AtomicU16::new(200),
            requests: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            closes: parking_lot::Mutex::new(Vec::new()),
            received: parking_lot::Mutex::new(Vec::new()),
            received_binary: parking_lot::Mutex::new(Vec::new()),
            pings: parking_lot::Mutex::new(Vec::new()),
            announced: parking_lot::Mutex::new(Vec::new()),
            closer: tokio::sync::broadcast::channel(4).0,
            announcer: tokio::sync::broadcast::channel(16).0,
        });
        let task_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // Connection tasks live in this set, so aborting the accept task
            // (drop/stop) cuts them too.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                connections.spawn(serve_backend_connection(stream, Arc::clone(&task_shared)));
            }
        });
        TestBackend {
            id: id.to_string(),
            addr,
            shared,
            task,
        }
    }

    /// The URL to put in a router config.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Change the status `GET /healthz` answers from now on.
    pub fn set_health(&self, status: u16) {
        self.shared.health.store(status, Ordering::SeqCst);
    }

    /// Requests other than health checks that reached this backend.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Health check requests this backend answered.
    pub fn health_checks(&self) -> usize {
        self.shared.health_checks.load(Ordering::SeqCst)
    }

    /// WebSocket sessions this backend accepted.
    pub fn sessions(&self) -> usize {
        self.shared.sessions.load(Ordering::SeqCst)
    }

    /// Close frames received from the router, in order.
    pub fn closes(&self) -> Vec<(u16, String)> {
        self.shared.closes.lock().clone()
    }

    /// Stop listening and cut every session.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Text messages received: (session key, text), in arrival order.
    pub fn received(&self) -> Vec<(String, String)> {
        self.shared.received.lock().clone()
    }

    /// Payloads of the pings received, from every session.
    pub fn pings(&self) -> Vec<Vec<u8>> {
        self.shared.pings.lock().clone()
    }

    /// Binary messages received: (session key, length, first byte).
    pub fn received_binary(&self) -> Vec<(String, usize, u8)> {
        self.shared.received_binary.lock().clone()
    }

    /// Close every open session with this code and reason (a backend that
    /// restarts or sheds load says so with 1012 or 1013).
    pub fn close_all(&self, code: u16, reason: &str) {
        let _ = self.shared.closer.send((code, reason.to_string()));
    }

    /// Announcements sent to sessions: (session key, text), in order.
    pub fn announced(&self) -> Vec<(String, String)> {
        self.shared.announced.lock().clone()
    }

    /// Send `text` to every session, as a chat server's broadcast.
    pub fn announce(&self, text: &str) {
        let _ = self.shared.announcer.send(text.to_string());
    }

    /// Come back on the same port (after [`TestBackend::stop`]), empty.
    pub async fn restart(&self) -> TestBackend {
        TestBackend::start_on(&self.id, self.shared.options.clone(), self.addr).await
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request head as the backend saw it.
struct Head {
    method: String,
    target: String,
    /// Lower-cased names, in order.
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Read one request head; returns it and whatever came after it.
async fn read_head(stream: &mut TcpStream) -> Option<(Head, Vec<u8>)> {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf).ok()? {
            httparse::Status::Partial if buf.len() < 64 * 1024 => continue,
            httparse::Status::Partial => return None,
            httparse::Status::Complete(len) => {
                let head = Head {
                    method: request.method.unwrap_or_default().to_string(),
                    target: request.path.unwrap_or_default().to_string(),
                    headers: request
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                return Some((head, buf.split_off(len)));
            }
        }
    }
}

async fn serve_backend_connection(mut stream: TcpStream, shared: Arc<BackendShared>) {
    let Some((head, leftover)) = read_head(&mut stream).await else {
        return;
    };
    let is_upgrade = head
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));

    if head.method == "GET" && !is_upgrade && head.target.split('?').next() == Some("/healthz") {
        shared.health_checks.fetch_add(1, Ordering::SeqCst);
        let status = shared.health.load(Ordering::SeqCst);
        let answer =
            format!("HTTP/1.1 {status} Health\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    }
    shared.requests.fetch_add(1, Ordering::SeqCst);

    if let Some(refusal) = &shared.options.refuse {
        let mut answer = format!("HTTP/1.1 {} Refused\r\n", refusal.status);
        if let Some(cookie) = &refusal.set_cookie {
            answer.push_str(&format!("Set-Cookie: {cookie}\r\n"));
        }
        answer.push_str(&format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            refusal.body.len(),
            refusal.body
        ));
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    }
    let Some(key) = head.header("sec-websocket-key").filter(|_| is_upgrade) else {
        let _ = stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };

    if let Some(delay) = shared.options.upgrade_delay {
        tokio::time::sleep(delay).await;
    }
    let mut answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.trim().as_bytes())
    );
    if let Some(protocol) = &shared.options.subprotocol {
        let offered = head
            .header("sec-websocket-protocol")
            .is_some_and(|list| list.split(',').any(|p| p.trim() == protocol));
        if offered {
            answer.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
        }
    }
    if let Some(cookie) = &shared.options.set_cookie {
        answer.push_str(&format!("Set-Cookie: {cookie}\r\n"));
    }
    if shared.options.acks != Acks::None {
        answer.push_str("X-Wsrouter-Ack: pong\r\n");
    }
    answer.push_str("\r\n");
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    shared.sessions.fetch_add(1, Ordering::SeqCst);
    let mut ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, None).await;

    let mut headers: HashMap<String, String> = HashMap::new();
    for (name, value) in &head.headers {
        headers
            .entry(name.clone())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(value);
            })
            .or_insert_with(|| value.clone());
    }
    let welcome = serde_json::json!({
        "backend": shared.id,
        "headers": headers,
        "path": head.target,
    });
    if ws.send(Message::text(welcome.to_string())).await.is_err() {
        return;
    }

    let session = head
        .header("x-wsrouter-session")
        .unwrap_or_default()
        .to_string();
    let mut closing = false;
    // Client messages handled on this connection (for acknowledgements).
    let mut handled: u64 = 0;
    let mut close_all = shared.closer.subscribe();
    let mut announcements = shared.announcer.subscribe();
    loop {
        let message = tokio::select! {
            Ok(text) = announcements.recv(), if !closing => {
                if ws.send(Message::text(text.clone())).await.is_err() {
                    break;
                }
                shared.announced.lock().push((session.clone(), text));
                continue;
            }
            message = ws.next() => match message {
                Some(message) => message,
                None => break,
            },
            Ok((code, reason)) = close_all.recv(), if !closing => {
                closing = true;
                let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                if ws.close(Some(frame)).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let is_data = matches!(message, Ok(Message::Text(_) | Message::Binary(_)));
        if let Some(delay) = shared.options.read_delay
            && is_data
        {
            tokio::time::sleep(delay).await;
        }
        let result = match message {
            Ok(Message::Text(text)) if !text.as_str().starts_with("close:") => {
                shared
                    .received
                    .lock()
                    .push((session.clone(), text.as_str().to_string()));
                ws.send(Message::Text(text)).await
            }
            Ok(Message::Binary(data)) => {
                let first = data.first().copied().unwrap_or(0);
                shared
                    .received_binary
                    .lock()
                    .push((session.clone(), data.len(), first));
                ws.send(Message::Binary(data)).await
            }
            Ok(Message::Text(text)) => match text.as_str().strip_prefix("close:") {
                Some(rest) => {
                    shared
                        .received
                        .lock()
                        .push((session.clone(), text.as_str().to_string()));
                    let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
                    let code: u16 = code.parse().expect("close:CODE:reason with a numeric code");
                    closing = true;
                    ws.close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.to_string().into(),
                    }))
                    .await
                }
                None => ws.send(Message::Text(text)).await,
            },
            Ok(Message::Close(frame)) => {
                // The answer to our own close is not a close the client sent.
                if !closing {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    shared.closes.lock().push((code, reason));
                }
                Ok(())
            }
            // tungstenite answers pings itself; they are noted.
            Ok(Message::Ping(payload)) => {
                shared.pings.lock().push(payload.to_vec());
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(_) => break,
        };
        if result.is_err() {
            break;
        }
        // Handled (logged and echoed): acknowledged, as the backend is set to.
        if is_data && !closing {
            handled += 1;
            let ack = match shared.options.acks {
                Acks::None => None,
                Acks::Each => Some(format!("wsrouter-ack {handled}")),
                Acks::Malformed => Some("wsrouter-ack many".to_string()),
                Acks::Decreasing => Some(format!("wsrouter-ack {}", handled.min(3) % 3)),
            };
            if let Some(ack) = ack
                && ws
                    .send(Message::Pong(ack.into_bytes().into()))
                    .await
                    .is_err()
            {
                break;
            }
        }
    }
}

/// A loopback port that refuses connections: a socket is bound to it but
/// never listens. Holding the binding keeps any other test from being given
/// the port while this one relies on it being dead.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ClosedPort {
    /// A backend URL nothing answers at.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
}

pub fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let port = socket.local_addr().expect("address").port();
    ClosedPort {
        _socket: socket,
        port,
    }
}

// === router ===

/// One `[[backends]]` entry.
#[derive(Debug, Clone)]
pub struct BackendEntry {
    pub id: String,
    pub url: String,
    pub region: String,
    pub weight: Option<u32>,
    pub max_sessions: Option<u32>,
}

/// Writes a router configuration and starts the router. Defaults: regions
/// eu (Frankfurt), us (Virginia), ap (Singapore), default region eu, the City
/// test database, listener path `/chat`, session key from `?session=`, no
/// trusted proxies, and health checks too slow to flip during a test (the
/// first probe still runs at start); [`RouterBuilder::fast_health_checks`]
/// turns them up for tests about health.
#[derive(Debug, Clone)]
pub struct RouterBuilder {
    pub regions: Vec<(String, f64, f64)>,
    pub default_region: String,
    pub backends: Vec<BackendEntry>,
    pub trusted_proxies: Vec<String>,
    pub geoip: String,
    pub countries: Vec<(String, Vec<String>)>,
    pub handshake_timeout: String,
    pub health_interval: String,
    pub health_timeout: String,
    pub rise: u32,
    pub fall: u32,
    /// `[listener] proxy_protocol_from`: peers that send PROXY headers.
    pub proxy_protocol_from: Vec<String>,
    /// `[shutdown] grace_period`; "0s" so stopping a test router is quick.
    pub shutdown_grace: String,
    /// Whole TOML sections appended as they are (e.g. `[migration]`).
    pub extra: String,
    /// `[admin] token`: mutating admin calls need it as a bearer token.
    pub admin_token: Option<String>,
    /// `[steering] max_concurrent_dials`, when set.
    pub max_concurrent_dials: Option<u32>,
    /// Bind the public listener plainly (no `SO_REUSEPORT`), as a caller of
    /// the library might: the session threads then share it.
    pub plain_public_listener: bool,
}

/// One echo backend per region of [`router`]: `eu-1`, `us-1`, `ap-1`.
pub async fn three_regions() -> (TestBackend, TestBackend, TestBackend) {
    (
        TestBackend::start("eu-1").await,
        TestBackend::start("us-1").await,
        TestBackend::start("ap-1").await,
    )
}

/// A router configuration with the defaults described at [`RouterBuilder`].
pub fn router() -> RouterBuilder {
    RouterBuilder {
        regions: vec![
            ("eu".into(), 50.11, 8.68),
            ("us".into(), 38.9, -77.0),
            ("ap".into(), 1.35, 103.8),
        ],
        default_region: "eu".into(),
        backends: Vec::new(),
        trusted_proxies: Vec::new(),
        geoip: CITY_DB.into(),
        countries: Vec::new(),
        handshake_timeout: "10s".into(),
        health_interval: "60s".into(),
        health_timeout: "5s".into(),
        rise: 2,
        fall: 3,
        shutdown_grace: "0s".into(),
        proxy_protocol_from: Vec::new(),
        extra: String::new(),
        admin_token: None,
        max_concurrent_dials: None,
        plain_public_listener: false,
    }
}

impl RouterBuilder {
    pub fn default_region(mut self, region: &str) -> Self {
        self.default_region = region.into();
        self
    }

    /// Replace the regions: (name, latitude, longitude).
    pub fn regions(mut self, regions: &[(&str, f64, f64)]) -> Self {
        self.regions = regions
            .iter()
            .map(|&(n, lat, lon)| (n.to_string(), lat, lon))
            .collect();
        self
    }

    /// A backend with default weight and session cap.
    pub fn backend(self, backend: &TestBackend, region: &str) -> Self {
        let url = backend.url();
        self.backend_entry(&backend.id, &url, region, None, None)
    }

    /// `eu`, `us` and `ap` each get one backend (see [`three_regions`]).
    pub fn one_per_region(self, eu: &TestBackend, us: &TestBackend, ap: &TestBackend) -> Self {
        self.backend(eu, "eu").backend(us, "us").backend(ap, "ap")
    }

    pub fn weighted(self, backend: &TestBackend, region: &str, weight: u32) -> Self {
        let url = backend.url();
        self.backend_entry(&backend.id, &url, region, Some(weight), None)
    }

    /// Any `[[backends]]` entry, including ones no [`TestBackend`] serves.
    pub fn backend_entry(
        mut self,
        id: &str,
        url: &str,
        region: &str,
        weight: Option<u32>,
        max_sessions: Option<u32>,
    ) -> Self {
        self.backends.push(BackendEntry {
            id: id.into(),
            url: url.into(),
            region: region.into(),
            weight,
            max_sessions,
        });
        self
    }

    pub fn trust(mut self, cidr: &str) -> Self {
        self.trusted_proxies.push(cidr.into());
        self
    }

    pub fn geoip(mut self, path: &str) -> Self {
        self.geoip = path.into();
        self
    }

    /// `[steering.countries] CODE = [regions...]`.
    pub fn country(mut self, code: &str, regions: &[&str]) -> Self {
        self.countries
            .push((code.into(), regions.iter().map(|r| r.to_string()).collect()));
        self
    }

    /// Append whole TOML sections, e.g. `"[migration]\ntimeout = \"2s\"\n"`.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Expect PROXY protocol headers from these peers.
    pub fn proxy_protocol_from(mut self, cidr: &str) -> Self {
        self.proxy_protocol_from.push(cidr.into());
        self
    }

    pub fn shutdown_grace(mut self, grace: &str) -> Self {
        self.shutdown_grace = grace.into();
        self
    }

    pub fn handshake_timeout(mut self, timeout: &str) -> Self {
        self.handshake_timeout = timeout.into();
        self
    }

    /// Consecutive check results that bring a backend back / take it out.
    pub fn rise_fall(mut self, rise: u32, fall: u32) -> Self {
        self.rise = rise;
        self.fall = fall;
        self
    }

    /// Health checks every 500 ms (timeout 500 ms); two results in a row
    /// flip a backend. Generous for loopback, so a busy machine does not flap.
    pub fn fast_health_checks(mut self) -> Self {
        self.health_interval = "500ms".into();
        self.health_timeout = "500ms".into();
        self.rise = 2;
        self.fall = 2;
        self
    }

    /// The configuration file's text.
    pub fn toml(&self) -> String {
        let q = |s: &str| format!("{s:?}");
        let list = |items: &[String]| items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
        let mut out = String::new();
        out.push_str(&format!(
            "[listener]\npublic = \"127.0.0.1:0\"\npaths = [\"/chat\"]\nhandshake_timeout = {}\nproxy_protocol_from = [{}]\n\n",
            q(&self.handshake_timeout),
            list(&self.proxy_protocol_from)
        ));
        out.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n");
        if let Some(token) = &self.admin_token {
            out.push_str(&format!("token = {}\n", q(token)));
        }
        out.push('\n');
        out.push_str(&format!(
            "[client_address]\ntrusted_proxies = [{}]\n\n",
            list(&self.trusted_proxies)
        ));
        out.push_str(&format!("[geoip]\ndatabase = {}\n\n", q(&self.geoip)));
        out.push_str("[session_key]\nsource = \"query\"\nname = \"session\"\n\n");
        out.push_str(&format!(
            "[steering]\ndefault_region = {}\ndial_timeout = \"5s\"\n",
            q(&self.default_region)
        ));
        if let Some(dials) = self.max_concurrent_dials {
            out.push_str(&format!("max_concurrent_dials = {dials}\n"));
        }
        out.push('\n');
        if !self.countries.is_empty() {
            out.push_str("[steering.countries]\n");
            for (code, regions) in &self.countries {
                out.push_str(&format!("{code} = [{}]\n", list(regions)));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "[health_check]\npath = \"/healthz\"\ninterval = {}\ntimeout = {}\nrise = {}\nfall = {}\n\n",
            q(&self.health_interval),
            q(&self.health_timeout),
            self.rise,
            self.fall
        ));
        out.push_str(&format!(
            "[shutdown]\ngrace_period = {}\n\n",
            q(&self.shutdown_grace)
        ));
        out.push_str(&self.extra);
        out.push('\n');
        for (name, lat, lon) in &self.regions {
            out.push_str(&format!(
                "[[regions]]\nname = {}\nlatitude = {lat}\nlongitude = {lon}\n\n",
                q(name)
            ));
        }
        for b in &self.backends {
            out.push_str(&format!(
                "[[backends]]\nid = {}\nurl = {}\nregion = {}\n",
                q(&b.id),
                q(&b.url),
                q(&b.region)
            ));
            if let Some(weight) = b.weight {
                out.push_str(&format!("weight = {weight}\n"));
            }
            if let Some(max) = b.max_sessions {
                out.push_str(&format!("max_sessions = {max}\n"));
            }
            out.push('\n');
        }
        out
    }

    /// Validate the configuration (relative paths resolve against the crate).
    pub fn config(&self) -> Result<wsrouter::Config, wsrouter::config::ConfigError> {
        wsrouter::Config::from_toml(&self.toml(), manifest_dir(), Path::new("test-router.toml"))
    }

    /// Start a router on ephemeral loopback ports. The listeners are bound
    /// before this returns, so clients can connect at once.
    pub async fn start(&self) -> RouterHandle {
        self.start_with_file(None).await
    }

    /// Start a router whose configuration is read from `path` (written from
    /// this builder first), so that `POST /api/reload` re-reads that file.
    pub async fn start_from_file(&self, path: &Path) -> RouterHandle {
        self.write_to(path);
        self.start_with_file(Some(path.to_path_buf())).await
    }

    /// Write the configuration to `path`, with the GeoIP path made absolute.
    pub fn write_to(&self, path: &Path) {
        let mut builder = self.clone();
        if Path::new(&builder.geoip).is_relative() {
            builder.geoip = manifest_dir().join(&builder.geoip).display().to_string();
        }
        std::fs::write(path, builder.toml()).expect("write the router config file");
    }

    async fn start_with_file(&self, path: Option<PathBuf>) -> RouterHandle {
        let config = match &path {
            Some(path) => wsrouter::Config::from_file(path),
            None => self.config(),
        }
        .unwrap_or_else(|e| panic!("test router config is invalid: {e}\n{}", self.toml()));
        // As the binary binds it, so session threads get listeners of their
        // own (unless the test asks for a plain one).
        let public = if self.plain_public_listener {
            TcpListener::bind("127.0.0.1:0").await.expect("bind public")
        } else {
            wsrouter::public_listener("127.0.0.1:0".parse().expect("address")).expect("bind public")
        };
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let public_addr = public.local_addr().expect("public address");
        let admin_addr = admin.local_addr().expect("admin address");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let options = wsrouter::Options {
            config_path: path,
            ..wsrouter::Options::default()
        };
        let task = tokio::spawn(wsrouter::run_with(
            config,
            wsrouter::Listeners::new(public, admin),
            async move {
                let _ = stop_rx.await;
            },
            options,
        ));
        RouterHandle {
            public: public_addr,
            admin: admin_addr,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

/// A running router; dropping it asks it to stop.
pub struct RouterHandle {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RouterHandle {
    /// The client URL for a session key.
    pub fn url(&self, key: &str) -> String {
        format!("ws://{}/chat?session={key}", self.public)
    }

    /// Stop the router and wait (bounded) for `run` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            within("router shutdown", task)
                .await
                .expect("router task")
                .expect("router run");
        }
    }

    /// A session through this router: connect with `key` and extra request
    /// headers, and read the backend's welcome.
    pub async fn connect(&self, key: &str, headers: &[(&str, &str)]) -> (Client, Welcome) {
        let (mut client, _) = try_connect(&self.url(key), headers)
            .await
            .unwrap_or_else(|e| panic!("connect through the router with key {key:?}: {e}"));
        let welcome = read_welcome(&mut client).await;
        (client, welcome)
    }

    /// GET an admin path: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// POST an admin path, with a bearer token when given: (status, body).
    pub async fn admin_post(&self, path: &str, token: Option<&str>) -> (u16, String) {
        http_post(self.admin, path, token).await
    }

    /// A backend's `sessions` count in `/api/backends`.
    pub async fn backend_sessions(&self, id: &str) -> u64 {
        self.backends_api()
            .await
            .iter()
            .find(|b| b["id"] == id)
            .unwrap_or_else(|| panic!("backend {id} missing from /api/backends"))["sessions"]
            .as_u64()
            .expect("sessions is a number")
    }

    /// `/api/backends`, parsed.
    pub async fn backends_api(&self) -> Vec<serde_json::Value> {
        let (status, body) = self.admin_get("/api/backends").await;
        assert_eq!(status, 200, "/api/backends: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/backends is not JSON ({e}): {body}"))
    }

    /// A backend's `state` in `/api/backends`.
    pub async fn backend_state(&self, id: &str) -> String {
        self.backends_api()
            .await
            .iter()
            .find(|b| b["id"] == id)
            .unwrap_or_else(|| panic!("backend {id} missing from /api/backends"))["state"]
            .as_str()
            .expect("state is a string")
            .to_string()
    }
}

impl Drop for RouterHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// === clients ===

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a [`TestBackend`] tells each new session.
#[derive(Debug, Clone, Deserialize)]
pub struct Welcome {
    pub backend: String,
    /// Request headers as the backend received them (lower-case names).
    pub headers: HashMap<String, String>,
    /// Path and query as the backend received them.
    pub path: String,
}

impl Welcome {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A WebSocket handshake to `url` with extra request headers.
pub async fn try_connect(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, Response), WsError> {
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    within(
        "WebSocket handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await
}

/// The next message of any kind (pings and pongs included).
pub async fn recv(client: &mut Client) -> Message {
    within("a message from the router", client.next())
        .await
        .expect("the connection ended before a message arrived")
        .expect("the connection failed")
}

/// The next text or binary message, or close frame, skipping pings and pongs.
pub async fn recv_data(client: &mut Client) -> Message {
    loop {
        match recv(client).await {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Send `text` and expect its echo as the very next data message (so a
/// close, or a welcome from a backend the session moved to, fails here).
pub async fn echo(client: &mut Client, text: &str) {
    within("sending a message", client.send(Message::text(text)))
        .await
        .unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    match recv_data(client).await {
        Message::Text(t) if t.as_str() == text => {}
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

/// The backend's welcome, parsed.
pub async fn read_welcome(client: &mut Client) -> Welcome {
    match recv_data(client).await {
        Message::Text(text) => serde_json::from_str(text.as_str())
            .unwrap_or_else(|e| panic!("the welcome is not the backend's JSON ({e}): {text}")),
        other => panic!("expected the backend's welcome, got {other:?}"),
    }
}

/// Wait for a close frame from the router: (code, reason). Data before it
/// is an error.
pub async fn expect_close(client: &mut Client) -> (u16, String) {
    match recv_data(client).await {
        Message::Close(Some(frame)) => (u16::from(frame.code), frame.reason.to_string()),
        Message::Close(None) => (1005, String::new()),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Close a session politely and wait (bounded) for the router to finish it.
pub async fn close(mut client: Client) {
    let _ = client.close(None).await;
    within("the close handshake", async {
        while let Some(Ok(_)) = client.next().await {}
    })
    .await;
}

/// A session key for `i`, unique to a test by `prefix`.
pub fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
}

// === raw HTTP ===

/// An HTTP answer read from a raw socket.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    /// The status code, `None` when the connection closed without an answer.
    pub status: Option<u16>,
    /// The head, lower-cased, for header checks.
    pub head: String,
    pub body: String,
}

/// Send `bytes` on a fresh connection and read until the server closes it
/// (bounded).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> RawAnswer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("send request");
    read_answer(&mut stream).await
}

/// Read until the server closes the connection (bounded) and parse what
/// came as an HTTP answer. A reset counts as a close.
pub async fn read_answer(stream: &mut TcpStream) -> RawAnswer {
    let mut buf = Vec::new();
    within("the server to answer and close", async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    RawAnswer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange(addr, request.as_bytes()).await;
    let status = answer
        .status
        .unwrap_or_else(|| panic!("no HTTP answer to GET {path}: {answer:?}"));
    (status, answer.body)
}

/// The value of one series (exact name and labels, as Prometheus text
/// writes them) from a router's `/metrics`; 0 when absent.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// POST an admin path with an optional bearer token: (status, body).
pub async fn http_post(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_exchange(addr, request.as_bytes()).await;
    let status = answer
        .status
        .unwrap_or_else(|| panic!("no HTTP answer to POST {path}: {answer:?}"));
    (status, answer.body)
}

/// Raise this process's open-files soft limit to its hard limit, for tests
/// that hold hundreds of sessions (four descriptors each in one process).
pub fn raise_fd_limit() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

// === raw WebSocket ===

/// An upgraded raw connection to the router, for sending invalid frames.
pub async fn raw_session(router: SocketAddr, key: &str) -> TcpStream {
    let mut stream = TcpStream::connect(router).await.expect("connect");
    let request = format!(
        "GET /chat?session={key} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Read the 101 head, then the welcome frame (small, unmasked).
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        within("the 101", stream.read_exact(&mut byte))
            .await
            .unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Read one (unmasked) frame: its first byte (FIN and opcode) and payload.
pub async fn read_frame(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await.ok()?;
    let mut len = u64::from(header[1] & 0x7f);
    if len == 126 {
        let mut ext = [0u8; 2];
        stream.read_exact(&mut ext).await.ok()?;
        len = u64::from(u16::from_be_bytes(ext));
    } else if len == 127 {
        let mut ext = [0u8; 8];
        stream.read_exact(&mut ext).await.ok()?;
        len = u64::from_be_bytes(ext);
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await.ok()?;
    Some((header[0], payload))
}

/// The code of the first close frame on `stream`, or `None` when the
/// connection ends without one (unbounded: see [`read_close_code`]).
pub async fn close_code(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<u16> {
    loop {
        let (first, payload) = read_frame(stream).await?;
        if first & 0x0f == 0x8 {
            return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
    }
}

/// Read frames until a close frame, within [`WAIT`]; return its code.
pub async fn read_close_code(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<u16> {
    within("a close frame", close_code(stream)).await
}

/// The header of a masked client frame of `len` bytes (`first`: FIN, RSV
/// and opcode), with an all-zero mask: the payload is sent as it is.
pub fn masked_header(first: u8, len: u64) -> Vec<u8> {
    let mut out = vec![first];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&[0; 4]);
    out
}

// === the router binary ===

/// A child process; killed (and reaped) whichever way the test ends.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// `GET path` that reports a refused connection as `None` instead of
/// panicking.
pub async fn try_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    read_answer(&mut stream).await.status
}

pub fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A router run as its own process (the `wsrouter` binary, as a user runs
/// it, with `--pid-file`), for what only a process shows: its resident
/// memory, signals, an upgrade to a new process.
pub struct RouterProcess {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// Its stderr, and that of the processes an upgrade starts.
    pub log: PathBuf,
    pub config: PathBuf,
    pub pid_file: PathBuf,
    child: ChildGuard,
}

impl RouterProcess {
    /// Start the binary on `builder`'s configuration, on free loopback
    /// ports, and wait until `/readyz` answers 200.
    pub async fn start(builder: &RouterBuilder, name: &str) -> RouterProcess {
        RouterProcess::start_with_env(builder, name, &[]).await
    }

    /// [`RouterProcess::start`], with more environment variables.
    pub async fn start_with_env(
        builder: &RouterBuilder,
        name: &str,
        env: &[(&str, &str)],
    ) -> RouterProcess {
        let exe = Path::new(env!("CARGO_BIN_EXE_wsrouter"));
        RouterProcess::start_at(exe, builder, name, env).await
    }

    /// [`RouterProcess::start_with_env`], with the binary started by the
    /// path `exe` (a symbolic link, say).
    pub async fn start_at(
        exe: &Path,
        builder: &RouterBuilder,
        name: &str,
        env: &[(&str, &str)],
    ) -> RouterProcess {
        let (public, admin): (SocketAddr, SocketAddr) = (
            ([127, 0, 0, 1], free_port()).into(),
            ([127, 0, 0, 1], free_port()).into(),
        );
        let config = temp_file(&format!("{name}.toml"));
        builder.write_to(&config);
        let toml = std::fs::read_to_string(&config).expect("read config back");
        let toml = toml
            .replacen(
                "public = \"127.0.0.1:0\"",
                &format!("public = \"{public}\""),
                1,
            )
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"{admin}\""),
                1,
            );
        std::fs::write(&config, toml).expect("write config");
        let log = temp_file(&format!("{name}.log"));
        let pid_file = temp_file(&format!("{name}.pid"));
        let child = ChildGuard(
            std::process::Command::new(exe)
                .arg("--config")
                .arg(&config)
                .arg("--pid-file")
                .arg(&pid_file)
                .env("RUST_LOG", "wsrouter=info")
                .envs(env.iter().copied())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("start the wsrouter binary"),
        );
        let mut router = RouterProcess {
            public,
            admin,
            log,
            config,
            pid_file,
            child,
        };
        let deadline = Instant::now() + WAIT;
        while try_status(admin, "/readyz").await != Some(200) {
            if let Some(status) = router.child.0.try_wait().expect("child status") {
                panic!("wsrouter exited early ({status}):\n{}", log_of(&router.log));
            }
            assert!(
                Instant::now() < deadline,
                "wsrouter not ready:\n{}",
                log_of(&router.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Ready answers as soon as the admin listener serves; the pid file
        // is written once the session threads accept too.
        let pid = router.pid();
        eventually("the pid file", WAIT, async || {
            router.pid_in_file() == Some(pid)
        })
        .await;
        router
    }

    /// The pid of the process this test started.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The pid the pid file names (the process that holds the listeners).
    pub fn pid_in_file(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Send a signal (by name: `USR2`, `TERM`) to the process the pid file
    /// names.
    pub fn signal(&self, name: &str) {
        signal(self.pid_in_file().expect("a pid file"), name);
    }

    /// How the process this test started exited, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.0.try_wait().expect("child status")
    }

    /// Wait until the pid file names a process other than `old`; returns
    /// it.
    pub async fn new_holder(&self, old: u32) -> u32 {
        eventually("the pid file to name a new process", WAIT, async || {
            self.pid_in_file().is_some_and(|pid| pid != old)
        })
        .await;
        self.pid_in_file().expect("a pid")
    }

    /// Upgrade with SIGUSR2; returns the new process's pid once it holds
    /// the listeners.
    pub async fn upgrade(&self) -> u32 {
        let old = self.pid_in_file().expect("a pid file");
        signal(old, "USR2");
        self.new_holder(old).await
    }

    /// Wait until the process this test started has exited, successfully.
    pub async fn wait_for_exit(&mut self) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.exited() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the old process did not exit in {WAIT:?}:\n{}",
                log_of(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{status}:\n{}", log_of(&self.log));
    }

    /// The client URL for a session key.
    pub fn url(&self, key: &str) -> String {
        format!("ws://{}/chat?session={key}", self.public)
    }

    /// The process's resident memory (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }
}

impl Drop for RouterProcess {
    /// A process an upgrade started is not this test's child: it goes too.
    fn drop(&mut self) {
        if let Some(pid) = self.pid_in_file().filter(|pid| *pid != self.pid()) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        for file in [&self.config, &self.pid_file, &self.log] {
            let _ = std::fs::remove_file(file);
        }
    }
}

// === backends in processes of their own ===

/// The body of a backend process. When this test binary is run again by
/// [`BackendProcess::start`], the test that calls this serves a
/// [`TestBackend`] until the process is killed; run any other way, it
/// returns at once. A test file that starts backend processes has an
/// ignored test named `backend_process` that calls it.
pub async fn backend_process_main() {
    let (Ok(id), Ok(addr)) = (
        std::env::var("WSROUTER_TEST_BACKEND_ID"),
        std::env::var("WSROUTER_TEST_BACKEND_ADDR"),
    ) else {
        return;
    };
    let crash_on = std::env::var("WSROUTER_TEST_BACKEND_CRASH_ON").ok();
    let addr = addr.parse().expect("backend address");
    let backend = TestBackend::start_on(&id, BackendOptions::default(), addr).await;
    println!("BACKEND READY");
    loop {
        if let Some(poison) = &crash_on
            && backend.received().iter().any(|(_, text)| text == poison)
        {
            // The test kills this process with SIGKILL when it reads this.
            println!("BACKEND POISONED");
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A [`TestBackend`] in a process of its own (this test binary, run again
/// to execute only its `backend_process` test), so that a test can kill it
/// with SIGKILL or freeze it with SIGSTOP as an operating system would.
pub struct BackendProcess {
    pub id: String,
    /// `ws://127.0.0.1:PORT`, for [`RouterBuilder::backend_entry`].
    pub url: String,
    pid: u32,
    killed: Arc<std::sync::atomic::AtomicBool>,
    _child: ChildGuard,
}

impl BackendProcess {
    /// Start it, and wait until it listens. With `crash_on`, the process
    /// is killed with SIGKILL as soon as it receives that text message.
    pub async fn start(id: &str, crash_on: Option<&str>) -> BackendProcess {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut command = std::process::Command::new(std::env::current_exe().expect("test binary"));
        command
            .args(["backend_process", "--exact", "--ignored", "--nocapture"])
            .env("WSROUTER_TEST_BACKEND_ID", id)
            .env("WSROUTER_TEST_BACKEND_ADDR", &addr)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        if let Some(poison) = crash_on {
            command.env("WSROUTER_TEST_BACKEND_CRASH_ON", poison);
        }
        let mut child = command.spawn().expect("start a backend process");
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = oneshot::channel();
        let watcher_killed = Arc::clone(&killed);
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                if line.contains("BACKEND READY") {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                } else if line.contains("BACKEND POISONED") {
                    signal(pid, "KILL");
                    watcher_killed.store(true, Ordering::SeqCst);
                }
            }
        });
        within("the backend process to listen", ready_rx)
            .await
            .expect("the backend process started");
        BackendProcess {
            id: id.to_string(),
            url: format!("ws://{addr}"),
            pid,
            killed,
            _child: ChildGuard(child),
        }
    }

    /// Whether it was killed for receiving its `crash_on` message.
    pub fn was_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Freeze it (SIGSTOP): its connections stay open and nothing is read,
    /// as in a long GC pause or a deadlock.
    pub fn freeze(&self) {
        signal(self.pid, "STOP");
    }
}

/// Send a signal (by name) to a process.
pub fn signal(pid: u32, name: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{name} {pid} failed");
}

/// A unique path in the temp directory for a test file.
pub fn temp_file(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("wsrouter-test-{}-{n}-{name}", std::process::id()))
}

impl RouterBuilder {
    /// `[admin] token`: POST calls to the admin API need
    /// `Authorization: Bearer <token>`.
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.into());
        self
    }
}
