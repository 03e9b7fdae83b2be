//! Migration bookkeeping: why a session moves, the replay window of client
//! messages already forwarded, and the queue of client messages that arrive
//! while the session re-dials.
//!
//! Both hold client messages as the frames the client sent (masked, which
//! any backend accepts), so a replay or a queued message is written to the
//! new backend as it is. Both are pure data structures with their own
//! bounds; the session task decides when to fill and empty them. See
//! DESIGN.md, "Migration: the contract".

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use bytes::Bytes;
use tokio::time::Instant;

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
}

impl MigrationReason {
    fn from_code(code: u8) -> Option<MigrationReason> {
        Some(match code {
            1 => MigrationReason::UpstreamLost,
            2 => MigrationReason::UpstreamClosed,
            3 => MigrationReason::Health,
            4 => MigrationReason::Drain,
            5 => MigrationReason::Removed,
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
        !matches!(self, MigrationReason::Drain | MigrationReason::Removed)
    }
}

/// Backend close codes that move the session instead of ending it.
pub fn is_migrating_close(code: u16) -> bool {
    matches!(code, 1001 | 1011 | 1012 | 1013 | 1014)
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
}

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

    /// Take the waiting request, or be woken when one comes.
    pub fn poll_move(&self, cx: &mut Context<'_>) -> Poll<MigrationReason> {
        self.waker.register(cx.waker());
        match MigrationReason::from_code(self.request.swap(0, Ordering::AcqRel)) {
            Some(reason) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }
}

/// The last client messages forwarded to the backend, bounded by count and
/// age, kept so they can be sent again after an abrupt failure.
///
/// Messages are copied in, one after another, into one buffer that is
/// reused as old messages leave: recording a message on the hot path costs
/// a copy of its frames and no allocation or reference count.
#[derive(Debug)]
pub struct ReplayWindow {
    /// The frames of the messages held, oldest first, from `head` on.
    data: Vec<u8>,
    /// Bytes at the front of `data` of messages no longer held.
    head: usize,
    /// When each message held was forwarded, and its length in `data`.
    items: VecDeque<(Instant, usize)>,
    max_messages: usize,
    max_age: Duration,
}

/// A window buffer at least this big whose live bytes fill under a
/// quarter of it is shrunk when it is compacted (after one large message,
/// say).
const SHRINK_ABOVE: usize = 64 * 1024;

impl ReplayWindow {
    pub fn new(max_messages: usize, max_age: Duration) -> ReplayWindow {
        ReplayWindow {
            data: Vec::new(),
            head: 0,
            items: VecDeque::new(),
            max_messages,
            max_age,
        }
    }

    /// Remember a message (its frames) as it is forwarded `now`. (The caller
    /// reads the clock once for a whole batch.)
    pub fn push(&mut self, message: &[u8], now: Instant) {
        if self.max_messages == 0 {
            return;
        }
        if self.items.len() == self.max_messages
            && let Some((_, len)) = self.items.pop_front()
        {
            self.head += len;
        }
        // Compact once the dead front is as big as the live rest: each byte
        // is moved at most once per byte recorded after it.
        if self.head > 0 && self.head >= self.data.len() - self.head {
            self.data.drain(..self.head);
            self.head = 0;
            if self.data.capacity() > SHRINK_ABOVE && self.data.len() < self.data.capacity() / 4 {
                self.data.shrink_to(self.data.len() * 2);
            }
        }
        self.data.extend_from_slice(message);
        self.items.push_back((now, message.len()));
    }

    /// The messages still young enough to replay, oldest first, leaving the
    /// window empty: they are pushed again as they are re-sent.
    pub fn take_fresh(&mut self, now: Instant) -> Vec<Bytes> {
        let mut offset = self.head;
        let mut fresh = Vec::with_capacity(self.items.len());
        for (at, len) in self.items.drain(..) {
            if now.saturating_duration_since(at) <= self.max_age {
                fresh.push(Bytes::copy_from_slice(&self.data[offset..offset + len]));
            }
            offset += len;
        }
        self.clear();
        fresh
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.data = Vec::new();
        self.head = 0;
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
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

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn replay_window_is_bounded_by_count_and_age() {
        let mut w = ReplayWindow::new(3, Duration::from_secs(10));
        for i in 0..5 {
            w.push(format!("m{i}").as_bytes(), Instant::now());
        }
        assert_eq!(w.len(), 3);
        let fresh = w.take_fresh(Instant::now());
        assert_eq!(
            fresh,
            vec![Bytes::from("m2"), Bytes::from("m3"), Bytes::from("m4")]
        );
        assert!(w.is_empty());

        w.push(b"old", Instant::now());
        tokio::time::advance(Duration::from_secs(11)).await;
        w.push(b"new", Instant::now());
        assert_eq!(w.take_fresh(Instant::now()), vec![Bytes::from("new")]);
    }

    proptest::proptest! {
        /// However messages come and go, the window replays the last
        /// `max_messages` pushed, oldest first, minus those past the age.
        #[test]
        fn replay_window_keeps_the_last_messages_whole(
            max_messages in 0usize..8,
            // (length, seconds after the previous push)
            pushes in proptest::collection::vec((0usize..300, 0u64..4), 0..60),
            take_after in 0u64..12,
        ) {
            let max_age = Duration::from_secs(10);
            let mut window = ReplayWindow::new(max_messages, max_age);
            let mut at = Instant::now();
            let mut pushed = Vec::new();
            for (i, &(len, gap)) in pushes.iter().enumerate() {
                at += Duration::from_secs(gap);
                let message: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                window.push(&message, at);
                pushed.push((at, message));
            }
            let now = at + Duration::from_secs(take_after);
            let expected: Vec<Bytes> = pushed[pushed.len().saturating_sub(max_messages)..]
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= max_age)
                .map(|(_, m)| Bytes::copy_from_slice(m))
                .collect();
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
        for code in 1..=5 {
            let reason = MigrationReason::from_code(code).unwrap();
            assert_eq!(reason as u8, code);
        }
    }

    #[test]
    fn which_closes_migrate() {
        for code in [1001, 1011, 1012, 1013, 1014] {
            assert!(is_migrating_close(code));
        }
        for code in [1000, 1008, 1002, 4000] {
            assert!(!is_migrating_close(code));
        }
    }
}
