//! The whole thing on one machine: three regional chat backends (eu, us, ap),
//! the router in front of them on the default GeoIP test database, and the
//! browser widget.
//!
//! ```text
//! cargo run --example demo
//! ```
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

#[path = "chat_backend/chat.rs"]
mod chat;

use std::path::Path;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wsrouter::{Config, Listeners};

const BACKENDS: &[(&str, &str, &str)] = &[
    ("eu-1", "eu", "127.0.0.1:9001"),
    ("us-1", "us", "127.0.0.1:9002"),
    ("ap-1", "ap", "127.0.0.1:9003"),
];
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

    let config_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo.toml");
    let config = Config::from_file(&config_path)?;

    for &(id, region, addr) in BACKENDS {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("bind chat backend {id} on {addr} (is another demo running?)")
        })?;
        tokio::spawn(async move {
            if let Err(e) = chat::serve(listener, id.to_string(), region.to_string()).await {
                tracing::error!(backend = id, error = %e, "chat backend stopped");
            }
        });
    }
    let widget = TcpListener::bind(WIDGET_ADDR)
        .await
        .with_context(|| format!("bind widget server on {WIDGET_ADDR}"))?;
    tokio::spawn(serve_widget(widget));

    let listeners = Listeners::bind(&config).await?;
    print_banner();
    wsrouter::run(config, listeners, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
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
"#
    );
}
