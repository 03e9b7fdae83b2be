//! Socket.IO peers for the tests: the real `socket.io` server and
//! `socket.io-client` (4.8, pinned in `tests/socketio/package-lock.json`),
//! run with node. The packages are installed on first use with `npm ci`,
//! once per checkout (a file lock keeps parallel test processes from
//! installing twice), so `cargo test` on a fresh clone does the set-up.
//!
//! [`SioServer`] is `tests/socketio/server.js` on a loopback port;
//! [`SioClient`] is `tests/socketio/client.js`, driven by JSON lines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::{manifest_dir, within};

/// `tests/socketio`, with its packages installed.
pub fn socketio_dir() -> &'static Path {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY.get_or_init(|| {
        let dir = manifest_dir().join("tests/socketio");
        let lock =
            std::fs::File::create(dir.join(".install.lock")).expect("create the install lock");
        lock.lock().expect("take the install lock");
        let wanted = std::fs::read(dir.join("package-lock.json")).expect("read package-lock.json");
        let marker = dir.join("node_modules/.wsrouter-installed");
        if std::fs::read(&marker).ok().as_deref() != Some(&wanted[..]) {
            let status = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--prefer-offline"])
                .current_dir(&dir)
                .stdin(Stdio::null())
                .status()
                .expect("run npm ci (node 20 and npm are needed for the Socket.IO tests)");
            assert!(status.success(), "npm ci in {} failed", dir.display());
            std::fs::write(&marker, &wanted).expect("write the install marker");
        }
        dir
    })
}

/// A node process whose stdout is JSON lines (after any plain lines).
struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Node {
    fn start(script: &str, args: &[String]) -> Node {
        let dir = socketio_dir();
        let mut child = Command::new("node")
            .arg(dir.join(script))
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start node {script}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Node {
            child,
            stdin,
            lines,
        }
    }

    async fn next_line(&mut self) -> Option<String> {
        self.lines.next_line().await.expect("read from node")
    }
}

/// A Socket.IO server (`tests/socketio/server.js`) on a loopback port.
pub struct SioServer {
    pub id: String,
    pub port: u16,
    node: Node,
    /// Every event it reported so far, in order.
    pub events: Vec<Value>,
}

impl SioServer {
    /// Start it and wait until it listens. `ping_interval_ms` is
    /// engine.io's (a held long-poll is answered within it).
    pub async fn start(id: &str, ping_interval_ms: u64) -> SioServer {
        SioServer::start_with(id, ping_interval_ms, &[]).await
    }

    /// [`SioServer::start`] with more of server.js's options.
    pub async fn start_with(id: &str, ping_interval_ms: u64, extra: &[&str]) -> SioServer {
        let mut args = vec![
            "--id".to_string(),
            id.to_string(),
            "--ping-interval".to_string(),
            ping_interval_ms.to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut node = Node::start("server.js", &args);
        let line = within("the Socket.IO server to listen", node.next_line())
            .await
            .expect("the Socket.IO server printed nothing");
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from server.js: {line}"));
        SioServer {
            id: id.to_string(),
            port,
            node,
            events: Vec::new(),
        }
    }

    /// `ws://127.0.0.1:PORT`, for the router's backend entry.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Wait for the first reported event (from the start) that `matches`.
    pub async fn wait_for(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(found) = self.events.iter().find(|e| matches(e)) {
            return found.clone();
        }
        let node = &mut self.node;
        let events = &mut self.events;
        within(what, async {
            loop {
                let line = node
                    .next_line()
                    .await
                    .unwrap_or_else(|| panic!("server.js ended while waiting for {what}"));
                let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                events.push(event.clone());
                if matches(&event) {
                    return event;
                }
            }
        })
        .await
    }

    /// Kill it (SIGKILL): its connections die with it.
    pub async fn kill(&mut self) {
        let _ = self.node.child.kill().await;
    }
}

/// A Socket.IO client (`tests/socketio/client.js`).
pub struct SioClient {
    node: Node,
    next_seq: u64,
    /// Every event it reported so far, in order.
    pub events: Vec<Value>,
}

impl SioClient {
    /// Connect to `url` with `io(url, options)`.
    pub fn connect(url: &str, options: Value) -> SioClient {
        let node = Node::start("client.js", &[url.to_string(), options.to_string()]);
        SioClient {
            node,
            next_seq: 1,
            events: Vec::new(),
        }
    }

