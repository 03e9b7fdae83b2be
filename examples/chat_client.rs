//! Command-line chat client for trying wsrouter (or a chat backend directly).
//!
//! ```text
//! # interactive: each stdin line is sent as {"text": line, "id": n}
//! cargo run --example chat_client -- --session alice --room lobby
//! # one-shot: send, print what comes back for --wait-ms, then close
//! cargo run --example chat_client -- --send hello --send again
//! # pretend to come from London / the US / Tokyo on a loopback demo
//! cargo run --example chat_client -- --forwarded-for 81.2.69.142 --send hi
//! ```
//!
//! `--forwarded-for` only moves you when the router trusts the loopback peer
//! as a proxy; otherwise the router ignores the header, as it should.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

#[derive(Parser, Debug)]
#[command(about = "Chat client for wsrouter's example chat backend")]
struct Args {
    /// WebSocket URL of the router (or of a backend directly).
    #[arg(long, default_value = "ws://127.0.0.1:8080/chat")]
    url: String,
    /// Session key, sent as the query parameter `session`.
    #[arg(long)]
    session: Option<String>,
    /// Chat room, sent as the query parameter `room`.
    #[arg(long, default_value = "lobby")]
    room: String,
    /// Value for the X-Forwarded-For request header (e.g. 81.2.69.142 London,
    /// 216.160.83.56 US, 2001:218::1 Tokyo).
    #[arg(long, value_name = "IP")]
    forwarded_for: Option<String>,
    /// Send this message (repeatable), wait --wait-ms for replies, then exit.
    /// Without --send, lines read from stdin are sent until end of input.
    #[arg(long, value_name = "TEXT")]
    send: Vec<String>,
    /// How long to keep printing replies after the last --send message.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

/// How long to wait for the server's answer to our close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            // tungstenite's errors repeat their source; the root cause is enough.
            match e.chain().nth(1) {
                Some(_) => println!("error: {e}: {}", e.root_cause()),
                None => println!("error: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// Connects, chats, and says whether the connection ended cleanly.
async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut url = args.url.clone();
    if let Some(session) = &args.session {
        append_query(&mut url, "session", session);
    }
    append_query(&mut url, "room", &args.room);

    let mut request = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("invalid WebSocket URL {url:?}"))?;
    if let Some(ip) = &args.forwarded_for {
        let value = HeaderValue::from_str(ip).context("invalid --forwarded-for value")?;
        request.headers_mut().insert("x-forwarded-for", value);
    }

    let (ws, response) = match tokio_tungstenite::connect_async(request).await {
        Ok(connected) => connected,
        Err(WsError::Http(response)) => {
            println!("refused by server: HTTP {}", response.status());
            if let Some(body) = response.body().as_deref().filter(|b| !b.is_empty()) {
                println!("{}", String::from_utf8_lossy(body).trim_end());
            }
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot connect to {url}")),
    };
    println!("upgraded: {url} (HTTP {})", response.status());

    let (mut sink, mut stream) = ws.split();
    // Print everything the server sends until the connection ends;
    // the task's result is the exit code (failure when the connection broke).
    let mut reader = tokio::spawn(async move {
        while let Some(message) = stream.next().await {
            match message {
                Ok(message) => print_message(&message),
                Err(e) => {
                    println!("connection error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        ExitCode::SUCCESS
    });

    let mut next_id = 0u64;
    let mut outgoing = |text: &str| {
        next_id += 1;
        Message::text(json!({ "text": text, "id": next_id }).to_string())
    };

    if !args.send.is_empty() {
        for text in &args.send {
            sink.send(outgoing(text)).await.context("send failed")?;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(args.wait_ms)) => {}
            ended = &mut reader => return Ok(ended.unwrap_or(ExitCode::FAILURE)), // closed first
        }
    } else {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            tokio::select! {
                line = lines.next_line() => match line.context("cannot read stdin")? {
                    Some(line) if line.trim().is_empty() => {}
                    Some(line) => sink.send(outgoing(&line)).await.context("send failed")?,
                    None => break, // end of input: say goodbye
                },
                ended = &mut reader => return Ok(ended.unwrap_or(ExitCode::FAILURE)), // closed
            }
        }
    }

    // Close politely and give the server a moment to answer.
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    if sink.send(Message::Close(Some(bye))).await.is_err() {
        reader.abort();
        return Ok(ExitCode::FAILURE);
    }
    match tokio::time::timeout(CLOSE_WAIT, &mut reader).await {
        Ok(ended) => Ok(ended.unwrap_or(ExitCode::FAILURE)),
        Err(_) => {
            println!("no close answer from the server within {CLOSE_WAIT:?}");
            reader.abort();
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_message(message: &Message) {
    match message {
        Message::Text(text) => print_text(text.as_str()),
        Message::Binary(bytes) => println!("<binary message, {} bytes>", bytes.len()),
        Message::Close(Some(frame)) => println!(
            "close frame received: code {} ({:?}) reason {:?}",
            u16::from(frame.code),
            frame.code,
            frame.reason.as_str()
        ),
        Message::Close(None) => println!("close frame received (no close code)"),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
    }
}

fn print_text(text: &str) {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        println!("{text}");
        return;
    };
    let field = |name: &str| value.get(name).and_then(Value::as_str).unwrap_or("?");
    match value.get("type").and_then(Value::as_str) {
        Some("welcome") => println!(
            "connected to backend {} in region {} (room {}; {})",
            field("backend"),
            field("region"),
            field("room"),
            describe_headers(value.get("headers"))
        ),
        Some("resumed") => println!(
            "conversation moved from {} to backend {} in region {} without reconnecting (room {}; {})",
            field("migrated_from"),
            field("backend"),
            field("region"),
            field("room"),
            describe_headers(value.get("headers"))
        ),
        Some("message") => println!("[{}] {}", field("backend"), field("text")),
        _ => println!("{text}"),
    }
}

fn describe_headers(headers: Option<&Value>) -> String {
    let Some(headers) = headers.and_then(Value::as_object).filter(|h| !h.is_empty()) else {
        return "no forwarding headers".to_owned();
    };
    let pairs: Vec<String> = headers
        .iter()
        .map(|(name, value)| format!("{name}: {}", value.as_str().unwrap_or("?")))
        .collect();
    format!("headers: {}", pairs.join(", "))
}

/// Appends `key=value` (value percent-encoded) to the query string of `url`.
fn append_query(url: &mut String, key: &str, value: &str) {
    if !url.ends_with('?') && !url.ends_with('&') {
        url.push(if url.contains('?') { '&' } else { '?' });
    }
    url.push_str(key);
    url.push('=');
    url.push_str(&percent_encode(value));
}

/// Percent-encodes everything except RFC 3986 unreserved characters.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
