//! Migration bookkeeping (why a session moves is
//! [`crate::backend::control::MigrationReason`]): the replay window of client
//! messages already forwarded (with the backend's read watermark or
//! acknowledgements, and the strikes that catch a poison message), the
//! queue of client messages that arrive while the session re-dials, and the
//! chain of recent moves (which backends to avoid, when a session loops).
//!
//! The window and the queue hold client messages as the frames the client sent (masked, which
//! any backend accepts), so a replay or a queued message is written to the
//! new backend as it is. Both are pure data structures with their own
//! bounds; the session task decides when to fill and empty them. See
//! the README, "Live migration".

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::wire::frame::{FrameReader, Unit};

/// The client messages forwarded to the backend that may still be needed
/// after it fails: every one it has not yet been seen to read, and a margin
/// of those it has. Sent again to the next backend after an abrupt failure.
///
/// **The watermark.** The relay follows the messages it forwards with a
/// watermark ping (see [`crate::wire::frame::watermark_payload`]) carrying the
/// count of messages recorded so far; the backend's pong carries it back
/// once its WebSocket layer has read every one of them
/// ([`ReplayWindow::read_up_to`]). Messages after the watermark are kept
/// whatever their number or age: once they fill `max_bytes`, the relay
/// stops reading from the client ([`ReplayWindow::is_full`]) until the
/// watermark moves, so a slow backend slows its client and never loses its
/// messages. Messages before the watermark were read by the backend's
/// socket layer, perhaps not yet handled by the application: the last
/// `max_messages` of them are kept as a margin, within `max_bytes` and
/// `max_age`. A backend whose watermark does not move while messages wait
/// for it is stalled ([`ReplayWindow::stalled_at`]).
///
/// The relay records what it forwards a batch at a time (the frames one
/// write carried), copied into one ring buffer that is reused as old
/// batches leave: recording costs one copy per write and no allocation or
/// reference count (large batches are kept by reference instead). Batches
/// are split back into messages only to replay.
#[derive(Debug)]
pub struct ReplayWindow {
    /// The frames of the batches held in the ring, oldest first.
    data: VecDeque<u8>,
    batches: VecDeque<Batch>,
    /// Messages in the batches held.
    messages: usize,
    /// Bytes of the frames held (in the ring and shared).
    bytes: usize,
    /// Bytes of the frames held by reference.
    shared_bytes: usize,
    /// Client messages recorded since the session began; each batch's
    /// `end` is this count after it.
    recorded: u64,
    /// Of those, the count the backend was last seen to have read.
    watermark: u64,
    /// The count the last watermark ping carried, and when it was sent.
    pinged: u64,
    pinged_at: Option<Instant>,
    /// Watermark pings go out at most this often...
    ping_interval: Duration,
    /// ...and one should go out now (the relay looks at this flag alone,
    /// so a busy session's messages cost no clock reads).
    ping_ready: bool,
    /// A deadline of [`ReplayWindow::next_deadline`] may have changed since
    /// the relay last looked.
    dirty: bool,
    /// The leading batches the backend has read, and their messages.
    read_batches: usize,
    read_messages: usize,
    /// Bytes of the batches after the watermark.
    unread_bytes: usize,
    /// Since when messages have waited without the watermark moving.
    waiting_since: Option<Instant>,
    /// The backend acknowledges the messages it has finished with: its
    /// acknowledgements are the watermark, and no margin is kept.
    acknowledges: bool,
    /// Messages recorded before the current backend connection began (its
    /// acknowledgements count from there).
    base: u64,
    max_messages: usize,
    max_bytes: usize,
    max_age: Duration,
}

/// A [`ReplayWindow`] as data (for a router upgrade).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowState {
    pub recorded: u64,
    pub watermark: u64,
    pub pinged: u64,
    pub base: u64,
    pub acknowledges: bool,
    pub batches: Vec<BatchState>,
}

/// One batch of a [`WindowState`]; its frames are the next `bytes` bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchState {
    pub bytes: usize,
    pub messages: usize,
    pub end: u64,
    pub strikes: u32,
}

/// Frames forwarded together.
#[derive(Debug)]
struct Batch {
    at: Instant,
    /// The session's count of recorded messages after this batch.
    end: u64,
    /// Backends that failed right after receiving these frames.
    strikes: u32,
    /// Bytes in the ring, or none when the frames are `shared`.
    len: usize,
    messages: usize,
    /// Large frames are kept as the bytes that were written, not copied.
    shared: Option<Bytes>,
}

