//! The router's shutdown as every task sees it: one phase watch
//! ([`Phase`]: running, draining, closing, done) that only moves forward,
//! and the tracker that tells the router when every session has ended. A
//! leaf: anything may wait on it; only `app` moves the phase.

use tokio::sync::{mpsc, watch};

/// Where the router is in its life. Each phase includes the ones before
/// it: a task waiting for `Closing` also wakes at `Done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Accepting connections and relaying.
    Running,
    /// Every listener is closed; live sessions relay for the grace period.
    /// `/readyz` fails from here on.
    Draining,
    /// Sessions close both sides with 1001; background tasks stop.
    Closing,
    /// Every session ended, or the router gave up waiting: the session
    /// threads exit.
    Done,
}

/// The one handle that moves the phase (held by `app`).
#[derive(Debug)]
pub struct Phases(watch::Sender<Phase>);

impl Default for Phases {
    fn default() -> Self {
        Phases(watch::Sender::new(Phase::Running))
    }
}

impl Phases {
    /// A view of the phase for a task.
    pub fn watch(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }

    /// Move on to `to`; a phase already reached or passed stays.
    pub fn advance(&self, to: Phase) {
        self.0.send_if_modified(|phase| {
            let later = *phase < to;
            if later {
                *phase = to;
            }
            later
        });
    }
}

/// A task's view of the phase; cheap to clone. When the [`Phases`] is
/// gone, every wait ends.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<Phase>);

impl Shutdown {
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    /// Resolves once the phase is `phase` or later.
    pub async fn reached(&mut self, phase: Phase) {
        let _ = self.0.wait_for(|now| *now >= phase).await;
    }

    /// Resolves once sessions and background tasks must stop.
    pub async fn closing(&mut self) {
        self.reached(Phase::Closing).await;
    }

    /// Whether the phase moved since this view was made: a probe that
    /// costs an atomic load, for the relay's hot path.
    pub fn has_changed(&self) -> bool {
        self.0.has_changed().unwrap_or(true)
    }
}

/// Every session holds a clone for as long as it lives.
#[derive(Debug, Clone)]
pub struct SessionTracker(#[allow(dead_code)] mpsc::Sender<()>);

/// Learns when every [`SessionTracker`] is gone.
#[derive(Debug)]
pub struct SessionsEnded(mpsc::Receiver<()>);

/// A tracker for sessions, and its end.
pub fn track_sessions() -> (SessionTracker, SessionsEnded) {
    let (tracker, ended) = mpsc::channel(1);
    (SessionTracker(tracker), SessionsEnded(ended))
}

impl SessionsEnded {
    /// Resolves once every tracker clone is dropped.
    pub async fn wait(&mut self) {
        let _ = self.0.recv().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_phase_only_moves_forward_and_wakes_later_waits() {
        let phases = Phases::default();
        let mut view = phases.watch();
        assert_eq!(view.phase(), Phase::Running);
        phases.advance(Phase::Closing);
        phases.advance(Phase::Draining);
        assert_eq!(view.phase(), Phase::Closing);
        // A wait for an earlier phase ends at once.
        view.reached(Phase::Draining).await;
        drop(phases);
        // With the mover gone, every wait ends.
        view.reached(Phase::Done).await;
    }

    #[tokio::test]
    async fn sessions_end_when_the_last_tracker_is_dropped() {
        let (tracker, mut ended) = track_sessions();
        let session = tracker.clone();
        drop(tracker);
        let wait = tokio::time::timeout(std::time::Duration::from_millis(20), ended.wait());
        assert!(wait.await.is_err(), "ended while a session lives");
        drop(session);
        ended.wait().await;
    }
}
