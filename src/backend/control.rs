//! How the rest of the router reaches a live session: its control cell,
//! where a move request waits (left by a drain, a removal or a health
//! check through the backend's registry), and why a session leaves its
//! backend. A leaf: the backend registry and the session both use it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// Why a session leaves its backend (`wsrouter_migrations_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MigrationReason {
    /// The backend connection failed without a close frame.
    UpstreamLost = 1,
    /// The backend closed with 1001, 1011, 1012, 1013 or 1014.
    UpstreamClosed = 2,
    /// Active health checks marked the backend down.
    Health = 3,
    /// An operator drained the backend.
    Drain = 4,
    /// A reload removed the backend from the configuration.
    Removed = 5,
    /// Client messages waited for the backend and its watermark did not
    /// move for `migration.stall_timeout`: it is hung.
    Stalled = 6,
    /// Not a move: the router is being upgraded, and the session goes to
    /// the new process, on the same backend connection.
    HandOver = 7,
}

impl MigrationReason {
    fn from_code(code: u8) -> Option<MigrationReason> {
        Some(match code {
            1 => MigrationReason::UpstreamLost,
            2 => MigrationReason::UpstreamClosed,
            3 => MigrationReason::Health,
            4 => MigrationReason::Drain,
            5 => MigrationReason::Removed,
            6 => MigrationReason::Stalled,
            7 => MigrationReason::HandOver,
            _ => return None,
        })
    }

    pub fn as_label(self) -> &'static str {
        match self {
            MigrationReason::UpstreamLost => "upstream_lost",
            MigrationReason::UpstreamClosed => "upstream_closed",
            MigrationReason::Health => "health",
            MigrationReason::Drain => "drain",
            MigrationReason::Removed => "removed",
            MigrationReason::Stalled => "stalled",
            MigrationReason::HandOver => "hand_over",
        }
    }

    /// Planned moves are the router's decision while the backend connection
    /// still works: the old connection is closed cleanly once the new one is
    /// ready, and when no other backend takes the session it stays.
    pub fn is_planned(self) -> bool {
        matches!(
            self,
            MigrationReason::Drain | MigrationReason::Removed | MigrationReason::Health
        )
    }

    /// Whether the last forwarded messages may have died with the backend:
    /// after a failure, or when health checks say it is broken.
    pub fn replays(self) -> bool {
        !matches!(
            self,
            MigrationReason::Drain | MigrationReason::Removed | MigrationReason::HandOver
        )
    }
}

/// How the rest of the router reaches a live session: it leaves a request
/// to move here (shared with the backend's registry) and the session's
/// relay picks it up. One request waits at a time. A few bytes per session,
/// where a channel would cost a few hundred.
#[derive(Debug, Default)]
pub struct Control {
    /// 0 when nothing waits, else a [`MigrationReason`].
    request: AtomicU8,
    waker: AtomicWaker,
    /// At an upgrade: 0 not asked yet, [`OFFERING`] while the session
    /// offers itself to the new process, [`STAYS`] when it stays in this
    /// one (its TLS state cannot move, or the new process refused it).
    upgrade: AtomicU8,
}

/// Bits of `Control::upgrade`.
const OFFERING: u8 = 1;
const STAYS: u8 = 2;
const MOVED: u8 = 4;

impl Control {
    /// Ask the session to leave its backend; false when a request was
    /// already waiting.
    pub fn request_move(&self, reason: MigrationReason) -> bool {
        let placed = self
            .request
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if placed {
            self.waker.wake();
        }
        placed
    }

    /// Whether a request waits (a cheap look, for a poller whose waker is
    /// already registered).
    pub fn has_request(&self) -> bool {
        self.request.load(Ordering::Acquire) != 0
    }

    /// At an upgrade, this session stays in this process.
    pub fn stay(&self) {
        self.upgrade.fetch_or(STAYS, Ordering::AcqRel);
    }

    /// Whether this session stays in this process at an upgrade.
    pub fn stays(&self) -> bool {
        self.upgrade.load(Ordering::Acquire) & STAYS != 0
    }

    /// The session offers itself to an upgrade's new process (`true`), or
    /// may be asked again (`false`).
    pub fn set_offering(&self, offering: bool) {
        if offering {
            self.upgrade.fetch_or(OFFERING, Ordering::AcqRel);
        } else {
            self.upgrade.fetch_and(!OFFERING, Ordering::AcqRel);
        }
    }

    /// Whether an upgrade should ask this session (neither offering itself
    /// nor staying).
    pub fn may_be_asked(&self) -> bool {
        self.upgrade.load(Ordering::Acquire) & (OFFERING | STAYS) == 0
    }

    /// The new process does not know this session's backend: true the
    /// first time (the session moves to another backend, then is asked
    /// again), false after (it stays).
    pub fn move_before_hand_over(&self) -> bool {
        let before = self.upgrade.fetch_or(MOVED, Ordering::AcqRel);
        before & MOVED == 0
    }

    /// Take the waiting request, or be woken when one comes.
    pub fn poll_move(&self, cx: &mut Context<'_>) -> Poll<MigrationReason> {
        self.waker.register(cx.waker());
        match MigrationReason::from_code(self.request.swap(0, Ordering::AcqRel)) {
            Some(reason) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_request_waits_once_and_is_taken_once() {
        let control = Control::default();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(control.poll_move(&mut cx), Poll::Pending);
        assert!(control.request_move(MigrationReason::Drain));
        assert!(!control.request_move(MigrationReason::Health));
        assert_eq!(
            control.poll_move(&mut cx),
            Poll::Ready(MigrationReason::Drain)
        );
        assert_eq!(control.poll_move(&mut cx), Poll::Pending);
        // At an upgrade: asked until it offers itself; moved once for a
        // backend the new process lacks, then it stays.
        assert!(control.may_be_asked());
        control.set_offering(true);
        assert!(!control.may_be_asked());
        control.set_offering(false);
        assert!(control.move_before_hand_over());
        assert!(control.may_be_asked() && !control.move_before_hand_over());
        control.stay();
        assert!(control.stays() && !control.may_be_asked());
        for code in 1..=7 {
            let reason = MigrationReason::from_code(code).unwrap();
            assert_eq!(reason as u8, code);
        }
    }
}
