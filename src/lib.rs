//! wsrouter: a WebSocket-aware connection router. It accepts WebSocket
//! upgrades, places each visitor on the closest healthy backend by GeoIP,
//! pins the session key to a backend with rendezvous hashing, and relays
//! messages both ways.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | [`app`] | wiring: listeners, the session threads and their accept loops, background tasks, the shutdown sequence |
//! | [`config`] | the typed [`config::Config`], its defaults, errors naming fields; inside it `file` (the TOML schema), `validate` (each section checked, no I/O), `load` (the GeoIP database, the token file, certificates and CA roots) and [`config::tls`] (the TLS configs, the SNI resolver) |
//! | [`proxy_protocol`] | PROXY protocol v1/v2 headers from trusted L4 balancers |
//! | [`tls`] | TLS running: the server config swapped on reload, [`tls::ClientStream`], dialing `wss://` backends |
//! | [`handshake`] | the client's HTTP/1.1 upgrade: paths, 400/404/426, client address, session key |
//! | [`geo`] | MaxMind DB lookups to a [`geo::Location`] |
//! | [`steer`] | pure ranking: region order and weighted rendezvous hashing |
//! | [`backend`] | backends at run time: state, session slots, the set snapshot |
//! | [`health`] | active health checks and their thresholds |
//! | [`limits`] | per-IP rate and concurrency, global cap, Origin allow-list, message rates, under-attack mode |
//! | [`upstream`] | dialing a backend WebSocket: the forwarded headers, the HTTP/1.1 upgrade, per-backend dial permits |
//! | [`wire`] | the WebSocket wire: [`wire::frame`] finds whole messages from frame headers, checks the protocol and writes the router's own frames; [`wire::peer`] is one side's socket, reader and write queue |
//! | [`session`] | one connection from accept to close; [`session::relay`] forwards frames both ways, [`session::migrate`] holds the replay window, the queue and the move chain |
//! | [`memory`] | what sessions hold in bytes against the process budget: pause, then close the largest |
//! | [`operator`] | operator actions (drain, undrain, reload) and the shutting-down flag, for the admin API and SIGHUP |
//! | [`shutdown`] | the stop flag every task waits on |
//! | [`admin`] | the admin listener: metrics, health, readiness, backends and memory API |
//! | [`metrics`] | metric names, descriptions and the Prometheus recorder |

pub mod admin;
pub mod app;
pub mod backend;
pub mod config;
pub mod geo;
pub mod handshake;
pub mod health;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod operator;
pub mod proxy_protocol;
pub mod session;
pub mod shutdown;
pub mod steer;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use app::{Listeners, Options, run, run_with};
pub use config::Config;
