//! The relay: messages both ways between an upgraded client and a connected
//! backend, with keepalive, idle timeout and close-code pass-through.
//!
//! This is the one interface the rest of the router uses to move traffic.
//! [`relay`] takes the two sides as `Sink + Stream` of tungstenite messages
//! (so a test can drive it with channels) and returns how the session ended
//! ([`RelayEnd`]). The two directions run as two pumps in the same task, so
//! a side that is slow to read never stops the other direction (an echo
//! backend under load would otherwise deadlock both TCP buffers).
//!
//! Ends caused by the client, by idleness or by shutdown are finished here
//! (close frames exchanged on both hops). Ends caused by the backend leave
//! the client untouched: the caller decides whether to pass the close on or
//! (with migration) to move the session elsewhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use metrics::Counter;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::config::RelayConfig;
use crate::limits::MessageBudget;
use crate::metrics as m;
use crate::session::migrate::{Control, MigrationReason, ReplayWindow};

/// Payload of the router's own keepalive pings; their pongs are not relayed.
const KEEPALIVE: &[u8] = b"wsrouter-keepalive";

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
    /// The client broke the protocol or a limit; it was closed with this
    /// code and the backend with 1001.
    ClientViolation(u16),
    /// The router is shutting down; both sides were closed with 1001.
    Shutdown,
    /// The router asked the session to move; both sides are untouched.
    MigrateRequested(MigrationReason),
}

impl RelayEnd {
    /// `wsrouter_closes_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            RelayEnd::ClientClosed(_) => "client_close",
            RelayEnd::BackendClosed(_) => "backend_close",
            RelayEnd::ClientLost => "client_lost",
            RelayEnd::BackendLost => "upstream_lost",
            RelayEnd::Idle => "idle_timeout",
            RelayEnd::ClientViolation(1009) => "message_too_big",
            RelayEnd::ClientViolation(1007) => "invalid_utf8",
            RelayEnd::ClientViolation(1008) => "message_rate",
            RelayEnd::ClientViolation(_) => "protocol_error",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::MigrateRequested(_) => "migrate",
        }
    }
}

/// Per-session handles on the traffic counters, resolved once.
#[derive(Clone)]
pub struct TrafficCounters {
    messages_up: Counter,
    bytes_up: Counter,
    messages_down: Counter,
    bytes_down: Counter,
}

impl TrafficCounters {
    pub fn new() -> TrafficCounters {
        TrafficCounters {
            messages_up: metrics::counter!(m::MESSAGES_TOTAL, "direction" => m::CLIENT_TO_BACKEND),
            bytes_up: metrics::counter!(m::BYTES_TOTAL, "direction" => m::CLIENT_TO_BACKEND),
            messages_down: metrics::counter!(m::MESSAGES_TOTAL, "direction" => m::BACKEND_TO_CLIENT),
            bytes_down: metrics::counter!(m::BYTES_TOTAL, "direction" => m::BACKEND_TO_CLIENT),
        }
    }
}

impl Default for TrafficCounters {
    fn default() -> Self {
        TrafficCounters::new()
    }
}

/// A close frame with a code and a fixed reason.
pub fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// How one direction's pump stopped.
enum PumpEnd {
    /// The source sent a close frame.
    Closed(Option<CloseFrame>),
    /// The source's connection failed.
    SourceLost,
    /// The source broke the protocol or a limit (close code for it).
    SourceViolation(u16),
    /// Writing to the destination failed.
    DestinationLost,
    /// The source was silent past the idle timeout.
    Idle,
}

/// Most messages forwarded before one flush.
const MAX_BATCH: usize = 64;

/// How a pump ends on a read that is not a message to forward.
fn source_end(read: Option<Result<Message, WsError>>) -> PumpEnd {
    match read {
        Some(Ok(Message::Close(frame))) => PumpEnd::Closed(frame),
        Some(Err(e)) => match violation_code(&e) {
            Some(code) => PumpEnd::SourceViolation(code),
            None => PumpEnd::SourceLost,
        },
        // Forwardable messages never get here (the caller handles them);
        // anything else unexpected counts as losing the source.
        None | Some(Ok(_)) => PumpEnd::SourceLost,
    }
}

