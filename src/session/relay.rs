//! The relay: messages both ways between an upgraded client and a connected
//! backend, with keepalive, idle timeout and close-code pass-through.
//!
//! Frames are forwarded exactly as they arrived (see [`crate::wire::frame`]): the
//! relay reads whatever a socket has into the thread's read buffer, finds
//! the whole units in it, and writes them to the other side in one write,
//! straight from there, without decoding a payload. Only leftovers are
//! copied: an unfinished frame into the source's reader, bytes the
//! destination would not take into its write queue. A unit is only ever
//! written whole, so a session can move to another backend between any two
//! messages. Client messages are counted against the session's rate limits
//! and copied into the replay window on the way through, followed by
//! watermark pings; the backend's watermark pongs and acknowledgements go
//! to the window and no further. A full window stops reading the client; a
//! backend whose watermark stands still is stalled, and the session moves.
//! Reads from the client also wait while the process memory budget says so
//! ([`crate::memory`]).
//!
//! Both directions, the keepalive timer, the control cell and shutdown
//! are polled by one future: a side that is slow to read holds back only
//! its own direction (an echo backend under load would otherwise deadlock
//! both TCP buffers), and an idle session is one small task.
//!
//! Ends caused by the client, by idleness or by shutdown are finished here
//! (close frames exchanged on both hops). Ends caused by the backend leave
//! the client untouched: the caller decides whether to pass the close on or
//! (with migration) to move the session elsewhere.

use std::future::poll_fn;
use std::pin::pin;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use metrics::{Counter, Histogram};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::backend::control::{Control, MigrationReason};
use crate::config::{MigrationConfig, RelayConfig};
use crate::limits::MessageBudget;
use crate::memory::SessionMemory;
use crate::metrics::{self as m, CloseReason};
use crate::session::replay::ReplayWindow;
use crate::shutdown::Shutdown;
use crate::socketio::Connects;
use crate::wire::close::{self as code, Fault};
use crate::wire::frame::{self, Ack, CloseFrame, KEEPALIVE, OP_PING, Unit};
use crate::wire::peer::{Fresh, Peer, ReadHint, close, with_read_scratch};

/// How a relay ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayEnd {
    /// The client sent a close frame (code, if any); it was passed upstream
    /// and the backend's answer awaited.
    ClientClosed(Option<u16>),
    /// The backend sent this close frame. The client has not been told.
    BackendClosed(Option<CloseFrame>),
    /// The client's connection failed without a close frame; the backend was
    /// closed with 1001.
    ClientLost,
    /// The backend's connection failed without a close frame, or broke the
    /// protocol. The client has not been told.
    BackendLost,
    /// One hop was silent past the idle timeout; both were closed with 1001.
    Idle,
    /// The client broke the protocol or a limit; it was closed with the
    /// fault's code and the backend with 1001.
    ClientViolation(Fault),
    /// The router is shutting down; both sides were closed with 1001.
    Shutdown,
    /// The process passed its memory budget and this session held the
    /// most: the client was closed with 1013, the backend with 1001.
    MemoryPressure,
    /// The router asked the session to move; both sides are untouched.
    MigrateRequested(MigrationReason),
}

impl RelayEnd {
    /// Why the session ended, when the relay's end is the session's (a
    /// requested move is not).
    pub fn close_reason(&self) -> Option<CloseReason> {
        Some(match self {
            RelayEnd::ClientClosed(_) => CloseReason::ClientClose,
            RelayEnd::BackendClosed(_) => CloseReason::BackendClose,
            RelayEnd::ClientLost => CloseReason::ClientLost,
            RelayEnd::BackendLost => CloseReason::UpstreamLost,
            RelayEnd::Idle => CloseReason::IdleTimeout,
            RelayEnd::ClientViolation(fault) => fault.close_reason(),
            RelayEnd::Shutdown => CloseReason::Shutdown,
            RelayEnd::MemoryPressure => CloseReason::MemoryPressure,
            RelayEnd::MigrateRequested(_) => return None,
        })
    }
}

/// Per-session handles on the traffic counters, resolved once.
#[derive(Clone)]
pub struct TrafficCounters {
    messages_up: Counter,
    bytes_up: Counter,
    messages_down: Counter,
    bytes_down: Counter,
    replay_dropped: Counter,
    watermark_lag: Histogram,
    read_pauses: Histogram,
}

