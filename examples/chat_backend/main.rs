//! Example chat backend: one region's WebSocket chat server behind wsrouter.
//!
//! ```text
//! cargo run --example chat_backend -- --listen 127.0.0.1:9001 --id eu-1 --region eu
//! ```
//!
//! WebSocket on any path (room from `?room=`, default `lobby`), health check
//! on `GET /healthz`. See `chat.rs` for the protocol.

mod chat;

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(about = "Example chat backend for wsrouter (one region)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Backend id, shown to clients (should match the id in the router config).
    #[arg(long, default_value = "eu-1")]
    id: String,
    /// Region name, shown to clients.
    #[arg(long, default_value = "eu")]
    region: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, id = %args.id, region = %args.region, "chat backend ready");

    tokio::select! {
        result = chat::serve(listener, args.id, args.region) => result.context("accept loop failed"),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted; shutting down");
            Ok(())
        }
    }
}
