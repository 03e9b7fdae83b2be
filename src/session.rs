//! One session, from its 101 to its close: the relay, and moving to
//! another backend when its backend fails, drains or is removed, as often
//! as it must (within the poison and loop bounds). The connection up to the
//! 101 is the connection module's; the dial policy is the session's
//! [`Dialer`]'s.
//!
//! Each session is one task that owns its state ([`Session`]). It talks to
//! the rest of the router through the shared [`Router`] handle and its own
//! control cell, registered with whichever backend it is on. Its
//! [`SessionSlot`] keeps the backend's session count exact whichever way the
//! task ends.

pub mod handover;
pub mod relay;
pub mod replay;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::backend::control::MigrationReason;
use crate::backend::{Backends, SessionSlot};
use crate::config::Config;
use crate::limits::{Admission, Limits, MessageBudget};
use crate::memory::{MemoryBudget, SessionMemory};
use crate::metrics::{self as m, CloseReason, ReplayKind};
use crate::shutdown::{SessionTracker, Shutdown};
use crate::socketio::resume;
use crate::socketio::{EngineIo, SidTable};
use crate::tls::{ClientStream, Terminator};
use crate::upstream::Upstream;
use crate::upstream::dialer::{Connected, Dialer, FIRST_REDIAL_PAUSE, LAST_REDIAL_PAUSE, Move};
use crate::wire::close::{self as code, Fault};
use crate::wire::frame::{self, Unit};
use crate::wire::peer::{Peer, ReadEnd, close};
use handover::HandOver;
use relay::{RelayContext, RelayEnd, TrafficCounters};
use replay::{MoveChain, PendingQueue, ReplayWindow};

/// Room a moving session must find in the memory budget before each read
/// from its client: what one read may add to its buffer (see
/// [`Peer::read_growth`]).
const MOVE_READ_RESERVE: usize = 64 * 1024;

/// A backend that fails this soon after receiving a client message is
/// suspected of failing because of it (a poison message).
const SUSPECT_WITHIN: Duration = Duration::from_secs(1);

/// What every session needs from the router; cheap to clone.
#[derive(Clone)]
pub struct Router {
    /// The current configuration; a reload swaps it.
    pub config: Arc<ArcSwap<Config>>,
    pub backends: Backends,
    /// The router's phase: sessions close with 1001 at `Closing`.
    pub shutdown: Shutdown,
    /// Every connection holds a clone (inside its `Router`); the router
    /// knows all sessions ended when every clone is dropped.
    pub sessions: SessionTracker,
    pub counters: TrafficCounters,
    /// Source of session ids (registry keys, never exported).
    pub next_session_id: Arc<AtomicU64>,
    /// Edge limits shared by every connection.
    pub limits: Limits,
    /// Set when the public listener speaks TLS (`[tls]`).
    pub tls: Option<Terminator>,
    /// engine.io sessions and their backends, for Socket.IO clients
    /// without a session key.
    pub sids: SidTable,
    /// What sessions hold in memory, against `limits.max_buffered_bytes`.
    pub memory: MemoryBudget,
    /// Where sessions go at an upgrade (open only then).
    pub handover: handover::Outbox,
}

impl Router {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }
}

/// An established session: the client, its current backend, and what it
/// needs to move.
pub(crate) struct Session {
    router: Router,
    client: Peer<ClientStream>,
    /// The claim on the current backend (and its control registration).
    slot: SessionSlot,
    /// Where and how the session dials a backend when it moves.
    dialer: Dialer,
    window: ReplayWindow,
    /// Per-session message and byte rates, when configured.
    budget: Option<MessageBudget>,
    /// What the session holds, against the process budget.
    memory: SessionMemory,
    /// The backends it left lately, against move loops.
    moves: MoveChain,
    /// This session's place under the per-IP and global caps.
    _admission: Admission,
    /// A Socket.IO session: its client's namespace CONNECT packets, sent
    /// again to each new backend.
    engineio: Option<Box<EngineIo>>,
}

/// How a session came to this process, for its first relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Its client's upgrade was accepted here.
    Accepted,
    /// An upgrade's old process handed it over.
    HandedOver,
}