impl TrafficCounters {
    pub fn new() -> TrafficCounters {
        TrafficCounters {
            messages_up: metrics::counter!(m::MESSAGES_TOTAL, "direction" => m::CLIENT_TO_BACKEND),
            bytes_up: metrics::counter!(m::BYTES_TOTAL, "direction" => m::CLIENT_TO_BACKEND),
            messages_down: metrics::counter!(m::MESSAGES_TOTAL, "direction" => m::BACKEND_TO_CLIENT),
            bytes_down: metrics::counter!(m::BYTES_TOTAL, "direction" => m::BACKEND_TO_CLIENT),
            replay_dropped: metrics::counter!(m::REPLAY_DROPPED_TOTAL),
            watermark_lag: metrics::histogram!(m::WATERMARK_LAG_BYTES),
            read_pauses: metrics::histogram!(m::CLIENT_READ_PAUSE_SECONDS),
        }
    }
}

impl Default for TrafficCounters {
    fn default() -> Self {
        TrafficCounters::new()
    }
}

/// How one direction stopped.
#[derive(Debug)]
enum PumpEnd {
    /// The source sent a close frame.
    Closed(Option<CloseFrame>),
    /// The source's connection failed.
    SourceLost,
    /// The source broke the protocol or a limit (close code for it).
    SourceViolation(Fault),
    /// Writing to the destination failed.
    DestinationLost,
}

/// A batch at least this big that sits in a reader's own buffer goes into
/// the replay window by reference, not copied.
const SHARE_IN_WINDOW: usize = 4 * 1024;

/// One direction's state between polls.
struct Pump<'a> {
    messages: &'a Counter,
    bytes: &'a Counter,
    /// Client messages the replay window let go of for its byte bound.
    replay_dropped: &'a Counter,
    /// How long reading the source paused for a full replay window.
    read_pauses: &'a Histogram,
    /// Since when the source has not been read for a full window.
    paused_since: Option<Instant>,
    /// Client messages are recorded here as they are forwarded.
    window: Option<&'a mut ReplayWindow>,
    budget: Option<&'a mut MessageBudget>,
    /// The session's memory account: reading from the source waits while
    /// the process budget says so (the client's direction only).
    memory: Option<&'a mut SessionMemory>,
    /// A Socket.IO session's namespace CONNECTs, noted as the client's
    /// frames go by (the client's direction only).
    connects: Option<&'a mut Connects>,
    /// An end found while units before it were still to be written.
    pending_end: Option<PumpEnd>,
    /// The source sent something since the last keepalive tick.
    heard: bool,
    /// The highest count a backend's pong to a watermark ping carried back
    /// since the relay last looked (0: none).
    watermark_heard: u64,
    /// The latest acknowledgement an acknowledging backend sent since the
    /// relay last looked; `Err` once one was malformed or went down.
    ack_heard: Option<Result<u64, ()>>,
}