impl Batch {
    fn bytes(&self) -> usize {
        self.len + self.shared.as_ref().map_or(0, Bytes::len)
    }
}

/// A window buffer at least this big whose live bytes fill under a
/// quarter of it is shrunk (after one large message, say).
const SHRINK_ABOVE: usize = 64 * 1024;

impl ReplayWindow {
    /// A window keeping a margin of `max_messages` read messages, at most
    /// `max_bytes` of frames (the batch that crosses it aside), read ones
    /// no older than `max_age`.
    pub fn new(max_messages: usize, max_bytes: usize, max_age: Duration) -> ReplayWindow {
        ReplayWindow {
            data: VecDeque::new(),
            batches: VecDeque::new(),
            messages: 0,
            bytes: 0,
            shared_bytes: 0,
            recorded: 0,
            watermark: 0,
            pinged: 0,
            pinged_at: None,
            ping_interval: crate::config::DEFAULT_WATERMARK_INTERVAL,
            ping_ready: false,
            dirty: false,
            read_batches: 0,
            read_messages: 0,
            unread_bytes: 0,
            waiting_since: None,
            acknowledges: false,
            base: 0,
            max_messages,
            max_bytes,
            max_age,
        }
    }

    /// Client messages now go to a new backend connection, which
    /// `acknowledges` them or not. Everything recorded before counts as
    /// dealt with (replays are recorded again, after this).
    pub fn start_connection(&mut self, acknowledges: bool) {
        self.acknowledges = acknowledges;
        self.base = self.recorded;
        self.watermark = self.recorded;
        self.pinged = self.recorded;
        self.pinged_at = None;
        self.ping_ready = false;
        self.dirty = true;
    }

    /// Watermark pings at most this often (`migration.watermark_interval`).
    pub fn set_ping_interval(&mut self, interval: Duration) {
        self.ping_interval = interval;
    }

    /// Whether the current backend acknowledges messages.
    pub fn acknowledges(&self) -> bool {
        self.acknowledges
    }

    /// An acknowledging backend has finished with `count` messages on this
    /// connection. Returns how many that acknowledged anew; an error when
    /// it is fewer than it acknowledged before, or more than it was sent.
    pub fn acknowledge(&mut self, count: u64, now: Instant) -> Result<u64, AckError> {
        let upto = self.base.checked_add(count).ok_or(AckError::TooMany)?;
        if upto < self.watermark {
            return Err(AckError::Decreasing);
        }
        if upto > self.recorded {
            return Err(AckError::TooMany);
        }
        let before = self.watermark;
        self.advance_to(upto, now);
        Ok(upto - before)
    }

    /// The margin of read messages kept: none when the backend says what
    /// it has finished with.
    fn margin(&self) -> usize {
        if self.acknowledges {
            0
        } else {
            self.max_messages
        }
    }

    /// Remember `frames`, whole units holding `messages` data messages (and
    /// perhaps pings and pongs), as they are forwarded `now`. Returns how
    /// many read messages of the margin the byte bound made the window let
    /// go of.
    pub fn push(&mut self, frames: &[u8], messages: usize, now: Instant) -> usize {
        self.push_batch(frames, None, messages, now)
    }

    /// As [`ReplayWindow::push`], keeping `frames` themselves (for large
    /// ones, whose copy would cost more than the reference). The caller
    /// makes sure `frames` pins no allocation much bigger than itself.
    pub fn push_shared(&mut self, frames: Bytes, messages: usize, now: Instant) -> usize {
        self.push_batch(&[], Some(frames), messages, now)
    }

