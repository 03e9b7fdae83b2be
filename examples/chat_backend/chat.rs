//! A small multi-room chat server for one region: the kind of WebSocket
//! backend wsrouter sits in front of.
//!
//! This module owns everything the example backend does on the wire:
//!
//! - `GET /healthz` answers `200 OK` with body `ok` (HTTP/1.1,
//!   `Connection: close`), for the router's active health checks.
//! - Any other path carrying a WebSocket upgrade is accepted. The room comes
//!   from the query parameter `room` (default `lobby`). A request without an
//!   upgrade gets `426 Upgrade Required`.
//! - On connect the client gets one JSON welcome:
//!   `{"type":"welcome","backend":..,"region":..,"room":..,"headers":{..}}`,
//!   where `headers` echoes the `x-wsrouter-*`, `x-forwarded-for`,
//!   `x-real-ip` and `x-forwarded-proto` request headers (lowercased names),
//!   so a demo shows what the router told the backend. When the request
//!   carries `X-Wsrouter-Migrated-From`, the type is `resumed` and the
//!   welcome adds `"migrated_from"`.
//! - Each text message is broadcast to every client in the same room on this
//!   backend (the sender included) as
//!   `{"type":"message","backend":..,"room":..,"text":..,"id":..}`. A message
//!   that is JSON `{"text": "...", "id": <number, optional>}` is unpacked;
//!   anything else is broadcast verbatim as the text. Binary messages are
//!   ignored.
//!
//! Rooms are per backend: two clients only see each other when the router
//! placed them on the same backend. Pings are answered by tungstenite.
//!
//! Acknowledgements: the 101 says `X-Wsrouter-Ack: pong`, and after handling
//! each client message (broadcast, or dropped as a duplicate) the backend
//! sends an unsolicited pong `wsrouter-ack N`, N the client messages it has
//! finished with on this connection. Behind wsrouter that makes delivery
//! exactly once across a crash (only unacknowledged messages are replayed);
//! clients that connect directly ignore the pongs.
//!
//! Migration: a session the router moved here is greeted as `resumed`, and
//! among the first `X-Wsrouter-Replayed` messages, any whose client `id` the
//! chat service has already seen for that `X-Wsrouter-Session` is dropped.
//! The record of seen ids is a [`SeenIds`] store; backends that share one
//! (as the demo's three do, standing in for a shared message log) drop the
//! duplicates of a backend that died.
//!
//! The entry point is [`serve`]; it is a module (not a binary) so that tests
//! can start backends in-process on ephemeral ports.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

/// Longest request head (request line + headers) we read before answering 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages a slow client may fall behind in its room before it skips some.
const ROOM_BUFFER: usize = 256;
/// Message ids remembered per session key, for dropping replayed duplicates.
const SEEN_PER_SESSION: usize = 1024;
/// Session keys remembered before the record starts over.
const SEEN_SESSIONS: usize = 100_000;

/// Client message ids seen per session key: what lets a backend drop the
/// replays of messages the chat service already has.
#[derive(Default)]
pub struct SeenIds {
    by_session: Mutex<HashMap<String, VecDeque<String>>>,
}

impl SeenIds {
    /// Record `id` for `session`; returns whether it was already there.
    fn check_and_record(&self, session: &str, id: &str) -> bool {
        let mut map = self.by_session.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SEEN_SESSIONS && !map.contains_key(session) {
            map.clear();
        }
        let ids = map.entry(session.to_owned()).or_default();
        if ids.iter().any(|seen| seen == id) {
            return true;
        }
        if ids.len() == SEEN_PER_SESSION {
            ids.pop_front();
        }
        ids.push_back(id.to_owned());
        false
    }
}

/// Serves the chat on `listener` until an unrecoverable accept error.
///
/// `id` and `region` name this backend in every welcome and message, so a
/// client can see where the router placed it. Each connection runs in its
/// own task; per-connection failures are logged and never end the server.
pub async fn serve(listener: TcpListener, id: String, region: String) -> io::Result<()> {
    serve_shared(listener, id, region, Arc::default()).await
}

