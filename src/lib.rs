//! wsrouter: a WebSocket-aware connection router. It accepts WebSocket
//! upgrades, places each visitor on the closest healthy backend by GeoIP,
//! pins the session key to a backend with rendezvous hashing, and relays
//! messages both ways.
//!
//! # Layout
//!
//! In the order a session travels (ARCHITECTURE.md draws the layers and
//! the path of one session). Only `config`, `geo` and `steer` (for the
//! binary, the tests and the benchmarks) and the parsers `handshake`,
//! `proxy_protocol` and `wire::frame` (for the fuzz targets) are public beyond
//! the entry points below.
//!
//! | module | owns |
//! | --- | --- |
//! | `app` | wiring: shared state, background tasks, the admin server, the shutdown phases |
//! | `shutdown` | the phase watch (running, draining, closing, done) and the session tracker |
//! | [`config`] | the typed [`Config`], its defaults, errors naming fields; inside it `file` (the TOML schema), `validate` (each section checked, no I/O), `load` (the GeoIP database, the token file, certificates and CA roots) and `config::tls` (the TLS configs, the SNI resolver) |
//! | `listener` | `SO_REUSEPORT` listeners, the session threads and their accept loops |
//! | `connection` | accept to 101: PROXY header, rate limit, TLS, the upgrade request, Origin, placement, the first dial |
//! | `proxy_protocol` | PROXY protocol v1/v2 headers from trusted L4 balancers |
//! | `tls` | TLS running: the server config swapped on reload, the client stream, dialing `wss://` backends |
//! | `handshake` | parse and check the client's upgrade request: paths, client address, session key |
//! | `answer` | every HTTP answer a client gets: the 101 and each refusal, with its metric result |
//! | [`geo`] | MaxMind DB lookups to a location |
//! | [`steer`] | pure ranking: region order and weighted rendezvous hashing |
//! | `limits` | per-IP rate and concurrency, global cap, Origin allow-list, message rates, under-attack mode |
//! | `backend` | backends at run time: state, session slots, the set snapshot; `backend::control` is the cell a session is asked to move through |
//! | `health` | active health checks and their thresholds |
//! | `upstream` | dial one backend: the forwarded headers, the HTTP/1.1 upgrade, the 101 checks; `upstream::dialer` is the dial policy (first dial and the rounds of a move) |
//! | `wire` | the WebSocket wire: `wire::frame` (RFC 6455 at the byte level), `wire::peer` (one side's socket, reader and write queue), `wire::close` (named close codes, client faults) |
//! | `session` | one session from 101 to close: the relay and the move; `session::relay` forwards frames both ways, `session::replay` holds the replay window, the queue and the move chain, `session::handover` is a session as data for an upgrade's new process |
//! | `memory` | what sessions hold in bytes against the process budget: pause, then close the largest |
//! | `operator` | operator actions (drain, undrain, reload) for the admin API and SIGHUP |
//! | `admin` | the admin listener: metrics, health, readiness, backends and memory API |
//! | `upgrade` | upgrading in place: the messages both processes speak, the pid file, systemd's notification; `upgrade::upgrader` is the old process's side (start the successor, ship it the listeners and sessions), `upgrade::successor` the new one's, `upgrade::channel` the Unix socket with `SCM_RIGHTS` between them |
//! | `metrics` | metric names, descriptions, label value enums and the Prometheus recorder |

mod admin;
mod answer;
mod app;
mod backend;
pub mod config;
mod connection;
pub mod geo;
pub mod handshake;
mod health;
mod limits;
mod listener;
mod memory;
mod metrics;
mod operator;
pub mod proxy_protocol;
mod session;
mod shutdown;
mod socketio;
pub mod steer;
mod tls;
mod upgrade;
mod upstream;
pub mod wire;

pub use app::{Options, run, run_with};
pub use config::Config;
pub use listener::{Listeners, public_listener};
pub use upgrade::{Inherited, Relaunch, Successor};
