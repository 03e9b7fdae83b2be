//! The relay: messages both ways between an upgraded client and a connected
//! backend, with keepalive, idle timeout and close-code pass-through.
//!
//! This is the one interface the rest of the router uses to move traffic:
//! [`relay`] takes the two sides as `Sink + Stream` of tungstenite messages
//! (so a test can drive it with channels) and returns how the session ended
//! ([`RelayEnd`]). What happens after that (close the client, or, later,
//! migrate to another backend) is the caller's decision.

use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use metrics::Counter;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::config::RelayConfig;
use crate::metrics as m;

/// Payload of the router's own keepalive pings; their pongs are not relayed.
const KEEPALIVE: &[u8] = b"wsrouter-keepalive";

/// How a relay ended. The close frames have already been exchanged as the
/// variant describes; the caller only records the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client sent a close frame (code, if any); it was passed upstream.
    ClientClosed(Option<u16>),
    /// The backend sent a close frame; it was passed to the client.
    BackendClosed(Option<u16>),
    /// The client's connection failed without a close frame.
    ClientLost,
    /// The backend's connection failed without a close frame; the client
    /// was closed with 1011.
    BackendLost,
    /// One hop was silent past the idle timeout; both were closed with 1001.
    Idle,
    /// The client broke the protocol or a limit; it was closed with this code.
    ClientViolation(u16),
    /// The router is shutting down; both sides were closed with 1001.
    Shutdown,
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
            RelayEnd::ClientViolation(_) => "protocol_error",
            RelayEnd::Shutdown => "shutdown",
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

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// Relay until one side closes or fails, the hops go idle, or `shutdown`
/// becomes true.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    config: &RelayConfig,
    counters: &TrafficCounters,
    shutdown: &mut watch::Receiver<bool>,
) -> RelayEnd
where
    C: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
    U: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let mut keepalive = tokio::time::interval(config.ping_interval);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    keepalive.reset();
    let mut client_heard = Instant::now();
    let mut upstream_heard = Instant::now();

    loop {
        tokio::select! {
            // Client to backend. A failed send upstream is the backend's loss.
            msg = client.next() => {
                client_heard = Instant::now();
                match msg {
                    Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                        counters.messages_up.increment(1);
                        counters.bytes_up.increment(msg.len() as u64);
                        if upstream.send(msg).await.is_err() {
                            return lose_backend(client, config).await;
                        }
                    }
                    Some(Ok(Message::Ping(p))) => {
                        if upstream.send(Message::Ping(p)).await.is_err() {
                            return lose_backend(client, config).await;
                        }
                    }
                    Some(Ok(Message::Pong(p))) => {
                        if p.as_ref() != KEEPALIVE && upstream.send(Message::Pong(p)).await.is_err() {
                            return lose_backend(client, config).await;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.as_ref().map(|f| u16::from(f.code));
                        // tungstenite has queued the echo to the client.
                        let _ = client.flush().await;
                        finish_close(upstream, Message::Close(frame), config.close_timeout).await;
                        return RelayEnd::ClientClosed(code);
                    }
                    Some(Ok(Message::Frame(_))) => {}
                    Some(Err(e)) => {
                        let end = match client_violation(&e) {
                            Some(code) => {
                                finish_close(client, close_frame(code, violation_reason(code)), config.close_timeout).await;
                                RelayEnd::ClientViolation(code)
                            }
                            None => RelayEnd::ClientLost,
                        };
                        finish_close(upstream, close_frame(1001, "client went away"), config.close_timeout).await;
                        return end;
                    }
                    None => {
                        finish_close(upstream, close_frame(1001, "client went away"), config.close_timeout).await;
                        return RelayEnd::ClientLost;
                    }
                }
            }
            // Backend to client. A failed send to the client is the client's loss.
            msg = upstream.next() => {
                upstream_heard = Instant::now();
                match msg {
                    Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                        counters.messages_down.increment(1);
                        counters.bytes_down.increment(msg.len() as u64);
                        if client.send(msg).await.is_err() {
                            finish_close(upstream, close_frame(1001, "client went away"), config.close_timeout).await;
                            return RelayEnd::ClientLost;
                        }
                    }
                    Some(Ok(Message::Ping(p))) => {
                        let _ = client.send(Message::Ping(p)).await;
                    }
                    Some(Ok(Message::Pong(p))) => {
                        if p.as_ref() != KEEPALIVE {
                            let _ = client.send(Message::Pong(p)).await;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.as_ref().map(|f| u16::from(f.code));
                        let _ = upstream.flush().await;
                        finish_close(client, Message::Close(frame), config.close_timeout).await;
                        return RelayEnd::BackendClosed(code);
                    }
                    Some(Ok(Message::Frame(_))) => {}
                    Some(Err(_)) | None => return lose_backend(client, config).await,
                }
            }
            // Keepalive: ping a quiet hop; close both when one is silent too long.
            _ = keepalive.tick() => {
                let now = Instant::now();
                if now - client_heard >= config.idle_timeout || now - upstream_heard >= config.idle_timeout {
                    finish_close(client, close_frame(1001, "idle timeout"), config.close_timeout).await;
                    finish_close(upstream, close_frame(1001, "idle timeout"), config.close_timeout).await;
                    return RelayEnd::Idle;
                }
                if now - client_heard >= config.ping_interval {
                    let _ = client.send(Message::Ping(KEEPALIVE.into())).await;
                }
                if now - upstream_heard >= config.ping_interval {
                    let _ = upstream.send(Message::Ping(KEEPALIVE.into())).await;
                }
            }
            // Router shutdown.
            _ = crate::app::stopped(shutdown) => {
                finish_close(client, close_frame(1001, "router shutting down"), config.close_timeout).await;
                finish_close(upstream, close_frame(1001, "router shutting down"), config.close_timeout).await;
                return RelayEnd::Shutdown;
            }
        }
    }
}

/// The backend vanished without a close frame: tell the client.
async fn lose_backend<C>(client: &mut C, config: &RelayConfig) -> RelayEnd
where
    C: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    finish_close(
        client,
        close_frame(1011, "backend connection lost"),
        config.close_timeout,
    )
    .await;
    RelayEnd::BackendLost
}

/// The close code for a client error that is the client's fault.
fn client_violation(e: &WsError) -> Option<u16> {
    match e {
        WsError::Capacity(_) => Some(1009),
        WsError::Utf8(_) => Some(1007),
        WsError::Protocol(_) => Some(1002),
        _ => None,
    }
}

fn violation_reason(code: u16) -> &'static str {
    match code {
        1009 => "message too big",
        1007 => "invalid UTF-8",
        _ => "protocol error",
    }
}

/// Send a close frame (if the socket still takes one) and wait, bounded,
/// for the peer's answer, discarding anything else it sends meanwhile.
pub async fn finish_close<S>(ws: &mut S, close: Message, timeout: Duration)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let _ = tokio::time::timeout(timeout, async {
        if ws.send(close).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
        }
    })
    .await;
}