impl Pump<'_> {
    /// Move data from `src` to `dst` until there is nothing to read, `dst`
    /// takes no more, or the direction ends. `same_waker`: this task's
    /// waker is the one `src` was last left waiting with.
    fn poll<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Peer<S>,
        dst: &mut Peer<D>,
        same_waker: bool,
    ) -> Poll<PumpEnd>
    where
        S: AsyncRead + AsyncWrite + ReadHint + Unpin,
        D: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            match dst.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(PumpEnd::DestinationLost),
                Poll::Pending => return Poll::Pending,
            }
            if let Some(end) = self.pending_end.take() {
                return Poll::Ready(end);
            }
            // Whole units already in the reader (read before the relay
            // started, or straight into its buffer).
            if src.reader.buffered() > 0 && self.forward(cx, src, dst, &[]) {
                continue;
            }
            // Woken for the other socket: this one, still empty, keeps the
            // waker it had (asking it again would register it again).
            if same_waker && src.read_waiting && !src.io.may_have_data() {
                return Poll::Pending;
            }
            // Messages the backend has not been seen to read fill the
            // window: the client waits (TCP backpressure) until its pong
            // moves the watermark.
            if self.window.as_deref().is_some_and(ReplayWindow::is_full) {
                self.paused_since.get_or_insert_with(Instant::now);
                return Poll::Pending;
            }
            if let Some(since) = self.paused_since.take() {
                self.read_pauses.record(since.elapsed().as_secs_f64());
            }
            if let Some(memory) = self.memory.as_deref_mut() {
                let held = src.held_bytes()
                    + dst.held_bytes()
                    + self.window.as_deref().map_or(0, ReplayWindow::held_bytes);
                if !memory.may_read(cx, held, src.read_growth()) {
                    return Poll::Pending;
                }
            }
            let read = with_read_scratch(|scratch| {
                let fresh = match ready!(src.poll_read_chunk(cx, scratch)) {
                    Ok(Some(Fresh::Bytes(fresh))) => fresh,
                    Ok(Some(Fresh::InBuffer(_))) => &[],
                    Ok(None) | Err(_) => return Poll::Ready(Err(PumpEnd::SourceLost)),
                };
                self.heard = true;
                self.forward(cx, src, dst, fresh);
                Poll::Ready(Ok(()))
            });
            match read {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(end)) => return Poll::Ready(end),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Write to `dst` the whole units found in `src`'s reader followed by
    /// `fresh`, in one write where they are consecutive, straight from
    /// where they lie (the socket's leftovers are queued). True when there
    /// was anything to do (bytes written or queued, a pong dropped, or an
    /// end noted for after the write).
    fn forward<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Peer<S>,
        dst: &mut Peer<D>,
        fresh: &[u8],
    ) -> bool
    where
        S: AsyncRead + AsyncWrite + ReadHint + Unpin,
        D: AsyncRead + AsyncWrite + Unpin,
    {
        src.reader.scan_fresh(fresh, |data, scan, shared| {
            // data[written..end] is the batch being gathered, with `count`
            // messages of `payload_bytes` in it.
            let (mut written, mut end) = (0, 0);
            let (mut count, mut payload_bytes) = (0, 0);
            let mut acted = false;
            let mut lost = false;
            let (messages_total, bytes_total) = (self.messages, self.bytes);
            let replay_dropped = self.replay_dropped;
            let mut window = self.window.as_deref_mut();
            let mut connects = self.connects.as_deref_mut();
            let mut write = |from: usize, to: usize, messages: usize, payload: usize| {
                if to == from {
                    return;
                }
                // Counted before written: whoever sees a message can see it
                // counted.
                if messages > 0 {
                    messages_total.increment(messages as u64);
                    bytes_total.increment(payload as u64);
                }
                if let Some(connects) = connects.as_deref_mut() {
                    connects.note_in_frames(&data[from..to]);
                }
                if let Some(window) = window.as_deref_mut() {
                    let len = to - from;
                    let dropped = match shared {
                        // Kept by reference only when that pins little
                        // more than the frames themselves.
                        Some((bytes, allocation))
                            if len >= SHARE_IN_WINDOW && len >= allocation / 8 * 7 =>
                        {
                            window.push_shared(bytes.slice(from..to), messages, Instant::now())
                        }
                        _ if len >= SHARE_IN_WINDOW => window.push_shared(
                            Bytes::copy_from_slice(&data[from..to]),
                            messages,
                            Instant::now(),
                        ),
                        _ => window.push(&data[from..to], messages, Instant::now()),
                    };
                    if dropped > 0 {
                        replay_dropped.increment(dropped as u64);
                    }
                }
                if dst.write_or_queue(cx, &data[from..to]).is_err() {
                    lost = true;
                }
            };
            loop {
                // The common case first: a run of whole one-frame messages.
                let mut over_budget = false;
                let run = scan.plain_run(data, |payload| {
                    over_budget = !within_budget(&mut self.budget, payload);
                    !over_budget
                });
                end += run.len;
                count += run.messages;
                payload_bytes += run.payload;
                if over_budget {
                    self.pending_end = Some(PumpEnd::SourceViolation(Fault::MessageRate));
                    break;
                }
                let unit = match scan.next_unit(data) {
                    Ok(Some(unit)) => unit,
                    Ok(None) => break,
                    Err(violation) => {
                        self.pending_end = Some(PumpEnd::SourceViolation(violation.into()));
                        break;
                    }
                };
                match unit {
                    Unit::Message { len, payload } => {
                        if !within_budget(&mut self.budget, payload) {
                            self.pending_end = Some(PumpEnd::SourceViolation(Fault::MessageRate));
                            break;
                        }
                        end += len;
                        count += 1;
                        payload_bytes += payload;
                    }
                    Unit::Ping { len } | Unit::Pong { len, own: false } => end += len,
                    // The answer to the router's own ping is dropped: what
                    // came before it is written, and the batch starts after.
                    // A watermark pong's count is noted for the window.
                    Unit::Pong { len, own: true } => {
                        let pong = &data[end..end + len];
                        if let Some(count) = frame::watermark_of(pong) {
                            self.watermark_heard = self.watermark_heard.max(count);
                        }
                        if let Some(ack) = frame::ack_of(pong) {
                            self.ack_heard = match (self.ack_heard, ack) {
                                (Some(Ok(before)), Ack::Count(count)) if count >= before => {
                                    Some(Ok(count))
                                }
                                (None, Ack::Count(count)) => Some(Ok(count)),
                                _ => Some(Err(())),
                            };
                        }
                        write(written, end, count, payload_bytes);
                        (count, payload_bytes) = (0, 0);
                        written = end + len;
                        end = written;
                        acted = true;
                    }
                    Unit::Close { frame, .. } => {
                        self.pending_end = Some(PumpEnd::Closed(frame));
                        break;
                    }
                }
            }
            write(written, end, count, payload_bytes);
            // A failed write takes precedence over an end found after it.
            if lost {
                self.pending_end = Some(PumpEnd::DestinationLost);
            }
            let acted = acted || end > written || self.pending_end.is_some();
            (end, acted)
        })
    }
}

