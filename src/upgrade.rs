//! Upgrading the router in place: SIGUSR2 or `POST /api/upgrade` starts
//! the executable at the path this process was started from, with the same
//! arguments, and hands it the listening sockets and the established
//! sessions over a Unix socket ([`channel`]): no port is ever unbound,
//! nothing in an accept queue is lost, and no session is closed.
//!
//! The old process ([`Upgrader`], in `upgrader`): start the new one,
//! naming the socket to connect to in `WSROUTER_UPGRADE_SOCKET`; send
//! `Hello` (the hand-over version, every listening socket, what operators
//! set at run time); wait for `Ready` or `Refused`. On `Ready` it stops
//! accepting and ships each session that offers itself
//! ([`crate::session::handover`]), then `Done`; on anything else it keeps
//! serving as before, and says why.
//!
//! The new process ([`Inherited`], then [`Successor`], in `successor`):
//! load and check the configuration (a bad one is `Refused`, with the
//! reason), check the version, take the sockets whose addresses its
//! configuration still names, start serving, answer `Ready`, then resume
//! each session it is sent and answer for it. It writes the pid file and
//! is the one systemd is told about.
//!
//! This module holds the messages both sides speak, and the pid file and
//! systemd notification.

pub mod channel;
mod successor;
mod upgrader;

use std::io;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::operator::Operator;
use crate::session::handover::{Refusal, SessionState};
use crate::socketio::SidTable;

pub use successor::{Inherited, Successor};
pub use upgrader::{Relaunch, UpgradeError, Upgrader};

/// The hand-over format this build speaks. A new process refuses any other
/// (the old process then keeps serving). Raise it with any change to the
/// messages below, `CarriedState` or `session::handover::SessionState`.
pub const HANDOVER_VERSION: u32 = 1;

/// The environment variable that names the old process's socket to a new
/// one.
pub const UPGRADE_SOCKET_ENV: &str = "WSROUTER_UPGRADE_SOCKET";

/// For tests only: the version the old process claims in its `Hello`
/// (a new process must refuse one it does not speak).
const CLAIMED_VERSION_ENV: &str = "WSROUTER_TEST_HANDOVER_VERSION";

/// How long the old process waits for the new one's answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What a listening socket handed over is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Role {
    Public,
    Admin,
}

/// Old process to new.
#[derive(Debug, Serialize, Deserialize)]
enum ToNew {
    /// The descriptors attached are these listeners, in order; `state` is
    /// what operators set at run time, which the new process keeps.
    Hello {
        version: u32,
        listeners: Vec<Role>,
        state: CarriedState,
    },
    /// A session: its state, its buffers as the raw bytes, its client's and
    /// backend's sockets as the descriptors.
    Session { id: u64, state: Box<SessionState> },
    /// Every session that could move was offered; nothing more follows.
    Done,
}

/// What operators set at run time (admin API) and what the router learned
/// (health verdicts, engine.io sids), carried to the new process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CarriedState {
    /// Backends drained (their sessions keep moving away there).
    drained: Vec<String>,
    /// The "under attack" switch.
    under_attack: bool,
    /// Backends the old process's health checks had marked down: the new
    /// process starts them down (they come back after `rise` passing
    /// checks), so no session is placed on a dead backend meanwhile.
    unhealthy: Vec<String>,
    /// engine.io sessions and their backends (for Socket.IO clients
    /// without a session key).
    sids: Vec<(String, String, Vec<Vec<u8>>)>,
}

impl CarriedState {
    fn of(operator: &Operator, sids: &SidTable) -> CarriedState {
        CarriedState {
            sids: sids.export(),
            drained: operator
                .backends()
                .load()
                .backends
                .iter()
                .filter(|backend| backend.is_draining())
                .map(|backend| backend.id.clone())
                .collect(),
            under_attack: operator.limits().is_under_attack(),
            unhealthy: operator
                .backends()
                .load()
                .backends
                .iter()
                .filter(|backend| !backend.is_healthy())
                .map(|backend| backend.id.clone())
                .collect(),
        }
    }
}

/// New process to old.
#[derive(Debug, Serialize, Deserialize)]
enum ToOld {
    /// Serving: accepting on every listener, the admin API up.
    Ready { pid: u32 },
    /// Not taking over; the old process keeps serving.
    Refused { reason: String },
    /// Session `id` runs here now, or was refused (and stays there, or
    /// moves first).
    SessionAnswer { id: u64, refused: Option<Refusal> },
}

/// Write this process's pid to `path` (the process that holds the
/// listeners does).
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, format!("{}\n", std::process::id()))?;
    std::fs::rename(&temporary, path)
}

/// Remove the pid file if it still names this process.
pub fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Tell systemd (when it started this process with `NOTIFY_SOCKET`) that
/// this process is the service's main process and ready.
pub fn notify_systemd_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("MAINPID={}\nREADY=1\n", std::process::id());
    if let Err(error) = send_notify(&socket, message.as_bytes()) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

fn send_notify(socket: &std::ffi::OsStr, message: &[u8]) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let bytes = socket.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name)?,
        None => UnixAddr::from_pathname(Path::new(socket))?,
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.send_to_addr(message, &address)?;
    Ok(())
}
