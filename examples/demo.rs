//! The whole thing on one machine: three regional chat backends (eu, us, ap),
//! the router in front of them on the default GeoIP test database, and the
//! browser widget.
//!
//! ```text
//! cargo run --example demo
//! cargo run --example demo -- --socketio
//! ```
//!
//! With `--socketio` the backends are Socket.IO chat servers instead (node
//! and the `socket.io` package, `examples/socketio_chat`, installed with
//! `npm ci` on first use), on 127.0.0.1:9011-9013, and the router
//! (`examples/demo-socketio.toml`) serves Socket.IO clients on
//! `/socket.io/`: `node examples/socketio_chat/client.js`.
//!
//! Fixed ports, so the README can be followed step by step:
//!
//! | what | address |
//! | --- | --- |
//! | router (WebSocket) | ws://127.0.0.1:8080/chat |
//! | router admin | http://127.0.0.1:9090 (/metrics, /api/backends, /readyz) |
//! | chat backends | eu-1 127.0.0.1:9001, us-1 :9002, ap-1 :9003 |
//! | browser widget | http://127.0.0.1:8000/ |
//!
//! The router's configuration is `examples/demo.toml`; it trusts
//! X-Forwarded-For from loopback so `chat_client --forwarded-for` can play a
//! visitor from London, the US or Tokyo.
//!
//! Type commands on the demo's standard input to break things and watch
//! sessions move without reconnecting: `kill eu-1` (drops its listener and
//! every connection at once, like a crash), `start eu-1` (brings it back),
//! and `drain eu-1` / `undrain eu-1` (through the router's admin API).

// The demo uses `serve_shared`; `serve` is for the standalone backend.
#[allow(dead_code)]
#[path = "chat_backend/chat.rs"]
mod chat;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use wsrouter::{Config, Listeners};

const BACKENDS: &[(&str, &str, &str)] = &[
    ("eu-1", "eu", "127.0.0.1:9001"),
    ("us-1", "us", "127.0.0.1:9002"),
    ("ap-1", "ap", "127.0.0.1:9003"),
];
/// The Socket.IO chat servers of `--socketio`: (id, port).
const SOCKETIO_BACKENDS: &[(&str, u16)] = &[("eu-1", 9011), ("us-1", 9012), ("ap-1", 9013)];
const WIDGET_ADDR: &str = "127.0.0.1:8000";
const WIDGET_HTML: &str = include_str!("widget/index.html");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wsrouter=info".into()),
        )
        .init();

    if std::env::args().any(|a| a == "--socketio") {
        return socketio_demo().await;
    }
    let config_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo.toml");
    let config = Config::from_file(&config_path)?;

    let seen = Arc::new(chat::SeenIds::default());
    let mut running = HashMap::new();
    for &(id, _, _) in BACKENDS {
        running.insert(id, start_backend(id, &seen).await?);
    }
    let widget = TcpListener::bind(WIDGET_ADDR)
        .await
        .with_context(|| format!("bind widget server on {WIDGET_ADDR}"))?;
    tokio::spawn(serve_widget(widget));

    let admin = config.admin.listen;
    let listeners = Listeners::bind(&config).await?;
    print_banner();
    tokio::spawn(commands(running, seen, admin));
    wsrouter::run(config, listeners, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// The demo with Socket.IO chat servers: install their packages if needed,
/// start them, run the router until Ctrl-C, then stop them. `kill ID` and
/// `start ID` on stdin kill (SIGKILL) and restart one.
async fn socketio_demo() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/socketio_chat");
    if !dir.join("node_modules/socket.io").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .context(
                "run npm ci in examples/socketio_chat (the Socket.IO demo needs node and npm)",
            )?;
        anyhow::ensure!(status.success(), "npm ci in {} failed", dir.display());
    }
    let config_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo-socketio.toml");
    let config = Config::from_file(&config_path)?;
    let mut servers = HashMap::new();
    for &(id, port) in SOCKETIO_BACKENDS {
        servers.insert(id, start_socketio(&dir, id, port)?);
    }
    let listeners = Listeners::bind(&config).await?;
    print_socketio_banner();
    let servers = Arc::new(std::sync::Mutex::new(servers));
    let commands = Arc::clone(&servers);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut words = line.split_whitespace();
            let (Some(command), Some(name)) = (words.next(), words.next()) else {
                continue;
            };
            let Some(&(id, port)) = SOCKETIO_BACKENDS.iter().find(|b| b.0 == name) else {
                tracing::warn!("unknown backend {name:?}; try eu-1, us-1 or ap-1");
                continue;
            };
            let mut servers = commands.lock().expect("not poisoned");
            match command {
                "kill" => match servers.remove(id) {
                    Some(mut child) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        tracing::warn!(backend = id, "killed (SIGKILL)");
                    }
                    None => tracing::warn!(backend = id, "already dead"),
                },
                "start" if !servers.contains_key(id) => match start_socketio(&dir, id, port) {
                    Ok(child) => {
                        servers.insert(id, child);
                    }
                    Err(e) => tracing::error!("{e:#}"),
                },
                other => tracing::warn!("unknown command {other:?}; try kill or start"),
            }
        }
    });
    let run = wsrouter::run(config, listeners, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    for (_, mut child) in servers.lock().expect("not poisoned").drain() {
        let _ = child.kill();
        let _ = child.wait();
    }
    run?;
    Ok(())
}

