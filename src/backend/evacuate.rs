//! The paced mover: asks every session on a backend that should be left
//! (removed, draining, unhealthy) to move, at the configured rate with
//! jitter, through the control cells the backend's session slots
//! registered. One evacuation runs per backend at a time.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::backend::Backend;
use crate::backend::control::{Control, MigrationReason};

impl Backend {
    /// Ask every session on this backend to move, at most `rate` per second
    /// with jitter, for as long as the backend should be left: removed,
    /// draining or unhealthy, in that order of precedence (one that is
    /// undrained or healthy again keeps the sessions not yet moved). One
    /// evacuation runs at a time; a trigger that arrives while it runs is
    /// picked up by it. Sessions that could not move are asked again after
    /// a pause.
    pub fn evacuate(self: &Arc<Self>, rate: u32) {
        if self.evacuating.swap(true, Ordering::AcqRel) {
            return;
        }
        let backend = Arc::clone(self);
        tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            loop {
                backend.evacuation_pass(interval).await;
                backend.evacuating.store(false, Ordering::Release);
                // A trigger may have come in just as the pass ended.
                let again = backend.leaving_reason().is_some() && !backend.registry.is_empty();
                if !again || backend.evacuating.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
    }

    /// Ask up to `most` of this backend's sessions that may move to an
    /// upgrade's new process, and are not offering themselves already, to
    /// hand themselves over; returns how many were asked (one with another
    /// request waiting hears it the next time).
    pub fn ask_to_hand_over(&self, most: usize) -> usize {
        let mut asked = 0;
        for entry in self.registry.iter() {
            if asked >= most {
                break;
            }
            let control = entry.value();
            if control.may_be_asked() && control.request_move(MigrationReason::HandOver) {
                asked += 1;
            }
        }
        asked
    }

    async fn evacuation_pass(&self, interval: Duration) {
        if let Some(reason) = self.leaving_reason() {
            tracing::info!(backend = %self.id, reason = reason.as_label(), sessions = self.sessions(), "moving sessions off backend");
        }
        while self.leaving_reason().is_some() && !self.registry.is_empty() {
            let targets: Vec<(u64, Arc<Control>)> = self
                .registry
                .iter()
                .map(|e| (*e.key(), e.value().clone()))
                .collect();
            for (id, control) in targets {
                let Some(reason) = self.leaving_reason() else {
                    break;
                };
                if !self.registry.contains_key(&id) {
                    continue;
                }
                if control.request_move(reason) {
                    // Jitter in [0.5, 1.5) of the interval: an even pace on
                    // average, without lock-step reconnect waves.
                    let jitter = 0.5 + rand::random::<f64>();
                    tokio::time::sleep(interval.mul_f64(jitter)).await;
                }
            }
            // Give the last sessions time to move before looking again.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
