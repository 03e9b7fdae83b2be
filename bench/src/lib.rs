//! wsrouter's benchmark package (BENCHMARKS.md). Its binaries:
//!
//! - `loadgen`: the WebSocket load generator (latency, throughput, idle,
//!   churn and failover workloads; one JSON line per run);
//! - `echo_backend`: the WebSocket echo server behind the proxy under test
//!   (with `--http`, an HTTP/1.1 server answering engine.io long-polls at
//!   once, for the Socket.IO benchmark);
//! - `tokio_tunnel` and `mio_tunnel`: byte tunnels, yardsticks for the
//!   router's relay (BENCHMARKS.md, "The tokio floor"); the io_uring one is
//!   `bench/uring_tunnel/`, a package of its own.
//!
//! `benches/decision.rs` measures the router's per-session decision path
//! (GeoIP lookup plus steering) with criterion. The scripts in `bench/`
//! (compare.sh, failover.sh, memory.sh, profile.sh, socketio.sh) build and
//! run them.

pub mod tunnel_cli;
