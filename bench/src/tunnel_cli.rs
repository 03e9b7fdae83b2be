//! What the three byte-tunnel yardsticks share (src/bin/tokio_tunnel.rs,
//! src/bin/mio_tunnel.rs, uring_tunnel/): their command line, a loop per
//! core, and the `SO_REUSEPORT` listener each loop accepts on. The io_uring
//! tunnel, a package of its own, includes this file by path (`#[path]`).

use std::io;
use std::net::SocketAddr;

use clap::Parser;

/// The tunnels' command line.
#[derive(Parser)]
pub struct Args {
    /// Where clients connect.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// Where every session is tunnelled to.
    #[arg(long, default_value = "127.0.0.1:19001")]
    pub backend: SocketAddr,
    /// Event loops (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Parse the command line and run `event_loop(listen, backend)` on one
/// thread per loop until every one has returned.
pub fn run_per_core(event_loop: fn(SocketAddr, SocketAddr) -> io::Result<()>) -> io::Result<()> {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let loops: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || event_loop(args.listen, args.backend)))
        .collect();
    for l in loops {
        l.join().expect("event loop panicked")?;
    }
    Ok(())
}

/// A listener on `addr` that other loops can bind as well (each gets its
/// share of new connections from the kernel), blocking unless told.
pub fn reuseport_listener(
    addr: SocketAddr,
    nonblocking: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(nonblocking)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