impl Pump<'_> {
    /// Hand the watermark and acknowledgement the backend sent since the
    /// last look to the replay window. True when the window's watermark
    /// moved; an error when an acknowledging backend acknowledged nonsense
    /// (malformed, going down, or more than it was sent).
    fn report_to(&mut self, window: &mut ReplayWindow, lag: &Histogram) -> Result<bool, ()> {
        let heard = std::mem::take(&mut self.watermark_heard);
        let mut moved = heard > 0 && window.read_up_to(heard, Instant::now());
        if let Some(ack) = self.ack_heard.take()
            && window.acknowledges()
        {
            match ack.map(|count| window.acknowledge(count, Instant::now())) {
                Ok(Ok(acknowledged)) => {
                    metrics::counter!(m::ACKNOWLEDGED_MESSAGES_TOTAL).increment(acknowledged);
                    moved |= acknowledged > 0;
                }
                Ok(Err(_)) | Err(()) => {
                    metrics::counter!(m::ACK_ERRORS_TOTAL).increment(1);
                    return Err(());
                }
            }
        }
        if moved {
            lag.record(window.unread_bytes() as f64);
        }
        Ok(moved)
    }
}

/// Spend a message of `payload` bytes from the client's rate limits, if it
/// has any; false when they are used up.
fn within_budget(budget: &mut Option<&mut MessageBudget>, payload: usize) -> bool {
    budget.as_deref_mut().is_none_or(|b| b.spend(payload))
}

/// The session-owned state a relay works with.
pub struct RelayContext<'a> {
    pub config: &'a RelayConfig,
    /// The watermark's stall timeout (`migration.stall_timeout`).
    pub migration: &'a MigrationConfig,
    pub counters: &'a TrafficCounters,
    /// Becomes true when sessions must close (end of the shutdown grace).
    pub shutdown: &'a mut Shutdown,
    /// Requests to move the session.
    pub control: &'a Control,
    /// Every client data message is recorded here as it is forwarded.
    pub window: &'a mut ReplayWindow,
    /// The client's message and byte rate limits, when configured.
    pub budget: Option<&'a mut MessageBudget>,
    /// The session's account under the process memory budget.
    pub memory: &'a mut SessionMemory,
    /// A Socket.IO session's namespace CONNECTs, kept up to date.
    pub connects: Option<&'a mut Connects>,
    /// The first keepalive tick comes this long after the relay starts
    /// (the ping interval, or less for sessions an upgrade handed over,
    /// whose timers would otherwise all restart together).
    pub first_tick: Duration,
}

/// Why the relay loop stopped, before the ends are tidied up.
enum Stopped {
    Up(PumpEnd),
    Down(PumpEnd),
    Idle,
    Shutdown,
    Migrate(MigrationReason),
    MemoryPressure,
}