    fn push_batch(
        &mut self,
        frames: &[u8],
        shared: Option<Bytes>,
        messages: usize,
        now: Instant,
    ) -> usize {
        if messages == 0 {
            return 0;
        }
        let size = frames.len() + shared.as_ref().map_or(0, Bytes::len);
        // Read batches leave once later read ones cover the margin, or for
        // the byte bound; unread ones never do.
        let mut dropped = 0;
        let margin = self.margin();
        while self.read_batches > 0 {
            let oldest = &self.batches[0];
            let margin_covered = self.read_messages - oldest.messages >= margin;
            if !margin_covered && self.bytes + size <= self.max_bytes {
                break;
            }
            if !margin_covered {
                dropped += oldest.messages;
            }
            self.pop_oldest();
        }
        if self.data.capacity() > SHRINK_ABOVE && self.data.len() < self.data.capacity() / 4 {
            self.data.shrink_to(self.data.len() * 2);
        }
        // The ring grows by doubling, but never past the byte bound.
        let needed = self.data.len() + frames.len();
        if needed > self.data.capacity() {
            let target = (self.data.capacity() * 2).clamp(needed, self.max_bytes.max(needed));
            self.data.reserve_exact(target - self.data.len());
        }
        self.data.extend(frames);
        if let Some(shared) = &shared {
            self.shared_bytes += shared.len();
        }
        self.recorded += messages as u64;
        self.batches.push_back(Batch {
            at: now,
            end: self.recorded,
            strikes: 0,
            len: frames.len(),
            messages,
            shared,
        });
        self.messages += messages;
        self.bytes += size;
        self.unread_bytes += size;
        if self.waiting_since.is_none() {
            // The stall clock starts.
            self.waiting_since = Some(now);
            self.dirty = true;
        }
        if !self.acknowledges {
            let first_unpinged = self.recorded - messages as u64 == self.pinged;
            if self.ping_is_due(now) {
                self.ping_ready = true;
            } else if first_unpinged {
                // A ping falls due later: the relay arms its timer.
                self.dirty = true;
            }
        }
        dropped
    }

    /// Whether a watermark ping should go out at `now`: `ping_interval`
    /// passed since the last one, or the window is half full and the last
    /// one was answered.
    fn ping_is_due(&self, now: Instant) -> bool {
        let urgent = self.unread_bytes >= self.max_bytes / 2 && self.watermark >= self.pinged;
        urgent
            || self
                .pinged_at
                .is_none_or(|at| now >= at + self.ping_interval)
    }

    /// Remember a replayed message, `frames`, with the strikes it carried.
    pub fn push_replayed(&mut self, frames: &[u8], strikes: u32, now: Instant) -> usize {
        let dropped = self.push(frames, 1, now);
        if let Some(batch) = self.batches.back_mut() {
            batch.strikes = strikes;
        }
        dropped
    }

    /// The backend's pong says it has read the first `count` messages
    /// recorded. True when that moved the watermark.
    pub fn read_up_to(&mut self, count: u64, now: Instant) -> bool {
        // An acknowledging backend's watermark is its acknowledgements.
        if self.acknowledges {
            return false;
        }
        self.advance_to(count.min(self.recorded), now)
    }

    fn advance_to(&mut self, count: u64, now: Instant) -> bool {
        if count <= self.watermark {
            return false;
        }
        self.watermark = count;
        while let Some(batch) = self.batches.get(self.read_batches)
            && batch.end <= count
        {
            self.unread_bytes -= batch.bytes();
            self.read_messages += batch.messages;
            self.read_batches += 1;
        }
        self.waiting_since = (self.read_batches < self.batches.len()).then_some(now);
        self.dirty = true;
        if self.has_unpinged() && self.ping_is_due(now) {
            self.ping_ready = true;
        }
        let margin = self.margin();
        while self.read_batches > 0 && self.read_messages - self.batches[0].messages >= margin {
            self.pop_oldest();
        }
        if self.batches.is_empty() {
            self.release();
        }
        true
    }

    /// Whether the messages after the watermark fill the byte bound: the
    /// relay stops reading from the client until the watermark moves.
    pub fn is_full(&self) -> bool {
        self.unread_bytes > 0 && self.unread_bytes >= self.max_bytes
    }

    /// Bytes of the frames after the watermark.
    pub fn unread_bytes(&self) -> usize {
        self.unread_bytes
    }

    /// Whether a watermark ping should go out now (a flag: no clock read).
    pub fn ping_ready(&self) -> bool {
        self.ping_ready
    }

    /// The count for a watermark ping, when one is due at `now` (see
    /// [`ReplayWindow::ping_ready`]; the relay's timer covers the rest), and
    /// the ping counts as sent.
    pub fn take_ping(&mut self, now: Instant) -> Option<u64> {
        if !self.has_unpinged() || !(self.ping_ready || self.ping_is_due(now)) {
            return None;
        }
        self.pinged = self.recorded;
        self.pinged_at = Some(now);
        self.ping_ready = false;
        self.dirty = true;
        Some(self.recorded)
    }

