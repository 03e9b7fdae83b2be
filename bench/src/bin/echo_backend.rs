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
//! It raises its own open-files soft limit to the hard limit at start, and
//! by default runs on one thread so that it leaves the second core to the
//! proxy under test (`--threads` to change).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
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
}

/// The request line prefix of a health check; the next byte must end the path.
const HEALTH_PREFIX: &[u8] = b"GET /healthz";

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
        tokio::spawn(connection(stream, config, mark, args.ack));
    }
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