impl Session {
    /// A session on the backend of `slot`, whose client just got its 101.
    pub(crate) fn start(
        router: Router,
        client: Peer<ClientStream>,
        slot: SessionSlot,
        dialer: Dialer,
        admission: Admission,
        engineio: Option<EngineIo>,
        acknowledges: bool,
    ) -> Box<Session> {
        let config = router.config();
        let migration = &config.migration;
        let mut window = ReplayWindow::new(
            migration.replay_max_messages,
            migration.replay_max_bytes,
            migration.replay_max_age,
        );
        window.set_ping_interval(migration.watermark_interval);
        window.start_connection(acknowledges);
        Box::new(Session {
            budget: router.limits.message_budget(),
            memory: router.memory.open(dialer.session_id()),
            _admission: admission,
            engineio: engineio.map(Box::new),
            window,
            moves: MoveChain::default(),
            router,
            client,
            slot,
            dialer,
        })
    }

    /// Relay, moving to another backend whenever the current one fails or
    /// is drained, until the session ends.
    pub(crate) async fn run(mut self: Box<Self>, mut upstream: Upstream, arrival: Arrival) {
        let mut arrival = Some(arrival);
        let mut shutdown = self.router.shutdown.clone();
        loop {
            let config = self.router.config();
            let end = relay::relay(
                &mut self.client,
                &mut upstream.peer,
                RelayContext {
                    config: &config.relay,
                    migration: &config.migration,
                    counters: &self.router.counters,
                    shutdown: &mut shutdown,
                    control: self.dialer.control(),
                    window: &mut self.window,
                    budget: self.budget.as_mut(),
                    memory: &mut self.memory,
                    connects: self.engineio.as_deref_mut().map(|e| &mut e.connects),
                    first_tick: match arrival.take() {
                        // Spread out: every session an upgrade handed over
                        // starts its relay at the same moment.
                        Some(Arrival::HandedOver) => config
                            .relay
                            .ping_interval
                            .mul_f64(rand::random_range(0.05..1.0)),
                        _ => config.relay.ping_interval,
                    },
                },
            )
            .await;
            let reason = match end {
                RelayEnd::MigrateRequested(MigrationReason::HandOver) => {
                    // An upgrade: the new process takes the session, or it
                    // relays on here, or it first leaves a backend the new
                    // configuration removed.
                    match self.hand_over(&upstream).await {
                        HandOver::Taken => return,
                        HandOver::Stays => continue,
                        HandOver::MoveFirst => MigrationReason::Removed,
                    }
                }
                RelayEnd::BackendLost => MigrationReason::UpstreamLost,
                RelayEnd::BackendClosed(Some(ref frame)) if code::is_migrating(frame.code) => {
                    MigrationReason::UpstreamClosed
                }
                RelayEnd::MigrateRequested(reason) => reason,
                RelayEnd::BackendClosed(frame) => {
                    // 1000, 1008 and the rest end the session, as the backend meant.
                    self.client
                        .finish_close(frame.as_ref(), config.relay.close_timeout)
                        .await;
                    CloseReason::BackendClose.count();
                    return;
                }
                end => {
                    tracing::debug!(?end, "session ended");
                    if let Some(reason) = end.close_reason() {
                        reason.count();
                    }
                    return;
                }
            };
            if let Err(close_reason) = self.may_move(reason, &config).await {
                close_reason.count();
                return;
            }
            // Boxed: a move is rare and its dial state is large; inline it
            // would make every idle session's task that much bigger.
            upstream = match Box::pin(self.migrate(upstream, reason, &config)).await {
                Ok(next) => next,
                Err(close_reason) => {
                    close_reason.count();
                    return;
                }
            };
        }
    }

