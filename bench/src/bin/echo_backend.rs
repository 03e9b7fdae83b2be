//! A minimal, fast WebSocket echo server: the backend of the benchmarks.
//!
//! ```text
//! cargo run --release -p wsrouter-bench --bin echo_backend -- --listen 127.0.0.1:19001
//! ```
//!
//! Every text or binary message is sent back unchanged on the same
//! connection, on any path. `GET /healthz` (without an upgrade) is answered
//! `200 OK`, so the router's health checks pass. Replies are batched: all
//! the messages already read are written, then flushed with one write.
//!
//! With `--mark C` every echo carries the ASCII character C at the load
//! generator's mark position (byte 16 of a binary message, byte 32 of a text
//! one), so that the failover benchmark knows which backend answered.
//!
//! With `--http` it speaks plain HTTP/1.1 instead, as an engine.io server
//! does to long-polling clients (the Socket.IO benchmark,
//! `bench/socketio.sh`): every request, on any path, is answered at once
//! with `200 OK` and a small body (`POST`: `ok`, as engine.io answers a
//! send; anything else: [`POLL_BODY`], one Socket.IO event), and the
//! connection is kept alive until the client closes it or asks to
//! (`Connection: close`). Request bodies are read (by `Content-Length`, at
//! most 1 MiB) and dropped; chunked bodies get `411`.
//!
//! It raises its own open-files soft limit to the hard limit at start, and
//! by default runs on one thread so that it leaves the second core to the
//! proxy under test (`--threads` to change).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::{Buf, BytesMut};
use clap::Parser;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser, Debug)]
#[command(about = "WebSocket echo server for wsrouter's benchmarks")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:19001")]
    listen: SocketAddr,
    /// Worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Read buffer per connection, in bytes (tungstenite allocates it eagerly).
    #[arg(long, default_value_t = 16 * 1024)]
    read_buffer: usize,
    /// Largest message accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_message: usize,
    /// Stamp this ASCII character into every echo at the load generator's
    /// mark position (byte 16 of a binary message, 32 of a text one), so the
    /// failover benchmark can tell which backend echoed. Off: echoes are
    /// byte for byte what was received.
    #[arg(long)]
    mark: Option<char>,
    /// Acknowledge client messages to wsrouter: `X-Wsrouter-Ack: pong` on
    /// the 101 and a `wsrouter-ack N` pong after each echo (README,
    /// "Exactly once for backends that acknowledge").
    #[arg(long)]
    ack: bool,
    /// Serve HTTP/1.1 (engine.io long-polling) instead of WebSocket: every
    /// request gets `200 OK` and a small body at once, on kept-alive
    /// connections.
    #[arg(long, conflicts_with_all = ["mark", "ack"])]
    http: bool,
}

/// The request line prefix of a health check; the next byte must end the path.
const HEALTH_PREFIX: &[u8] = b"GET /healthz";

/// `--http`: the body of the answer to a `GET` (a long-poll), one Socket.IO
/// event as engine.io would deliver it.
const POLL_BODY: &[u8] = br#"42["message","0123456789abcdef"]"#;

/// `--http`: the longest request head, and the largest body, accepted.
const HTTP_MAX_HEAD: usize = 16 * 1024;
const HTTP_MAX_BODY: usize = 1024 * 1024;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => eprintln!("echo_backend: open files limit {limit}"),
        Err(e) => eprintln!("echo_backend: cannot raise the open files limit: {e}"),
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let socket = if args.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listener: TcpListener = socket.listen(4096)?;
    eprintln!("echo_backend: listening on {}", args.listen);

    let mark = match args.mark {
        None => None,
        Some(c) if c.is_ascii_graphic() => Some(c as u8),
        Some(c) => anyhow::bail!("--mark {c:?} must be a printable ASCII character"),
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(args.read_buffer)
        .max_message_size(Some(args.max_message))
        .max_frame_size(Some(args.max_message));
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                eprintln!("echo_backend: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if args.http {
            tokio::spawn(http_connection(stream));
        } else {
            tokio::spawn(connection(stream, config, mark, args.ack));
        }
    }
}

/// `--http`: answer every request on one connection until the client closes
/// it or asks to. Requests already read (pipelined) are answered with one
/// write.
async fn http_connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(512);
    loop {
        let mut close = false;
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_head(&buf[..end]);
            let (status, body, length) = match head {
                Ok(ref head) if head.length > HTTP_MAX_BODY => (413, &b"too large"[..], 0),
                Ok(ref head) if head.post => (200, &b"ok"[..], head.length),
                Ok(ref head) => (200, POLL_BODY, head.length),
                Err(status) => (status, &b"bad request"[..], 0),
            };
            let done = status != 200 || head.as_ref().is_ok_and(|h| h.close);
            if !done && buf.len() < end + 4 + length {
                break; // the body is not all here yet
            }
            buf.advance((end + 4 + length).min(buf.len()));
            write_answer(&mut out, status, body, done);
            if done {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
        if buf.len() > HTTP_MAX_HEAD + HTTP_MAX_BODY {
            return;
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if buf.len() > HTTP_MAX_HEAD && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return; // a head too long to be a request
        }
    }
}