/// [`serve`], with a record of seen message ids shared with other backends.
/// Dropping (or aborting) this future drops every connection at once, as a
/// crashed server would.
pub async fn serve_shared(
    listener: TcpListener,
    id: String,
    region: String,
    seen: Arc<SeenIds>,
) -> io::Result<()> {
    let backend = Arc::new(Backend {
        id,
        region,
        rooms: Mutex::new(HashMap::new()),
        seen,
    });
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
            Some(_) = connections.join_next() => continue,
        };
        let backend = Arc::clone(&backend);
        connections.spawn(async move {
            if let Err(e) = backend.handle_connection(stream, peer).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Errors that concern one connection or a momentary shortage, not the listener.
fn is_transient_accept_error(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut | OutOfMemory
    ) || matches!(e.raw_os_error(), Some(23 | 24 | 105)) // ENFILE, EMFILE, ENOBUFS
}

struct Backend {
    id: String,
    region: String,
    /// One broadcast channel per room; a room is removed when its last client leaves.
    rooms: Mutex<HashMap<String, broadcast::Sender<String>>>,
    /// Message ids already seen, per session key.
    seen: Arc<SeenIds>,
}

/// What a connection needs to recognise replayed duplicates.
struct Replay {
    session: Option<String>,
    /// How many of the first messages the router marked as replays.
    replayed: usize,
}

/// What the handshake callback saw of the upgrade request.
#[derive(Default)]
struct Upgrade {
    path: String,
    query: Option<String>,
    /// Forwarding and router headers, lowercased name -> value.
    headers: Map<String, Value>,
}

/// A client message in the structured form `{"text": "...", "id": 3}`.
#[derive(Deserialize)]
struct ClientMessage {
    text: String,
    id: Option<serde_json::Number>,
}

impl Backend {
    async fn handle_connection(&self, mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return Ok(()), // closed before a full request
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                return write_plain(&mut stream, "431 Request Header Fields Too Large", "").await;
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return write_plain(&mut stream, "408 Request Timeout", "").await,
        };
        let Some(summary) = RequestSummary::parse(&head) else {
            return write_plain(&mut stream, "400 Bad Request", "bad request\n").await;
        };
        if summary.path == "/healthz" {
            return match summary.method.as_str() {
                "GET" | "HEAD" => write_plain(&mut stream, "200 OK", "ok").await,
                _ => write_plain(&mut stream, "405 Method Not Allowed", "").await,
            };
        }
        if !summary.wants_websocket {
            return write_plain(&mut stream, "426 Upgrade Required", "websocket only\n").await;
        }

        // Hand tungstenite the bytes we already consumed, then the rest of the socket.
        let (read_half, write_half) = stream.into_split();
        let io = tokio::io::join(io::Cursor::new(head).chain(read_half), write_half);
        self.run_websocket(io, peer).await
    }

    async fn run_websocket<S>(&self, io: S, peer: SocketAddr) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut upgrade = Upgrade::default();
        // The callback's Result type is fixed by tungstenite's `Callback` trait.
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
            upgrade = Upgrade::from_request(req);
            resp.headers_mut().insert(
                "x-wsrouter-ack",
                tokio_tungstenite::tungstenite::http::HeaderValue::from_static("pong"),
            );
            Ok(resp)
        };
        let ws = tokio_tungstenite::accept_hdr_async(io, callback)
            .await
            .map_err(io::Error::other)?;

        let room = query_param(upgrade.query.as_deref(), "room")
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "lobby".to_owned());
        let migrated_from = upgrade
            .headers
            .get("x-wsrouter-migrated-from")
            .and_then(Value::as_str)
            .map(str::to_owned);
        tracing::info!(%peer, path = %upgrade.path, %room, ?migrated_from, "client joined");

        let mut welcome = json!({
            "type": if migrated_from.is_some() { "resumed" } else { "welcome" },
            "backend": self.id,
            "region": self.region,
            "room": room,
            "headers": upgrade.headers,
        });
        if let Some(from) = migrated_from {
            welcome["migrated_from"] = Value::String(from);
        }

        let header = |name: &str| {
            upgrade
                .headers
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let replay = Replay {
            session: header("x-wsrouter-session"),
            replayed: header("x-wsrouter-replayed")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        };

        // Subscribe before the welcome so nothing said after it is missed.
        let (room_tx, mut room_rx) = self.join(&room);
        let result = self
            .chat(ws, welcome, &room, &room_tx, &mut room_rx, replay)
            .await;
        drop(room_rx);
        self.leave(&room, &room_tx);
        tracing::info!(%peer, %room, "client left");
        result
    }

    /// Relays one client's messages into its room and the room's messages to it.
    async fn chat<S>(
        &self,
        ws: tokio_tungstenite::WebSocketStream<S>,
        welcome: Value,
        room: &str,
        room_tx: &broadcast::Sender<String>,
        room_rx: &mut broadcast::Receiver<String>,
        replay: Replay,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut sink, mut stream) = ws.split();
        let mut received = 0usize;
        sink.send(Message::text(welcome.to_string()))
            .await
            .map_err(io::Error::other)?;
        loop {
            tokio::select! {
                incoming = stream.next() => match incoming {
                    // The stream ends after the close handshake (tungstenite
                    // replies to the client's close frame while we keep reading).
                    None => return Ok(()),
                    Some(Err(e)) => return Err(io::Error::other(e)),
                    Some(Ok(Message::Text(text))) => {
                        received += 1;
                        if self.is_duplicate(&replay, received, text.as_str()) {
                            tracing::info!(%room, "dropped a replayed duplicate");
                        } else {
                            // No receivers only means everyone left.
                            let _ = room_tx.send(self.render(room, text.as_str()));
                        }
                        acknowledge(&mut sink, received).await?;
                    }
                    Some(Ok(Message::Binary(_))) => {
                        received += 1;
                        acknowledge(&mut sink, received).await?;
                    }
                    Some(Ok(Message::Close(frame))) => {
                        tracing::debug!(?frame, "client sent close");
                    }
                    Some(Ok(_)) => {} // binary, ping, pong: nothing to broadcast
                },
                outgoing = room_rx.recv() => match outgoing {
                    Ok(text) => {
                        if let Err(e) = sink.send(Message::text(text)).await {
                            return Err(io::Error::other(e));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::warn!(skipped, %room, "slow client skipped messages");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }

    /// Whether the `nth` message (from 1) of this connection is a replay of
    /// one already seen. Every message's id is recorded.
    fn is_duplicate(&self, replay: &Replay, nth: usize, raw: &str) -> bool {
        let Some(session) = &replay.session else {
            return false;
        };
        let Ok(ClientMessage { id: Some(id), .. }) = serde_json::from_str::<ClientMessage>(raw)
        else {
            return false;
        };
        let seen = self.seen.check_and_record(session, &id.to_string());
        seen && nth <= replay.replayed
    }

    /// The broadcast form of one client text message.
    fn render(&self, room: &str, raw: &str) -> String {
        let mut out = json!({ "type": "message", "backend": self.id, "room": room });
        match serde_json::from_str::<ClientMessage>(raw) {
            Ok(msg) => {
                out["text"] = Value::String(msg.text);
                if let Some(id) = msg.id {
                    out["id"] = Value::Number(id);
                }
            }
            Err(_) => out["text"] = Value::String(raw.to_owned()),
        }
        out.to_string()
    }

    fn join(&self, room: &str) -> (broadcast::Sender<String>, broadcast::Receiver<String>) {
        let mut rooms = self
            .rooms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tx = rooms
            .entry(room.to_owned())
            .or_insert_with(|| broadcast::channel(ROOM_BUFFER).0)
            .clone();
        let rx = tx.subscribe();
        (tx, rx)
    }

    /// Forgets a room once its last client has gone (call after dropping the receiver).
    fn leave(&self, room: &str, tx: &broadcast::Sender<String>) {
        let mut rooms = self
            .rooms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if tx.receiver_count() == 0 {
            rooms.remove(room);
        }
    }
}

impl Upgrade {
    fn from_request(req: &Request) -> Self {
        let mut headers = Map::new();
        for (name, value) in req.headers() {
            let name = name.as_str(); // http::HeaderName is already lowercase
            let wanted = name.starts_with("x-wsrouter-")
                || matches!(name, "x-forwarded-for" | "x-real-ip" | "x-forwarded-proto");
            if !wanted {
                continue;
            }
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            // Repeated header lines combine as a comma-separated list (RFC 9110 5.3).
            match headers.get_mut(name) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                _ => {
                    headers.insert(name.to_owned(), Value::String(value));
                }
            }
        }
        Upgrade {
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
            headers,
        }
    }
}

/// The little we need from a request head to route it before the handshake.
struct RequestSummary {
    method: String,
    path: String,
    wants_websocket: bool,
}

impl RequestSummary {
    fn parse(head: &[u8]) -> Option<Self> {
        let head = std::str::from_utf8(head).ok()?;
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next()?.split(' ');
        let method = request_line.next()?.to_owned();
        let target = request_line.next()?;
        let path = target.split('?').next().unwrap_or(target).to_owned();
        let wants_websocket = lines.any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("upgrade")
                    && value
                        .split(',')
                        .any(|v| v.trim().eq_ignore_ascii_case("websocket"))
            })
        });
        Some(RequestSummary {
            method,
            path,
            wants_websocket,
        })
    }
}

/// Reads up to and including the blank line that ends the request head.
/// `Ok(None)` when the peer closes first; `InvalidData` when the head is too long.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
        // Any bytes past the head go to tungstenite with it (which rejects
        // frames sent before the 101 as junk).
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

/// Writes a complete plain-text HTTP/1.1 answer and closes our side.
async fn write_plain(stream: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The first value of `name` in a URL query string, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

/// Decodes `%XX` escapes and `+` (as a space); malformed escapes stay as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Tell the router this connection's first `handled` client messages are
/// finished with (README, "Exactly once for backends that acknowledge").
async fn acknowledge<S>(sink: &mut S, handled: usize) -> io::Result<()>
where
    S: futures_util::Sink<Message> + Unpin,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    let ack = format!("wsrouter-ack {handled}");
    sink.send(Message::Pong(ack.into_bytes().into()))
        .await
        .map_err(io::Error::other)
}