    /// Whether the session may move on from a backend it leaves for
    /// `reason`, and the backend's share of the blame. After a failure,
    /// the client messages the backend received within [`SUSPECT_WITHIN`]
    /// get a strike; one that backends failed right after on
    /// `max_redeliveries` backends is a poison message, and is not replayed
    /// again: the client is closed with 1011. So is a session that moved
    /// `max_moves` times within `moves_window` (a loop). A failure right
    /// after a message that already broke another backend is the
    /// message's, not the backend's: passive health does not count it.
    async fn may_move(
        &mut self,
        reason: MigrationReason,
        config: &Config,
    ) -> Result<(), CloseReason> {
        let now = Instant::now();
        let failed = matches!(
            reason,
            MigrationReason::UpstreamLost
                | MigrationReason::UpstreamClosed
                | MigrationReason::Stalled
        );
        let (strikes, size) = if failed {
            self.window.strike_recent(now, SUSPECT_WITHIN)
        } else {
            (0, 0)
        };
        if !reason.is_planned() && strikes <= 1 {
            self.slot.backend().report_failure(&config.passive_health);
        }
        let migration = &config.migration;
        let (close_reason, why) = if strikes >= migration.max_redeliveries {
            tracing::warn!(
                key_hash = %format_args!("{:016x}", self.dialer.placement().key_hash()),
                backend = %self.slot.backend().id,
                message_bytes = size,
                backends_failed = strikes,
                "poison message: backends failed right after receiving it; closing the session"
            );
            (
                CloseReason::PoisonMessage,
                "message refused by the backends",
            )
        } else if self.moves.recent(now, migration.moves_window) >= migration.max_moves as usize {
            tracing::warn!(
                key_hash = %format_args!("{:016x}", self.dialer.placement().key_hash()),
                moves = migration.max_moves,
                window = ?migration.moves_window,
                "move loop: the session moved too often; closing it"
            );
            (
                CloseReason::MigrationLoop,
                "session could not be kept on any backend",
            )
        } else {
            return Ok(());
        };
        self.client
            .finish_close(
                Some(&close(code::INTERNAL_ERROR, why)),
                config.relay.close_timeout,
            )
            .await;
        Err(close_reason)
    }