    /// The next reported event.
    pub async fn next_event(&mut self) -> Value {
        let line = within("an event from the Socket.IO client", self.node.next_line())
            .await
            .expect("client.js ended");
        let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        self.events.push(event.clone());
        event
    }

    /// The next event that `matches`, keeping the others.
    async fn next_matching(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        within(what, async {
            loop {
                let event = self.next_event().await;
                if matches(&event) {
                    return event;
                }
            }
        })
        .await
    }

    /// Wait for the next event named `name`, keeping the others.
    pub async fn wait_for(&mut self, name: &str) -> Value {
        let what = format!("the client's {name} event");
        self.next_matching(&what, |event| event["event"] == name)
            .await
    }

    /// The first event so far that `matches`, or the next one that does.
    pub async fn seen_or_next(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        match self.events.iter().find(|e| matches(e)) {
            Some(found) => found.clone(),
            None => self.next_matching(what, matches).await,
        }
    }

    /// Send client.js one command (a JSON line) carrying a new seq; returns
    /// the seq.
    async fn command(&mut self, mut command: Value) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        command["seq"] = json!(seq);
        let line = command.to_string() + "\n";
        self.node
            .stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to client.js");
        seq
    }

    /// Emit `event` with `data` and an acknowledgement; returns its seq,
    /// which the `ack` event carries.
    pub async fn emit(&mut self, event: &str, data: Value) -> u64 {
        self.command(json!({"cmd": "emit", "event": event, "data": data}))
            .await
    }

    /// Emit `event` on the namespace `nsp` (joined with [`Self::join`]).
    pub async fn emit_on(&mut self, nsp: &str, event: &str, data: Value) -> u64 {
        self.command(json!({"cmd": "emit", "nsp": nsp, "event": event, "data": data}))
            .await
    }

    /// Open a socket on the namespace `nsp` over the same connection, with
    /// `auth`, and wait until it is connected.
    pub async fn join(&mut self, nsp: &str, auth: Value) {
        self.command(json!({"cmd": "join", "nsp": nsp, "auth": auth}))
            .await;
        let what = format!("the connection of namespace {nsp}");
        self.next_matching(&what, |e| e["event"] == "connect" && e["nsp"] == nsp)
            .await;
    }

    /// Emit a binary event (`label` and an attachment of `bytes` bytes,
    /// each the seq modulo 256) with an acknowledgement; returns its seq.
    pub async fn emit_blob(&mut self, label: &str, bytes: usize) -> u64 {
        self.command(json!({"cmd": "emit_blob", "label": label, "bytes": bytes}))
            .await
    }

    /// Emit and wait for the acknowledgement's data.
    pub async fn emit_acked(&mut self, event: &str, data: Value) -> Value {
        let seq = self.emit(event, data).await;
        self.acks(&[seq]).await.remove(0)
    }

    /// Wait until every emit in `seqs` has its acknowledgement; returns
    /// their data in `seqs` order.
    pub async fn acks(&mut self, seqs: &[u64]) -> Vec<Value> {
        let waited = tokio::time::timeout(super::WAIT, async {
            loop {
                let found: Vec<Value> = seqs
                    .iter()
                    .filter_map(|seq| {
                        self.events
                            .iter()
                            .find(|e| e["event"] == "ack" && e["seq"] == *seq)
                            .map(|e| e["data"].clone())
                    })
                    .collect();
                if found.len() == seqs.len() {
                    return found;
                }
                self.next_event().await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            panic!(
                "timed out after {:?}: the acknowledgements of emits {seqs:?}; the client saw {:?}",
                super::WAIT,
                self.events
            )
        })
    }

    /// Whether any event so far was a `disconnect`.
    pub fn saw_disconnect(&self) -> bool {
        self.events.iter().any(|e| e["event"] == "disconnect")
    }
}