/// Relay until one side closes or fails, a hop goes idle, the session is
/// asked to move, or `shutdown` becomes true. See the module doc for who has
/// been told what.
pub async fn relay<C, U>(
    client: &mut Peer<C>,
    upstream: &mut Peer<U>,
    cx: RelayContext<'_>,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + ReadHint + Unpin,
    U: AsyncRead + AsyncWrite + ReadHint + Unpin,
{
    let RelayContext {
        config,
        migration,
        counters,
        shutdown,
        control,
        window,
        budget,
        memory,
        connects,
        first_tick,
    } = cx;
    let mut up = Pump {
        messages: &counters.messages_up,
        bytes: &counters.bytes_up,
        replay_dropped: &counters.replay_dropped,
        read_pauses: &counters.read_pauses,
        paused_since: None,
        window: Some(window),
        budget,
        memory: Some(memory),
        connects,
        pending_end: None,
        heard: false,
        watermark_heard: 0,
        ack_heard: None,
    };
    let mut down = Pump {
        messages: &counters.messages_down,
        bytes: &counters.bytes_down,
        replay_dropped: &counters.replay_dropped,
        read_pauses: &counters.read_pauses,
        paused_since: None,
        window: None,
        budget: None,
        memory: None,
        connects: None,
        pending_end: None,
        heard: false,
        watermark_heard: 0,
        ack_heard: None,
    };
    // One timer for both hops and the replay window: at each keepalive
    // tick it pings a hop that was silent since the last one, and ends the
    // session when a hop has been silent past the idle timeout; in between
    // it fires when the window wants a look (a watermark ping falls due,
    // the backend would be stalled, read messages pass their age).
    let stall_timeout = migration.stall_timeout;
    let started = Instant::now();
    let (mut client_heard_at, mut upstream_heard_at) = (started, started);
    let mut next_ping = started + first_tick;
    let mut tick = pin!(tokio::time::sleep_until(next_ping));
    let stop_probe = shutdown.clone();
    let mut stop = pin!(shutdown.closing());
    // The stop flag, the move request and the timer each keep the waker they
    // were last polled with until they fire, so while the task's waker
    // stays the same they need polling only once they have fired: on most
    // wakes the relay then costs the two sockets and nothing else.
    let mut waker_left: Option<Waker> = None;

    let stopped = poll_fn(|cx| {
        loop {
            let all = !waker_left.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if let Poll::Ready(end) = up.poll(cx, client, upstream, !all) {
                return Poll::Ready(Stopped::Up(end));
            }
            let down_end = down.poll(cx, upstream, client, !all);
            if let Some(window) = up.window.as_deref_mut() {
                // What the backend read or acknowledged, even in its last
                // bytes before it went: a full window may take the client's
                // messages again. One that acknowledges nonsense has failed.
                match down.report_to(window, &counters.watermark_lag) {
                    Err(()) => {
                        return Poll::Ready(Stopped::Down(PumpEnd::SourceViolation(
                            Fault::Protocol,
                        )));
                    }
                    Ok(true) if down_end.is_pending() => continue,
                    Ok(_) => {}
                }
            }
            if let Poll::Ready(end) = down_end {
                return Poll::Ready(Stopped::Down(end));
            }
            if let Some(window) = up.window.as_deref_mut() {
                // What was forwarded is followed by a watermark ping, at
                // most every `interval` (written on the next round).
                if window.ping_ready()
                    && let Some(count) = window.take_ping(Instant::now())
                {
                    upstream.queue(upstream.frame(OP_PING, &frame::watermark_payload(count)));
                    continue;
                }
            }
            if let Some(memory) = up.memory.as_deref_mut() {
                if memory.must_close(cx, all) {
                    return Poll::Ready(Stopped::MemoryPressure);
                }
                // What a direction let go of (a large message written,
                // say) is given back to the process total.
                let held = client.held_bytes()
                    + upstream.held_bytes()
                    + up.window.as_deref().map_or(0, ReplayWindow::held_bytes);
                memory.update(held);
            }
            if (all || stop_probe.has_changed()) && stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Stopped::Shutdown);
            }
            if (all || control.has_request())
                && let Poll::Ready(reason) = control.poll_move(cx)
            {
                return Poll::Ready(Stopped::Migrate(reason));
            }
            // Only when the window's deadlines may have moved (a ping fell
            // due later, the stall clock started): a busy session's
            // messages cost no look here.
            let window_due = up
                .window
                .as_deref_mut()
                .and_then(|w| w.take_dirty().then(|| w.next_deadline(stall_timeout)))
                .flatten();
            let rearmed = window_due.is_some_and(|at| at < tick.deadline());
            if let Some(at) = window_due.filter(|_| rearmed) {
                tick.as_mut().reset(at);
            }
            if !all && !rearmed && !tick.is_elapsed() {
                return Poll::Pending;
            }
            if tick.as_mut().poll(cx).is_pending() {
                waker_left = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let now = Instant::now();
            if let Some(window) = up.window.as_deref_mut() {
                // Messages waited for the backend, and its watermark did
                // not move: it is hung. Move, replaying what it did not read.
                // Unless the client is behind: then the relay stopped
                // reading the backend, which may be blocked writing to it.
                if window.stalled_at(stall_timeout).is_some_and(|at| now >= at) {
                    if !client.has_output() {
                        return Poll::Ready(Stopped::Migrate(MigrationReason::Stalled));
                    }
                    window.defer_stall(now);
                }
                // A watermark ping that fell due since the last message.
                if window.has_unpinged()
                    && let Some(count) = window.take_ping(now)
                {
                    upstream.queue(upstream.frame(OP_PING, &frame::watermark_payload(count)));
                }
                window.expire(now);
                if let Some(memory) = up.memory.as_deref_mut() {
                    let held = client.held_bytes() + upstream.held_bytes() + window.held_bytes();
                    memory.update(held);
                }
            }
            if now >= next_ping {
                for (heard, at) in [
                    (&mut up.heard, &mut client_heard_at),
                    (&mut down.heard, &mut upstream_heard_at),
                ] {
                    if std::mem::take(heard) {
                        *at = now;
                    }
                }
                if now - client_heard_at >= config.idle_timeout
                    || now - upstream_heard_at >= config.idle_timeout
                {
                    return Poll::Ready(Stopped::Idle);
                }
                if client_heard_at < now {
                    client.queue(client.frame(OP_PING, KEEPALIVE));
                }
                if upstream_heard_at < now {
                    upstream.queue(upstream.frame(OP_PING, KEEPALIVE));
                }
                next_ping = now + config.ping_interval;
            }
            let window_due = up.window.as_deref_mut().and_then(|w| {
                w.take_dirty();
                w.next_deadline(stall_timeout)
            });
            tick.as_mut()
                .reset(window_due.map_or(next_ping, |at| at.min(next_ping)));
            // Go round again: the pings get written and the timer armed
            // (polled again: it gave its waker up when it fired).
            waker_left = None;
        }
    })
    .await;
    // Boxed: closing needs more state than relaying, and an idle session's
    // task is as big as its biggest moment.
    Box::pin(finish(stopped, client, upstream, config)).await
}