    /// Move from `old` to another backend and return the new connection.
    /// Client messages that arrive meanwhile are queued; after an abrupt
    /// failure the replay window goes first. A planned move keeps `old`
    /// open until the new one is ready, and returns it when no other
    /// backend takes the session; an abrupt one drops it at once (its
    /// socket is dead, and thousands of them would hold the router's file
    /// descriptors through a failover) and closes the client with 1013
    /// when no backend takes it in time.
    async fn migrate(
        &mut self,
        old: Upstream,
        reason: MigrationReason,
        config: &Config,
    ) -> Result<Upstream, CloseReason> {
        let mut kept = reason.is_planned().then_some(old);
        let started = Instant::now();
        let from = self.slot.backend().id.clone();
        // What kind of replay this is, for the metrics: after the old
        // backend's acknowledgements, or after its watermark (the first
        // `margin` of them it had read).
        let old_acknowledges = self.window.acknowledges();
        let margin = self.window.read_len();
        // After a failure, what the backend had not read or acknowledged
        // is replayed. A planned move leaves the old backend open: it
        // replays nothing, unless the backend acknowledges, when what it
        // has not acknowledged by the end of the hand-over is replayed.
        let mut replay = if reason.replays() {
            self.window.take_fresh_struck(started)
        } else {
            if !self.window.acknowledges() {
                self.window.clear();
            }
            Vec::new()
        };
        let replayed = if reason.replays() {
            replay.len()
        } else {
            self.window.len()
        };
        // The second move of a chain and those after it wait, as dial
        // rounds do: a loop that escaped the poison check still crawls.
        let earlier = self.moves.recent(started, config.migration.moves_window);
        let first_pause = match earlier {
            0 => Duration::ZERO,
            n => FIRST_REDIAL_PAUSE
                .saturating_mul(1 << (n - 1).min(10))
                .min(LAST_REDIAL_PAUSE),
        };
        self.moves.record(started, &from);
        tracing::debug!(backend = %from, reason = reason.as_label(), replay = replay.len(), "moving session");
        let mut queue = PendingQueue::new(config.migration.queue_max_bytes);
        let deadline = started + config.migration.timeout;
        let dialer = self.dialer.clone();
        let dial = dialer.moved(Move {
            avoid: self.moves.backends(),
            replayed,
            planned: reason.is_planned(),
            first_pause,
            deadline,
        });
        tokio::pin!(dial);
        let close_timeout = config.relay.close_timeout;

        // Meanwhile the client's messages queue up, and what the old
        // backend sends (a planned move keeps it open) still goes out to
        // the client, whole messages only.
        let mut old_readable = kept.is_some();
        // Once the new backend is ready, a planned move closes the old one
        // with 1001 and keeps delivering what it sends until its close
        // handshake completes (bounded by the close timeout): the client
        // gets the old backend's messages, then the new one's, none lost.
        let mut ready: Option<Connected> = None;
        let mut handover_until = started;
        let moved = loop {
            // The session cannot wait for room while it moves: when the
            // process budget has none for what the next read may add, the
            // session is closed.
            let held = self.client.held_bytes() + self.window.held_bytes() + queue.bytes();
            if !self.memory.may_hold(held, MOVE_READ_RESERVE) {
                break None;
            }
            let unit = tokio::select! {
                moved = &mut dial, if ready.is_none() => match (moved, kept.as_mut()) {
                    (Some(connected), Some(old)) if old_readable => {
                        old.peer.queue_close(&close(code::GOING_AWAY, "session moved"));
                        ready = Some(connected);
                        handover_until = Instant::now() + close_timeout;
                        continue;
                    }
                    (moved, _) => break Some(moved),
                },
                _ = tokio::time::sleep_until(handover_until), if ready.is_some() => break Some(ready.take()),
                unit = self.client.next_unit() => unit,
                from_old = next_from(kept.as_mut().filter(|_| old_readable)) => {
                    let old = kept.as_mut().expect("only read while kept");
                    match from_old {
                        Ok(Unit::Message { len, .. }) => self.client.queue(old.peer.reader.take(len)),
                        // What it acknowledges during the hand-over is not
                        // replayed (a bad acknowledgement is ignored: it is
                        // being left).
                        Ok(Unit::Pong { len, .. }) => {
                            if let Some(frame::Ack::Count(count)) = frame::ack_of(&old.peer.reader.take(len)) {
                                let _ = self.window.acknowledge(count, Instant::now());
                            }
                        }
                        Ok(unit @ Unit::Ping { .. }) => old.peer.reader.skip(unit.len()),
                        // Its close handshake is over: on to the new one.
                        Ok(Unit::Close { .. }) | Err(_) if ready.is_some() => break Some(ready.take()),
                        // It is being left anyway; it is closed (or found
                        // dead by the relay, if the session stays) later.
                        Ok(Unit::Close { .. }) | Err(_) => old_readable = false,
                    }
                    continue;
                }
            };
            let ended = match unit {
                Ok(Unit::Message { len, .. }) => {
                    if queue.push(self.client.reader.take(len)).is_ok() {
                        continue;
                    }
                    tracing::warn!("client sent more than the migration queue holds");
                    self.client
                        .finish_close(
                            Some(&close(code::TRY_AGAIN_LATER, "try again later")),
                            close_timeout,
                        )
                        .await;
                    CloseReason::MigrationQueueFull
                }
                // Nobody to answer a ping while there is no backend.
                Ok(unit @ (Unit::Ping { .. } | Unit::Pong { .. })) => {
                    self.client.reader.skip(unit.len());
                    continue;
                }
                Ok(Unit::Close { frame, .. }) => {
                    self.client.echo_close(frame.as_ref(), close_timeout).await;
                    if let Some(old) = kept.as_mut() {
                        old.peer.finish_close(frame.as_ref(), close_timeout).await;
                    }
                    return Err(CloseReason::ClientClose);
                }
                Err(ReadEnd::Violation(violation)) => {
                    let fault = Fault::from(violation);
                    self.client
                        .finish_close(Some(&close(fault.code(), fault.reason())), close_timeout)
                        .await;
                    fault.close_reason()
                }
                Err(ReadEnd::Lost) => CloseReason::ClientLost,
            };
            if let Some(old) = kept.as_mut() {
                old.peer
                    .finish_close(
                        Some(&close(code::GOING_AWAY, "client went away")),
                        close_timeout,
                    )
                    .await;
            }
            return Err(ended);
        };
        let Some(moved) = moved else {
            tracing::warn!("memory budget reached while the session moves; closing it");
            self.client
                .finish_close(
                    Some(&close(code::TRY_AGAIN_LATER, "try again later")),
                    close_timeout,
                )
                .await;
            if let Some(old) = kept.as_mut() {
                old.peer
                    .finish_close(
                        Some(&close(code::GOING_AWAY, "client went away")),
                        close_timeout,
                    )
                    .await;
            }
            return Err(CloseReason::MemoryPressure);
        };

        let Some(Connected { mut upstream, slot }) = moved else {
            if let Some(mut old) = kept {
                tracing::debug!(backend = %from, reason = reason.as_label(), "no other backend took the session; it stays");
                metrics::counter!(m::MIGRATIONS_STAYED_TOTAL, "reason" => reason.as_label())
                    .increment(1);
                send_in_order(&mut old, &mut self.window, Vec::new(), queue.drain()).await;
                return Ok(old);
            }
            tracing::warn!(backend = %from, "no backend took the session in time");
            self.client
                .finish_close(
                    Some(&close(code::TRY_AGAIN_LATER, "no backend available")),
                    close_timeout,
                )
                .await;
            return Err(CloseReason::MigrationFailed);
        };

        self.slot = slot;
        if !reason.replays() && self.window.acknowledges() {
            replay = self.window.take_fresh_struck(Instant::now());
        }
        self.window.start_connection(upstream.acknowledges);
        // Closed above when it could still be read; else closed here, aside.
        if let Some(mut old) = kept.filter(|_| !old_readable) {
            tokio::spawn(async move {
                old.peer
                    .finish_close(
                        Some(&close(code::GOING_AWAY, "session moved")),
                        close_timeout,
                    )
                    .await;
            });
        }
        let to = self.slot.backend().id.clone();
        tracing::Span::current().record("backend", to.as_str());
        metrics::counter!(m::MIGRATIONS_TOTAL, "from" => from.clone(), "to" => to.clone(), "reason" => reason.as_label())
            .increment(1);
        let margin = margin.min(replay.len());
        let unread = if old_acknowledges {
            ReplayKind::Unacknowledged
        } else {
            ReplayKind::Unread
        };
        ReplayKind::Margin.count(margin);
        unread.count(replay.len() - margin);
        metrics::histogram!(m::MIGRATION_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::debug!(from = %from, to = %to, reason = reason.as_label(), elapsed = ?started.elapsed(), "session moved");

        let mut queued: Vec<Bytes> = queue.drain().collect();
        if let Some(engineio) = self.engineio.as_deref_mut() {
            // The relay noted the CONNECTs it forwarded; those the client
            // sent during this move, and those it long-polled, are added.
            for frames in &queued {
                engineio.connects.note_in_frames(frames);
            }
            engineio.learn_from_polling(&self.router.sids);
            let connects = &engineio.connects;
            // The new Socket.IO server takes the client before its messages.
            let resumed = resume::resume(
                &mut self.client,
                &mut upstream.peer,
                connects,
                config.migration.timeout,
            )
            .await;
            m::count_socketio_resume(resumed.is_ok());
            if let Err(error) = resumed {
                tracing::warn!(backend = %to, %error, "the Socket.IO session did not resume; closing it");
                self.client
                    .finish_close(
                        Some(&close(code::TRY_AGAIN_LATER, "try again later")),
                        close_timeout,
                    )
                    .await;
                return Err(CloseReason::MigrationFailed);
            }
            replay = resume::replayable(replay, |(frames, _)| frames);
            queued = resume::replayable(queued, |frames| frames);
        }
        // Replays first, then what queued up, in order.
        send_in_order(&mut upstream, &mut self.window, replay, queued.into_iter()).await;
        Ok(upstream)
    }
}

/// Forward to a backend, in order, the replayed messages (each with its
/// strikes) and then the queued ones, in one write, recording each in the
/// replay window. A failed write is left for the relay to notice; the
/// window then replays these again.
async fn send_in_order(
    upstream: &mut Upstream,
    window: &mut ReplayWindow,
    replay: Vec<(Bytes, u32)>,
    queued: impl Iterator<Item = Bytes>,
) {
    let now = Instant::now();
    let mut batch = BytesMut::new();
    let mut dropped = 0;
    for (message, strikes) in replay {
        batch.extend_from_slice(&message);
        dropped += window.push_replayed(&message, strikes, now);
    }
    let replayed = batch.len();
    let mut count = 0;
    for message in queued {
        batch.extend_from_slice(&message);
        count += 1;
    }
    dropped += window.push(&batch[replayed..], count, now);
    metrics::counter!(m::REPLAY_DROPPED_TOTAL).increment(dropped as u64);
    if !batch.is_empty() {
        let _ = upstream.peer.send(batch.freeze()).await;
    }
}

/// The next unit from the backend a planned move is leaving; never, without
/// one.
async fn next_from(old: Option<&mut Upstream>) -> Result<Unit, ReadEnd> {
    match old {
        Some(old) => old.peer.next_unit().await,
        None => std::future::pending().await,
    }
}