    /// Whether messages wait for a watermark ping (a cheap look).
    pub fn has_unpinged(&self) -> bool {
        self.recorded != self.pinged && !self.acknowledges
    }

    /// Whether a deadline may have moved since the last call (and the
    /// relay should look at [`ReplayWindow::next_deadline`] again).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// When the backend counts as stalled: messages have waited for it,
    /// without the watermark moving, for `stall_timeout`.
    pub fn stalled_at(&self, stall_timeout: Duration) -> Option<Instant> {
        if self.read_batches == self.batches.len() {
            return None;
        }
        self.waiting_since.map(|since| since + stall_timeout)
    }

    /// Start the stall clock again at `now` (the backend may have been held
    /// up by the relay itself).
    pub fn defer_stall(&mut self, now: Instant) {
        if self.waiting_since.is_some() {
            self.waiting_since = Some(now);
            self.dirty = true;
        }
    }

    /// The next moment the relay must look at the window: a watermark ping
    /// falls due, the backend would be stalled, or the oldest read batch
    /// passes the age bound.
    pub fn next_deadline(&self, stall_timeout: Duration) -> Option<Instant> {
        let ping = self
            .has_unpinged()
            .then(|| self.pinged_at.map(|at| at + self.ping_interval))
            .flatten();
        let expiry = (self.read_batches > 0).then(|| self.batches[0].at + self.max_age);
        [ping, self.stalled_at(stall_timeout), expiry]
            .into_iter()
            .flatten()
            .min()
    }

    /// The backend failed at `now`: every message it received within
    /// `suspect_within` before is suspected of killing it, and gets a strike.
    /// Returns the most strikes a message now has (0 when none was that
    /// recent), with the size of that message's batch.
    pub fn strike_recent(&mut self, now: Instant, suspect_within: Duration) -> (u32, usize) {
        let mut worst = (0, 0);
        for batch in self.batches.iter_mut().rev() {
            if now.saturating_duration_since(batch.at) > suspect_within {
                break;
            }
            batch.strikes += 1;
            if batch.strikes > worst.0 {
                worst = (batch.strikes, batch.bytes());
            }
        }
        worst
    }

    fn pop_oldest(&mut self) {
        if let Some(oldest) = self.batches.pop_front() {
            self.messages -= oldest.messages;
            self.bytes -= oldest.bytes();
            if self.read_batches > 0 {
                self.read_batches -= 1;
                self.read_messages -= oldest.messages;
            } else {
                self.unread_bytes -= oldest.bytes();
            }
            if let Some(shared) = &oldest.shared {
                self.shared_bytes -= shared.len();
            }
            self.data.drain(..oldest.len);
        }
    }

    /// Let go of the read batches older than the age bound; an empty
    /// window gives its memory back.
    pub fn expire(&mut self, now: Instant) {
        while self.read_batches > 0
            && now.saturating_duration_since(self.batches[0].at) >= self.max_age
        {
            self.pop_oldest();
            self.dirty = true;
        }
        if self.batches.is_empty() {
            self.release();
        } else if self.data.capacity() > SHRINK_ABOVE && self.data.len() < self.data.capacity() / 4
        {
            self.data.shrink_to(self.data.len() * 2);
        }
    }

    /// The window as data, for a router upgrade: its counts, and each batch
    /// with its frames appended to `frames`. Ages are not kept (a clock
    /// does not cross processes): the new process counts them from when it
    /// takes the session.
    pub fn export(&self, frames: &mut Vec<u8>) -> WindowState {
        let mut at = 0;
        let batches = self
            .batches
            .iter()
            .map(|batch| {
                let start = frames.len();
                frames.extend(self.data.range(at..at + batch.len));
                at += batch.len;
                if let Some(shared) = &batch.shared {
                    frames.extend_from_slice(shared);
                }
                BatchState {
                    bytes: frames.len() - start,
                    messages: batch.messages,
                    end: batch.end,
                    strikes: batch.strikes,
                }
            })
            .collect();
        WindowState {
            recorded: self.recorded,
            watermark: self.watermark,
            pinged: self.pinged,
            base: self.base,
            acknowledges: self.acknowledges,
            batches,
        }
    }