/// Tidy up after the relay loop: tell whichever sides need telling.
async fn finish<C, U>(
    stopped: Stopped,
    client: &mut Peer<C>,
    upstream: &mut Peer<U>,
    config: &RelayConfig,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = config.close_timeout;
    let going_away = close(code::GOING_AWAY, "client went away");
    match stopped {
        Stopped::Up(PumpEnd::Closed(frame)) => {
            client.echo_close(frame.as_ref(), timeout).await;
            upstream.finish_close(frame.as_ref(), timeout).await;
            RelayEnd::ClientClosed(frame.map(|f| f.code))
        }
        Stopped::Up(PumpEnd::SourceLost) | Stopped::Down(PumpEnd::DestinationLost) => {
            upstream.finish_close(Some(&going_away), timeout).await;
            RelayEnd::ClientLost
        }
        Stopped::Up(PumpEnd::SourceViolation(fault)) => {
            client
                .finish_close(Some(&close(fault.code(), fault.reason())), timeout)
                .await;
            upstream.finish_close(Some(&going_away), timeout).await;
            RelayEnd::ClientViolation(fault)
        }
        Stopped::Down(PumpEnd::Closed(frame)) => {
            upstream.echo_close(frame.as_ref(), timeout).await;
            RelayEnd::BackendClosed(frame)
        }
        Stopped::Down(PumpEnd::SourceLost | PumpEnd::SourceViolation(_))
        | Stopped::Up(PumpEnd::DestinationLost) => RelayEnd::BackendLost,
        Stopped::Idle => {
            let idle = close(code::GOING_AWAY, "idle timeout");
            client.finish_close(Some(&idle), timeout).await;
            upstream.finish_close(Some(&idle), timeout).await;
            RelayEnd::Idle
        }
        Stopped::Migrate(reason) => RelayEnd::MigrateRequested(reason),
        Stopped::MemoryPressure => {
            client
                .finish_close(
                    Some(&close(code::TRY_AGAIN_LATER, "try again later")),
                    timeout,
                )
                .await;
            upstream.finish_close(Some(&going_away), timeout).await;
            RelayEnd::MemoryPressure
        }
        Stopped::Shutdown => {
            let bye = close(code::GOING_AWAY, "router shutting down");
            tokio::join!(
                client.finish_close(Some(&bye), timeout),
                upstream.finish_close(Some(&bye), timeout)
            );
            RelayEnd::Shutdown
        }
    }
}