/// What `--http` needs from a request head.
struct Head {
    post: bool,
    length: usize,
    close: bool,
}

/// The method, `Content-Length` and `Connection: close` of a request head
/// (without its blank line); `Err(status)` for what is not served.
fn parse_head(head: &[u8]) -> Result<Head, u16> {
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default();
    let _target = parts.next().ok_or(400u16)?;
    let version = parts.next().ok_or(400u16)?;
    let mut parsed = Head {
        post: method == "POST",
        length: 0,
        close: version == "HTTP/1.0",
    };
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(400u16)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            parsed.length = value.parse().map_err(|_| 400u16)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(411);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    parsed.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    parsed.close = false;
                }
            }
        }
    }
    Ok(parsed)
}

/// Append one answer to `out`.
fn write_answer(out: &mut Vec<u8>, status: u16, body: &[u8], close: bool) {
    let reason = match status {
        200 => "OK",
        411 => "Length Required",
        413 => "Payload Too Large",
        _ => "Bad Request",
    };
    let connection = if close { "close" } else { "keep-alive" };
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=UTF-8\r\n\
             Content-Length: {}\r\nConnection: {connection}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
}

/// One accepted connection: a health check or a WebSocket echo session.
async fn connection(stream: TcpStream, config: WebSocketConfig, mark: Option<u8>, ack: bool) {
    let _ = stream.set_nodelay(true);
    match is_health_check(&stream).await {
        Ok(true) => {
            let _ = answer_health(stream).await;
        }
        Ok(false) => {
            // The callback's Result type is fixed by tungstenite's trait.
            #[allow(clippy::result_large_err)]
            let opt_in = |_: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
                if ack {
                    response
                        .headers_mut()
                        .insert("x-wsrouter-ack", HeaderValue::from_static("pong"));
                }
                Ok(response)
            };
            if let Ok(ws) =
                tokio_tungstenite::accept_hdr_async_with_config(stream, opt_in, Some(config)).await
            {
                echo(ws, mark, ack).await;
            }
        }
        Err(_) => {}
    }
}

/// Peek at the first bytes, without consuming them, until they either are a
/// health check's request line or cannot be one.
async fn is_health_check(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; HEALTH_PREFIX.len() + 1];
    for _ in 0..500 {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let seen = &buf[..n.min(HEALTH_PREFIX.len())];
        if !HEALTH_PREFIX.starts_with(seen) {
            return Ok(false);
        }
        if n == buf.len() {
            return Ok(matches!(buf[HEALTH_PREFIX.len()], b' ' | b'?'));
        }
        // A request line split across segments: wait for the rest.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(false)
}

/// Read the request head (bounded) and answer 200.
async fn answer_health(mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
              Connection: close\r\n\r\nok\n",
        )
        .await?;
    stream.shutdown().await
}

/// Echo data messages until the peer closes. Pings are answered and close
/// frames echoed by tungstenite itself.
async fn echo(mut ws: tokio_tungstenite::WebSocketStream<TcpStream>, mark: Option<u8>, ack: bool) {
    // Data messages echoed on this connection, for acknowledgements.
    let mut echoed = 0u64;
    loop {
        let Some(Ok(first)) = ws.next().await else {
            return;
        };
        if !echo_one(&mut ws, first, mark, ack.then_some(&mut echoed)).await {
            return;
        }
        // Everything already read goes out with the same flush.
        while let Some(next) = ws.next().now_or_never() {
            match next {
                Some(Ok(msg)) => {
                    if !echo_one(&mut ws, msg, mark, ack.then_some(&mut echoed)).await {
                        return;
                    }
                }
                _ => {
                    let _ = ws.flush().await;
                    return;
                }
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

/// Queue the echo of one message, and with `acked` (the count echoed so
/// far) its acknowledgement; false when the connection is gone.
async fn echo_one(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    msg: Message,
    mark: Option<u8>,
    acked: Option<&mut u64>,
) -> bool {
    match msg {
        Message::Text(_) | Message::Binary(_) => {
            let msg = match mark {
                Some(mark) => marked(msg, mark),
                None => msg,
            };
            if ws.feed(msg).await.is_err() {
                return false;
            }
            let Some(acked) = acked else {
                return true;
            };
            *acked += 1;
            let ack = format!("wsrouter-ack {acked}");
            ws.feed(Message::Pong(ack.into_bytes().into()))
                .await
                .is_ok()
        }
        _ => true,
    }
}

/// The message with `mark` at the load generator's mark position, when it
/// is long enough to have one.
fn marked(msg: Message, mark: u8) -> Message {
    match msg {
        Message::Binary(body) if body.len() > 16 => {
            let mut body = body.to_vec();
            body[16] = mark;
            Message::Binary(body.into())
        }
        Message::Text(text)
            if text.len() > 32 && text.is_char_boundary(32) && text.is_char_boundary(33) =>
        {
            // One ASCII byte replaced by another: still valid UTF-8.
            let mut text = text.as_str().to_string();
            text.replace_range(32..33, (mark as char).encode_utf8(&mut [0; 4]));
            Message::Text(text.into())
        }
        other => other,
    }
}