    /// A window as [`ReplayWindow::export`] described it (`frames`: the
    /// batches' frames, in order), under this process's bounds.
    pub fn import(
        state: &WindowState,
        mut frames: &[u8],
        bounds: (usize, usize, Duration),
        now: Instant,
    ) -> Result<ReplayWindow, String> {
        let (max_messages, max_bytes, max_age) = bounds;
        let mut window = ReplayWindow::new(max_messages, max_bytes, max_age);
        window.acknowledges = state.acknowledges;
        let first = state
            .batches
            .first()
            .map_or(state.recorded, |b| b.end - b.messages as u64);
        window.recorded = first;
        window.watermark = first.min(state.watermark);
        window.pinged = window.watermark;
        for batch in &state.batches {
            if batch.bytes > frames.len() || window.recorded + batch.messages as u64 != batch.end {
                return Err("the replay window's batches do not add up".into());
            }
            let (these, rest) = frames.split_at(batch.bytes);
            frames = rest;
            window.push_batch(these, None, batch.messages, now);
            if let Some(last) = window.batches.back_mut() {
                last.strikes = batch.strikes;
            }
        }
        if window.recorded != state.recorded || state.watermark > state.recorded {
            return Err("the replay window's counts do not add up".into());
        }
        window.advance_to(state.watermark, now);
        window.base = state.base;
        window.pinged = state.pinged.min(window.recorded);
        window.dirty = true;
        Ok(window)
    }

    /// Bytes of memory the window holds: its ring's allocation and the
    /// frames it keeps by reference.
    pub fn held_bytes(&self) -> usize {
        self.data.capacity() + self.shared_bytes
    }

    /// The messages to replay, oldest first, each as its frames: the last
    /// `max_messages` the backend read that are still young enough, then
    /// every one after the watermark. Leaves the window empty: they are
    /// pushed again as they are re-sent.
    #[cfg(test)]
    pub fn take_fresh(&mut self, now: Instant) -> Vec<Bytes> {
        self.take_fresh_struck(now)
            .into_iter()
            .map(|(message, _)| message)
            .collect()
    }

    /// As [`ReplayWindow::take_fresh`], each message with its strikes (see
    /// [`ReplayWindow::strike_recent`]), to be pushed again with
    /// [`ReplayWindow::push_replayed`].
    pub fn take_fresh_struck(&mut self, now: Instant) -> Vec<(Bytes, u32)> {
        let data = self.data.make_contiguous();
        let mut offset = 0;
        let (mut read, mut unread) = (Vec::new(), Vec::new());
        for (i, batch) in self.batches.iter().enumerate() {
            let frames = match &batch.shared {
                Some(shared) => &shared[..],
                None => &data[offset..offset + batch.len],
            };
            offset += batch.len;
            let is_read = i < self.read_batches;
            if is_read && now.saturating_duration_since(batch.at) > self.max_age {
                continue;
            }
            let into = if is_read { &mut read } else { &mut unread };
            // Already checked on the way in: only the boundaries are needed.
            let mut reader = FrameReader::client(usize::MAX, frames.to_vec());
            while let Ok(Some(unit)) = reader.next_unit() {
                match unit {
                    Unit::Message { len, .. } => into.push((reader.take(len), batch.strikes)),
                    other => reader.skip(other.len()),
                }
            }
        }
        // The oldest read batch may reach back past the margin.
        read.drain(..read.len().saturating_sub(self.margin()));
        read.append(&mut unread);
        self.clear();
        read
    }

    /// Forget every message held (the count of those recorded goes on).
    pub fn clear(&mut self) {
        self.batches.clear();
        self.messages = 0;
        self.bytes = 0;
        self.shared_bytes = 0;
        self.read_batches = 0;
        self.read_messages = 0;
        self.unread_bytes = 0;
        self.waiting_since = None;
        self.dirty = true;
        self.release();
    }

    /// Give the ring's memory back (it holds nothing).
    fn release(&mut self) {
        self.data = VecDeque::new();
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.messages
    }