#[cfg(test)]
mod tests {
    //! The relay over in-memory sockets with paused time: keepalive, idle
    //! timeout, the close handshake in order, a move requested between two
    //! messages.

    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::backend::control::Control;
    use crate::config::{
        DEFAULT_MAX_MOVES, DEFAULT_MAX_REDELIVERIES, DEFAULT_MOVES_WINDOW, DEFAULT_STALL_TIMEOUT,
        DEFAULT_WATERMARK_INTERVAL,
    };
    use crate::memory::MemoryBudget;
    use crate::shutdown::{Phase, Phases};
    use crate::wire::frame::{OP_CLOSE, OP_TEXT, apply_mask, encode, parse_header};

    impl ReadHint for DuplexStream {}

    fn relay_config() -> RelayConfig {
        RelayConfig {
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_message_bytes: 1 << 20,
            close_timeout: Duration::from_secs(5),
        }
    }

    fn migration_config() -> MigrationConfig {
        MigrationConfig {
            queue_max_bytes: 1 << 20,
            replay_max_messages: 8,
            replay_max_bytes: 128 * 1024,
            replay_max_age: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
            max_rate_per_backend: 200,
            max_moves: DEFAULT_MAX_MOVES,
            moves_window: DEFAULT_MOVES_WINDOW,
            max_redeliveries: DEFAULT_MAX_REDELIVERIES,
            watermark_interval: DEFAULT_WATERMARK_INTERVAL,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }

    /// One far end: what the client or the backend sees, with the bytes
    /// read but not yet returned as frames.
    struct Far {
        socket: DuplexStream,
        /// The router masks what it writes here (the backend's end).
        masked: bool,
        read: Vec<u8>,
    }

    impl Far {
        async fn write(&mut self, bytes: &[u8]) {
            self.socket.write_all(bytes).await.expect("write");
        }

        /// The next frame: its opcode and payload, unmasked.
        async fn next_frame(&mut self) -> (u8, Vec<u8>) {
            loop {
                if let Ok(Some(header)) = parse_header(&self.read, self.masked, 1 << 20)
                    && self.read.len() >= header.frame_len()
                {
                    let frame: Vec<u8> = self.read.drain(..header.frame_len()).collect();
                    let mut payload = frame[header.header_len..].to_vec();
                    if let Some(key) = header.mask {
                        apply_mask(&mut payload, key, 0);
                    }
                    return (header.opcode, payload);
                }
                let mut chunk = [0u8; 4096];
                let n = self.socket.read(&mut chunk).await.expect("read");
                assert!(n > 0, "the relay closed the socket");
                self.read.extend_from_slice(&chunk[..n]);
            }
        }

        /// The next frame that is not one of the router's pings.
        async fn next_data(&mut self) -> (u8, Vec<u8>) {
            loop {
                let (opcode, payload) = self.next_frame().await;
                if opcode != OP_PING {
                    return (opcode, payload);
                }
            }
        }
    }

    /// The far ends: what the client and the backend see.
    struct Ends {
        client: Far,
        backend: Far,
    }

    /// Run a relay between two in-memory sockets until it ends.
    fn start(
        control: Arc<Control>,
        mut stop: Shutdown,
    ) -> (Ends, tokio::task::JoinHandle<RelayEnd>) {
        let (client_far, client_near) = tokio::io::duplex(1 << 16);
        let (backend_far, backend_near) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move {
            let mut client = Peer::client(client_near, 1 << 20, Vec::new());
            let mut upstream = Peer::backend(backend_near, 1 << 20, Vec::new());
            let (config, migration) = (relay_config(), migration_config());
            let counters = TrafficCounters::new();
            let mut window = ReplayWindow::new(8, 128 * 1024, Duration::from_secs(10));
            let mut memory = MemoryBudget::new(1 << 30).open(1);
            let context = RelayContext {
                config: &config,
                migration: &migration,
                counters: &counters,
                shutdown: &mut stop,
                control: &control,
                window: &mut window,
                budget: None,
                memory: &mut memory,
                connects: None,
                first_tick: config.ping_interval,
            };
            relay(&mut client, &mut upstream, context).await
        });
        let far = |socket, masked| Far {
            socket,
            masked,
            read: Vec::new(),
        };
        let ends = Ends {
            client: far(client_far, false),
            backend: far(backend_far, true),
        };
        (ends, task)
    }