/// Milliseconds since `epoch`, for "last heard" stamps shared by the pumps.
fn stamp(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// One direction: read `source`, write `destination`. It also pings the
/// destination when the other pump has not heard from it for a while.
#[allow(clippy::too_many_arguments)]
async fn pump<R, W>(
    source: &mut R,
    destination: &mut W,
    source_heard: &AtomicU64,
    destination_heard: &AtomicU64,
    epoch: Instant,
    config: &RelayConfig,
    messages: &Counter,
    bytes: &Counter,
    mut window: Option<&mut ReplayWindow>,
    mut budget: Option<&mut MessageBudget>,
) -> PumpEnd
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    W: Sink<Message, Error = WsError> + Unpin,
{
    let mut keepalive = tokio::time::interval(config.ping_interval);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    keepalive.reset();
    let ping_after = config.ping_interval.as_millis() as u64;
    let idle_after = config.idle_timeout.as_millis() as u64;
    loop {
        tokio::select! {
            msg = source.next() => {
                source_heard.store(stamp(epoch), Ordering::Relaxed);
                // Forward this message and whatever else is already readable
                // (bounded), then flush once: one write for a burst instead
                // of one per message.
                let mut next = Some(msg);
                let mut batched = 0;
                while let Some(msg) = next.take() {
                    let forward = match msg {
                        Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                            if let Some(budget) = budget.as_deref_mut()
                                && !budget.spend(msg.len())
                            {
                                let _ = destination.flush().await;
                                return PumpEnd::SourceViolation(1008);
                            }
                            messages.increment(1);
                            bytes.increment(msg.len() as u64);
                            if let Some(window) = window.as_deref_mut() {
                                window.push(msg.clone());
                            }
                            Some(msg)
                        }
                        Some(Ok(Message::Pong(p))) if p.as_ref() == KEEPALIVE => None,
                        Some(Ok(msg @ (Message::Ping(_) | Message::Pong(_)))) => Some(msg),
                        Some(Ok(Message::Frame(_))) => None,
                        end => {
                            // What was fed so far still goes out first.
                            let _ = destination.flush().await;
                            return source_end(end);
                        }
                    };
                    if let Some(forward) = forward
                        && destination.feed(forward).await.is_err()
                    {
                        return PumpEnd::DestinationLost;
                    }
                    batched += 1;
                    if batched < MAX_BATCH {
                        next = source.next().now_or_never();
                    }
                }
                if destination.flush().await.is_err() {
                    return PumpEnd::DestinationLost;
                }
            }
            _ = keepalive.tick() => {
                let now = stamp(epoch);
                if now.saturating_sub(source_heard.load(Ordering::Relaxed)) >= idle_after {
                    return PumpEnd::Idle;
                }
                if now.saturating_sub(destination_heard.load(Ordering::Relaxed)) >= ping_after
                    && destination.send(Message::Ping(KEEPALIVE.into())).await.is_err()
                {
                    return PumpEnd::DestinationLost;
                }
            }
        }
    }
}

/// The session-owned state a relay works with.
pub struct RelayContext<'a> {
    pub config: &'a RelayConfig,
    pub counters: &'a TrafficCounters,
    /// Becomes true when sessions must close (end of the shutdown grace).
    pub shutdown: &'a mut watch::Receiver<bool>,
    /// Requests to move the session.
    pub control: &'a mut mpsc::Receiver<Control>,
    /// Every client data message is recorded here before it is forwarded.
    pub window: &'a mut ReplayWindow,
    /// The client's message and byte rate limits, when configured.
    pub budget: Option<&'a mut MessageBudget>,
}