/// Start one Socket.IO chat server (node).
fn start_socketio(dir: &Path, id: &str, port: u16) -> anyhow::Result<Child> {
    Command::new("node")
        .arg(dir.join("server.js"))
        .args(["--id", id, "--port", &port.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("start the Socket.IO chat server {id} (node)"))
}

#[allow(clippy::print_stdout)]
fn print_socketio_banner() {
    println!(
        r#"
wsrouter demo (Socket.IO) is running (Ctrl-C to stop)

  router     http://127.0.0.1:8080/socket.io/
  admin      http://127.0.0.1:9090/api/backends   /metrics   /readyz
  backends   eu-1 127.0.0.1:9011   us-1 127.0.0.1:9012   ap-1 127.0.0.1:9013 (node, socket.io 4.8)

Try, in other terminals (type lines to chat):

  node examples/socketio_chat/client.js http://127.0.0.1:8080 --session alice --room demo
  node examples/socketio_chat/client.js http://127.0.0.1:8080 --session bob --room demo

Then type "kill eu-1" (or whichever backend a client is on) here: the
client stays connected, says nothing about it, and its next line is
delivered by another backend. "start eu-1" brings it back.
"#
    );
}

/// Start one regional chat backend; aborting the handle kills it.
async fn start_backend(
    id: &'static str,
    seen: &Arc<chat::SeenIds>,
) -> anyhow::Result<JoinHandle<()>> {
    let &(_, region, addr) = BACKENDS
        .iter()
        .find(|b| b.0 == id)
        .context("unknown backend")?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind chat backend {id} on {addr} (is another demo running?)"))?;
    let seen = Arc::clone(seen);
    Ok(tokio::spawn(async move {
        if let Err(e) = chat::serve_shared(listener, id.to_string(), region.to_string(), seen).await
        {
            tracing::error!(backend = id, error = %e, "chat backend stopped");
        }
    }))
}

/// Read `kill|start|drain|undrain <backend>` lines from stdin.
async fn commands(
    mut running: HashMap<&'static str, JoinHandle<()>>,
    seen: Arc<chat::SeenIds>,
    admin: std::net::SocketAddr,
) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut words = line.split_whitespace();
        let (Some(command), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(&(id, _, _)) = BACKENDS.iter().find(|b| b.0 == name) else {
            tracing::warn!("unknown backend {name:?}; try eu-1, us-1 or ap-1");
            continue;
        };
        match command {
            "kill" => match running.remove(id) {
                Some(handle) => {
                    handle.abort();
                    tracing::warn!(
                        backend = id,
                        "killed: listener and every connection dropped"
                    );
                }
                None => tracing::warn!(backend = id, "already dead"),
            },
            "start" if !running.contains_key(id) => match start_backend(id, &seen).await {
                Ok(handle) => {
                    running.insert(id, handle);
                    tracing::info!(backend = id, "started again");
                }
                Err(e) => tracing::error!("{e:#}"),
            },
            "start" => tracing::warn!(backend = id, "already running"),
            "drain" | "undrain" => {
                match admin_post(admin, &format!("/api/backends/{id}/{command}")).await {
                    Ok(status) => tracing::info!(backend = id, %status, "{command} requested"),
                    Err(e) => tracing::error!("admin call failed: {e}"),
                }
            }
            other => tracing::warn!("unknown command {other:?}; try kill, start, drain, undrain"),
        }
    }
}

/// A bare POST to the router's admin API; returns the status line.
async fn admin_post(admin: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(admin).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response.lines().next().unwrap_or_default().to_string())
}

/// Serve the widget page to any GET, so a browser can open it.
async fn serve_widget(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                WIDGET_HTML.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(WIDGET_HTML.as_bytes()).await;
        });
    }
}

#[allow(clippy::print_stdout)]
fn print_banner() {
    println!(
        r#"
wsrouter demo is running (Ctrl-C to stop)

  router     ws://127.0.0.1:8080/chat
  admin      http://127.0.0.1:9090/api/backends   /metrics   /readyz
  backends   eu-1 127.0.0.1:9001   us-1 127.0.0.1:9002   ap-1 127.0.0.1:9003
  widget     http://127.0.0.1:8000/

Try, in another terminal:

  # a visitor from London lands on eu-1, one from the US on us-1, one from Tokyo on ap-1
  cargo run --example chat_client -- --forwarded-for 81.2.69.142 --session alice --room demo
  cargo run --example chat_client -- --forwarded-for 216.160.83.56 --session bob --room demo
  cargo run --example chat_client -- --forwarded-for 2001:218::1 --session carol --room demo

  # from loopback with no header: the default region (eu)
  cargo run --example chat_client -- --session dave

  # what the router sees
  curl -s http://127.0.0.1:9090/api/backends
  curl -s http://127.0.0.1:9090/metrics | grep wsrouter_

Then, while a client is connected, type here (in this terminal):

  kill eu-1        crash eu-1: its sessions move to the next-closest region, sockets stay open
  start eu-1       bring it back: new sessions go there again, moved ones stay where they are
  drain us-1       move us-1's sessions away, paced (same as POST /api/backends/us-1/drain)
  undrain us-1
"#
    );
}