    fn client_frame(opcode: u8, payload: &[u8]) -> Bytes {
        encode(opcode, payload, Some([7, 7, 7, 7]))
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_hops_are_pinged_and_a_silent_one_ends_the_session() {
        let phases = Phases::default();
        let (mut ends, task) = start(Arc::new(Control::default()), phases.watch());
        // 30 s of silence: both hops get the router's keepalive ping.
        let (opcode, payload) = ends.client.next_frame().await;
        assert_eq!((opcode, payload.as_slice()), (OP_PING, KEEPALIVE));
        let (opcode, payload) = ends.backend.next_frame().await;
        assert_eq!((opcode, payload.as_slice()), (OP_PING, KEEPALIVE));
        // Nobody answers: past the idle timeout, the session ends.
        assert_eq!(task.await.expect("relay"), RelayEnd::Idle);
        let (opcode, payload) = ends.client.next_data().await;
        assert_eq!((opcode, &payload[..2]), (OP_CLOSE, &[0x03, 0xE9][..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_close_goes_to_the_backend_and_its_answer_ends_the_relay() {
        let phases = Phases::default();
        let (mut ends, task) = start(Arc::new(Control::default()), phases.watch());
        ends.client.write(&client_frame(OP_TEXT, b"hello")).await;
        let close = client_frame(OP_CLOSE, &[0x03, 0xE8, b'b', b'y', b'e']);
        ends.client.write(&close).await;
        // The backend sees the message, then the close, in that order.
        assert_eq!(ends.backend.next_data().await, (OP_TEXT, b"hello".to_vec()));
        let (opcode, payload) = ends.backend.next_data().await;
        assert_eq!(
            (opcode, payload.as_slice()),
            (OP_CLOSE, &b"\x03\xe8bye"[..])
        );
        // The client gets its close echoed; the backend's answer ends it.
        let (opcode, _) = ends.client.next_data().await;
        assert_eq!(opcode, OP_CLOSE);
        ends.backend
            .write(&encode(OP_CLOSE, &[0x03, 0xE8], None))
            .await;
        assert_eq!(
            task.await.expect("relay"),
            RelayEnd::ClientClosed(Some(1000))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_requested_between_two_messages_ends_the_relay_after_the_first() {
        let control = Arc::new(Control::default());
        let phases = Phases::default();
        let (mut ends, task) = start(Arc::clone(&control), phases.watch());
        ends.client.write(&client_frame(OP_TEXT, b"first")).await;
        assert_eq!(ends.backend.next_data().await, (OP_TEXT, b"first".to_vec()));
        assert!(control.request_move(MigrationReason::Drain));
        assert_eq!(
            task.await.expect("relay"),
            RelayEnd::MigrateRequested(MigrationReason::Drain)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_relay_while_the_router_drains_and_close_with_1001_when_it_closes() {
        let phases = Phases::default();
        let (mut ends, task) = start(Arc::new(Control::default()), phases.watch());
        phases.advance(Phase::Draining);
        ends.client
            .write(&client_frame(OP_TEXT, b"during the grace"))
            .await;
        assert_eq!(
            ends.backend.next_data().await,
            (OP_TEXT, b"during the grace".to_vec())
        );
        phases.advance(Phase::Closing);
        for far in [&mut ends.client, &mut ends.backend] {
            let (opcode, payload) = far.next_data().await;
            assert_eq!((opcode, &payload[..2]), (OP_CLOSE, &[0x03, 0xE9][..]));
        }
        assert_eq!(task.await.expect("relay"), RelayEnd::Shutdown);
    }
}