/// Relay until one side closes or fails, a hop goes idle, the session is
/// asked to move, or `shutdown` becomes true. See the module doc for who has
/// been told what.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U, cx: RelayContext<'_>) -> RelayEnd
where
    C: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
    U: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = upstream.split();
    let epoch = Instant::now();
    let client_heard = AtomicU64::new(0);
    let upstream_heard = AtomicU64::new(0);

    let RelayContext {
        config,
        counters,
        shutdown,
        control,
        window,
        budget,
    } = cx;
    enum Stopped {
        Up(PumpEnd),
        Down(PumpEnd),
        Shutdown,
        Migrate(MigrationReason),
    }
    let stopped = {
        let up = pump(
            &mut client_rx,
            &mut upstream_tx,
            &client_heard,
            &upstream_heard,
            epoch,
            config,
            &counters.messages_up,
            &counters.bytes_up,
            Some(window),
            budget,
        );
        let down = pump(
            &mut upstream_rx,
            &mut client_tx,
            &upstream_heard,
            &client_heard,
            epoch,
            config,
            &counters.messages_down,
            &counters.bytes_down,
            None,
            None,
        );
        tokio::select! {
            end = up => Stopped::Up(end),
            end = down => Stopped::Down(end),
            _ = crate::app::stopped(shutdown) => Stopped::Shutdown,
            Some(Control::Migrate(reason)) = control.recv() => Stopped::Migrate(reason),
        }
    };

    let timeout = config.close_timeout;
    let going_away = || close_frame(1001, "client went away");
    match stopped {
        Stopped::Up(PumpEnd::Closed(frame)) => {
            let code = frame.as_ref().map(|f| u16::from(f.code));
            // tungstenite has queued the echo of the client's close.
            let _ = client_tx.flush().await;
            finish_close(
                &mut upstream_tx,
                &mut upstream_rx,
                Message::Close(frame),
                timeout,
            )
            .await;
            RelayEnd::ClientClosed(code)
        }
        Stopped::Up(PumpEnd::SourceLost) | Stopped::Down(PumpEnd::DestinationLost) => {
            finish_close(&mut upstream_tx, &mut upstream_rx, going_away(), timeout).await;
            RelayEnd::ClientLost
        }
        Stopped::Up(PumpEnd::SourceViolation(code)) => {
            let reason = match code {
                1009 => "message too big",
                1007 => "invalid UTF-8",
                1008 => "message rate limit",
                _ => "protocol error",
            };
            finish_close(
                &mut client_tx,
                &mut client_rx,
                close_frame(code, reason),
                timeout,
            )
            .await;
            finish_close(&mut upstream_tx, &mut upstream_rx, going_away(), timeout).await;
            RelayEnd::ClientViolation(code)
        }
        Stopped::Down(PumpEnd::Closed(frame)) => {
            // tungstenite has queued the echo of the backend's close.
            let _ = upstream_tx.flush().await;
            RelayEnd::BackendClosed(frame)
        }
        Stopped::Down(PumpEnd::SourceLost | PumpEnd::SourceViolation(_))
        | Stopped::Up(PumpEnd::DestinationLost) => RelayEnd::BackendLost,
        Stopped::Up(PumpEnd::Idle) | Stopped::Down(PumpEnd::Idle) => {
            finish_close(
                &mut client_tx,
                &mut client_rx,
                close_frame(1001, "idle timeout"),
                timeout,
            )
            .await;
            finish_close(
                &mut upstream_tx,
                &mut upstream_rx,
                close_frame(1001, "idle timeout"),
                timeout,
            )
            .await;
            RelayEnd::Idle
        }
        Stopped::Migrate(reason) => RelayEnd::MigrateRequested(reason),
        Stopped::Shutdown => {
            let bye = || close_frame(1001, "router shutting down");
            let client_side = finish_close(&mut client_tx, &mut client_rx, bye(), timeout);
            let upstream_side = finish_close(&mut upstream_tx, &mut upstream_rx, bye(), timeout);
            tokio::join!(client_side, upstream_side);
            RelayEnd::Shutdown
        }
    }
}

/// The close code for a read error that is the peer's fault.
fn violation_code(e: &WsError) -> Option<u16> {
    match e {
        WsError::Capacity(_) => Some(1009),
        WsError::Utf8(_) => Some(1007),
        WsError::Protocol(_) => Some(1002),
        _ => None,
    }
}

/// Send a close frame (if the socket still takes one) and wait, bounded,
/// for the peer's answer, discarding anything else it sends meanwhile.
pub async fn finish_close<W, R>(tx: &mut W, rx: &mut R, close: Message, timeout: Duration)
where
    W: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let _ = tokio::time::timeout(timeout, async {
        if tx.send(close).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_close() {
                break;
            }
        }
    })
    .await;
}
