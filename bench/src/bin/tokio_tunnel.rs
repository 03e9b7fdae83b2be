//! The cheapest relay tokio allows, as a yardstick for the benchmarks: a
//! byte tunnel (what HAProxy and NGINX do after a WebSocket upgrade), on
//! the same threads wsrouter uses (one single-threaded runtime per core,
//! each accepting on its own `SO_REUSEPORT` listener), with one task per
//! session copying both ways (`tokio::io::copy_bidirectional`). It parses
//! nothing, counts nothing and keeps nothing for replay: the WebSocket
//! handshake passes through to the backend untouched.
//!
//! What it costs per message is tokio's floor under wsrouter's relay; see
//! BENCHMARKS.md ("The tokio floor").
//!
//!   cargo run --release -p wsrouter-bench --bin tokio_tunnel -- --listen 127.0.0.1:18080 --backend 127.0.0.1:19001

use std::net::SocketAddr;

use tokio::net::TcpStream;

use wsrouter_bench::tunnel_cli;

fn main() -> std::io::Result<()> {
    tunnel_cli::run_per_core(serve)
}

/// One session thread: accept and tunnel until the process is stopped.
fn serve(listen: SocketAddr, backend: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(tunnel_cli::reuseport_listener(listen, true)?)?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(e) = tunnel(client, backend).await {
                    eprintln!("tunnel: {e}");
                }
            });
        }
    })
}

async fn tunnel(mut client: TcpStream, backend: SocketAddr) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(backend).await?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 16 * 1024, 16 * 1024)
        .await?;
    Ok(())
}