    /// Of the messages a replay now would send, those the backend had read
    /// (the margin).
    pub fn read_len(&self) -> usize {
        self.read_messages.min(self.margin())
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// An acknowledgement a backend may not send: the backend is treated as
/// failed for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("an acknowledgement below an earlier one")]
    Decreasing,
    #[error("an acknowledgement of more messages than were sent, or none readable")]
    TooMany,
}

/// A session's recent moves: the backends it left within the moves window,
/// oldest first. A new move avoids them all while another backend is
/// available (a chain never returns to a backend it left), and a session
/// that moved `max_moves` times within the window is in a loop.
#[derive(Debug, Default)]
pub struct MoveChain {
    left: VecDeque<(Instant, String)>,
}

impl MoveChain {
    /// Forget the moves older than `window` before `now`; the moves left.
    pub fn recent(&mut self, now: Instant, window: Duration) -> usize {
        while let Some((at, _)) = self.left.front()
            && now.saturating_duration_since(*at) >= window
        {
            self.left.pop_front();
        }
        self.left.len()
    }

    /// The session left `backend` at `now`.
    pub fn record(&mut self, now: Instant, backend: &str) {
        self.left.push_back((now, backend.to_string()));
    }

    /// The backends left in the chain, the most recent first.
    pub fn backends(&self) -> Vec<String> {
        self.left.iter().rev().map(|(_, id)| id.clone()).collect()
    }
}

/// Client messages held while the session has no backend, bounded in bytes.
#[derive(Debug, Default)]
pub struct PendingQueue {
    items: VecDeque<Bytes>,
    bytes: usize,
    max_bytes: usize,
}

/// The queue's byte bound was crossed: the client gets 1013.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

impl PendingQueue {
    pub fn new(max_bytes: usize) -> PendingQueue {
        PendingQueue {
            items: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn push(&mut self, message: Bytes) -> Result<(), QueueFull> {
        let len = message.len();
        if self.bytes + len > self.max_bytes {
            return Err(QueueFull);
        }
        self.bytes += len;
        self.items.push_back(message);
        Ok(())
    }

    pub fn drain(&mut self) -> impl Iterator<Item = Bytes> + '_ {
        self.bytes = 0;
        self.items.drain(..)
    }

    /// Bytes of the messages held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::wire::frame::{OP_BINARY, OP_PING, encode};

    /// A client's frame, as the window holds it.
    fn frame(opcode: u8, payload: &[u8]) -> Bytes {
        encode(opcode, payload, Some([1, 2, 3, 4]))
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_strikes_the_messages_of_the_last_second_only() {
        let mut w = ReplayWindow::new(64, usize::MAX, Duration::from_secs(10));
        let within = Duration::from_secs(1);
        let start = Instant::now();
        w.push(&frame(OP_BINARY, b"old"), 1, start);
        w.push(
            &frame(OP_BINARY, b"recent"),
            1,
            start + Duration::from_millis(500),
        );
        // 1 s after "recent": it is struck, "old" (1.5 s) is not.
        let failed_at = start + Duration::from_millis(1500);
        assert_eq!(w.strike_recent(failed_at, within).0, 1);
        let struck: Vec<u32> = w
            .take_fresh_struck(failed_at)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(struck, [0, 1]);
        // Strikes travel with a replayed message, and a second failure
        // right after the replay adds one.
        let replayed_at = failed_at + Duration::from_millis(100);
        w.push_replayed(&frame(OP_BINARY, b"recent"), 1, replayed_at);
        assert_eq!(w.strike_recent(replayed_at + within, within).0, 2);
        // A failure a moment later than the bound strikes nothing.
        let later = replayed_at + within + Duration::from_millis(1);
        assert_eq!(w.strike_recent(later, within).0, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exported_window_imports_with_its_counts_strikes_and_frames() {
        let bounds = (2, usize::MAX, Duration::from_secs(10));
        let mut w = ReplayWindow::new(bounds.0, bounds.1, bounds.2);
        w.start_connection(true);
        let now = Instant::now();
        for i in 0..3u8 {
            w.push(&frame(OP_BINARY, &[i]), 1, now);
        }
        let big = frame(OP_BINARY, &[9; 300]);
        w.push_shared(big.clone(), 1, now);
        w.acknowledge(2, now).expect("acknowledged");
        w.strike_recent(now, Duration::from_secs(1));
        let mut frames = Vec::new();
        let state = w.export(&mut frames);
        let mut imported = ReplayWindow::import(&state, &frames, bounds, now).expect("import");
        let mut again = Vec::new();
        assert_eq!(imported.export(&mut again), state);
        assert_eq!(again, frames);
        // Acknowledgements go on counting from the same connection start.
        assert_eq!(imported.acknowledge(3, now), Ok(1));
        assert_eq!(
            imported.take_fresh_struck(now),
            vec![(big, 1)],
            "the unacknowledged message, with its strike"
        );
        // Frames that do not add up are refused.
        assert!(ReplayWindow::import(&state, &frames[1..], bounds, now).is_err());
    }

    #[test]
    fn a_move_chain_remembers_the_backends_left_within_its_window() {
        let mut chain = MoveChain::default();
        let window = Duration::from_secs(60);
        let start = Instant::now();
        chain.record(start, "a");
        chain.record(start + Duration::from_secs(30), "b");
        assert_eq!(chain.recent(start + Duration::from_secs(30), window), 2);
        assert_eq!(chain.backends(), ["b", "a"]);
        assert_eq!(chain.recent(start + Duration::from_secs(60), window), 1);
        assert_eq!(chain.backends(), ["b"]);
    }

    /// The backend read everything forwarded so far.
    fn all_read(w: &mut ReplayWindow) {
        w.read_up_to(u64::MAX, Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn read_messages_are_bounded_by_count_and_age() {
        let mut w = ReplayWindow::new(3, usize::MAX, Duration::from_secs(10));
        let m: Vec<Bytes> = (0..5)
            .map(|i| frame(OP_BINARY, format!("m{i}").as_bytes()))
            .collect();
        // One write of two messages with a ping between, then three alone.
        let first = [&m[0][..], &frame(OP_PING, b"p"), &m[1]].concat();
        w.push(&first, 2, Instant::now());
        for message in &m[2..] {
            w.push(message, 1, Instant::now());
        }
        all_read(&mut w);
        assert_eq!(w.len(), 3);
        assert_eq!(w.take_fresh(Instant::now()), m[2..].to_vec());
        assert!(w.is_empty());

        // Three messages in one write and one more: the write's oldest is
        // out of the margin, and the ping is never replayed.
        w.push(&first, 2, Instant::now());
        w.push(&[&m[2][..], &m[3]].concat(), 2, Instant::now());
        all_read(&mut w);
        assert_eq!(w.take_fresh(Instant::now()), m[1..4].to_vec());

        // Kept by reference or copied, the same messages come back.
        w.push_shared(Bytes::from([&m[0][..], &m[1]].concat()), 2, Instant::now());
        w.push(&m[2], 1, Instant::now());
        w.push_shared(m[3].clone(), 1, Instant::now());
        all_read(&mut w);
        assert_eq!(w.take_fresh(Instant::now()), m[1..4].to_vec());

        w.push(&m[0], 1, Instant::now());
        all_read(&mut w);
        tokio::time::advance(Duration::from_secs(11)).await;
        w.push(&m[4], 1, Instant::now());
        all_read(&mut w);
        assert_eq!(w.take_fresh(Instant::now()), vec![m[4].clone()]);
    }

    #[tokio::test(start_paused = true)]
    async fn unread_messages_stay_whatever_their_number_or_age_until_the_bytes_fill() {
        let m: Vec<Bytes> = (0..100)
            .map(|i| frame(OP_BINARY, format!("message {i:03}").as_bytes()))
            .collect();
        let size = m[0].len();
        let mut w = ReplayWindow::new(2, 40 * size, Duration::from_secs(10));
        for message in &m[..30] {
            w.push(message, 1, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        w.expire(Instant::now());
        assert!(!w.is_full());
        for message in &m[30..40] {
            w.push(message, 1, Instant::now());
        }
        assert!(w.is_full(), "40 unread messages fill the window");
        // The backend read the first 35: the 5 after and a margin of 2.
        assert!(w.read_up_to(35, Instant::now()));
        assert!(!w.is_full());
        assert_eq!(w.take_fresh(Instant::now()), m[33..40].to_vec());
    }

    #[tokio::test(start_paused = true)]
    async fn a_watermark_that_does_not_move_marks_the_backend_stalled() {
        let mut w = ReplayWindow::new(8, usize::MAX, Duration::from_secs(10));
        let (interval, stall) = (Duration::from_millis(50), Duration::from_secs(3));
        w.set_ping_interval(interval);
        let start = Instant::now();
        assert_eq!(w.stalled_at(stall), None, "nothing waits");
        w.push(&frame(OP_BINARY, b"a"), 1, start);
        assert!(w.ping_ready(), "the first ping at once");
        assert_eq!(w.take_ping(start), Some(1));
        w.push(&frame(OP_BINARY, b"b"), 1, start);
        assert!(!w.ping_ready(), "then at most every interval");
        assert_eq!(w.take_ping(start), None);
        assert!(w.take_dirty());
        assert_eq!(w.next_deadline(stall), Some(start + interval));
        assert_eq!(w.take_ping(start + interval), Some(2));
        assert_eq!(w.stalled_at(stall), Some(start + stall));
        // The watermark moves: what still waits, waits from now.
        let later = start + Duration::from_secs(2);
        assert!(w.read_up_to(1, later));
        assert_eq!(w.stalled_at(stall), Some(later + stall));
        assert!(w.read_up_to(2, later));
        assert_eq!(w.stalled_at(stall), None, "caught up");
        assert!(!w.read_up_to(2, later), "an old count moves nothing");
    }

    proptest::proptest! {
        /// However messages come and go, one write or many at a time, and
        /// whatever the backend is seen to have read, the window replays
        /// the last `max_messages` it read (minus those past the age) and
        /// every one it did not, oldest first.
        #[test]
        fn replay_window_keeps_every_unread_message_and_a_margin(
            max_messages in 0usize..8,
            // (message lengths, a ping after the first, seconds after the
            // previous write, writes the backend has read after it)
            writes in proptest::collection::vec(
                (
                    proptest::collection::vec(0usize..300, 0..5),
                    proptest::bool::ANY,
                    0u64..4,
                    0usize..3,
                ),
                0..40,
            ),
            take_after in 0u64..12,
        ) {
            let max_age = Duration::from_secs(10);
            let mut window = ReplayWindow::new(max_messages, usize::MAX, max_age);
            let mut at = Instant::now();
            // Per write: when, its messages, whether the backend read it.
            let mut forwarded: Vec<(Instant, Vec<Bytes>, bool)> = Vec::new();
            let mut recorded = 0u64;
            for (i, (lengths, ping, gap, read_now)) in writes.iter().enumerate() {
                at += Duration::from_secs(*gap);
                let mut batch = Vec::new();
                let mut messages = Vec::new();
                for (j, &len) in lengths.iter().enumerate() {
                    let payload: Vec<u8> = (0..len).map(|k| (i + j + k) as u8).collect();
                    let message = frame(OP_BINARY, &payload);
                    batch.extend_from_slice(&message);
                    if *ping && j == 0 {
                        batch.extend_from_slice(&frame(OP_PING, b"ping"));
                    }
                    messages.push(message);
                }
                window.push(&batch, lengths.len(), at);
                recorded += lengths.len() as u64;
                forwarded.push((at, messages, false));
                // The backend reads up to a write boundary: all but the
                // last `read_now` writes are read.
                let read = forwarded.len().saturating_sub(*read_now);
                for write in &mut forwarded[..read] {
                    write.2 = true;
                }
                let count: u64 = forwarded[..read].iter().map(|w| w.1.len() as u64).sum();
                window.read_up_to(count.min(recorded), at);
            }
            let now = at + Duration::from_secs(take_after);
            let read: Vec<Bytes> = forwarded
                .iter()
                .filter(|w| w.2)
                .flat_map(|w| w.1.iter().map(move |m| (w.0, m.clone())))
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .take(max_messages)
                .rev()
                .filter(|(t, _)| now.duration_since(*t) <= max_age)
                .map(|(_, m)| m)
                .collect();
            let unread = forwarded.iter().filter(|w| !w.2).flat_map(|w| w.1.clone());
            let expected: Vec<Bytes> = read.into_iter().chain(unread).collect();
            proptest::prop_assert_eq!(window.take_fresh(now), expected);
            proptest::prop_assert!(window.is_empty());
        }
    }

    #[test]
    fn pending_queue_refuses_past_its_byte_bound() {
        let mut q = PendingQueue::new(10);
        assert_eq!(q.push(Bytes::from("12345")), Ok(()));
        assert_eq!(q.push(Bytes::from("12345")), Ok(()));
        assert_eq!(q.push(Bytes::from("1")), Err(QueueFull));
        assert_eq!(q.drain().count(), 2);
        assert_eq!(q.push(Bytes::from("1234567890")), Ok(()));
    }
}
