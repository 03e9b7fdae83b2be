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
//!   cargo run --release --example tokio_tunnel -- --listen 127.0.0.1:18080 --backend 127.0.0.1:19001

use std::net::SocketAddr;

use clap::Parser;
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
struct Args {
    /// Where clients connect.
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// Where every session is tunnelled to.
    #[arg(long, default_value = "127.0.0.1:19001")]
    backend: SocketAddr,
    /// Session threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (listen, backend) = (args.listen, args.backend);
            std::thread::spawn(move || serve(listen, backend))
        })
        .collect();
    for worker in workers {
        worker.join().expect("session thread panicked")?;
    }
    Ok(())
}

/// One session thread: accept and tunnel until the process is stopped.
fn serve(listen: SocketAddr, backend: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(listen)?;
        let listener = socket.listen(4096)?;
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
