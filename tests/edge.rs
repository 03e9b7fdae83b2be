//! Edge protection: per-IP rates and caps, the global cap, Origin checks,
//! per-session message rates, "under attack" mode, slowloris, floods and
//! garbage. Each limit answers with its status or close code and a counted
//! reason, and never disturbs other sessions.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::SinkExt;
use support::{
    Client, TestBackend, WAIT, close, echo, eventually, key, masked_header, metric, raw_session,
    read_close_code, read_frame, read_welcome, recv_data, router, trace_init, within,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const KEY_HEADER: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";

/// A TCP connection to `to` from the loopback address `from` (127.0.0.x).
async fn tcp_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from.parse().expect("source address"), 0))
        .expect("bind the source address");
    socket.connect(to).await.expect("connect")
}

/// A WebSocket session to the router from `from`, with extra headers.
async fn connect_from(
    from: &str,
    router: SocketAddr,
    session: &str,
    headers: &[(&str, &str)],
) -> Result<Client, u16> {
    let stream = tcp_from(from, router).await;
    let mut request = format!("ws://{router}/chat?session={session}")
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
            .expect("header name");
        request
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    match within(
        "handshake",
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream)),
    )
    .await
    {
        Ok((client, _)) => Ok(client),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
    }
}

/// Send a raw upgrade request from `from` and return the status code.
async fn raw_upgrade_status(from: &str, router: SocketAddr, extra: &str) -> Option<u16> {
    let mut stream = tcp_from(from, router).await;
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{KEY_HEADER}\r\n{extra}\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut buf = [0u8; 12];
    let mut read = 0;
    while read < 12 {
        match tokio::time::timeout(WAIT, stream.read(&mut buf[read..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => read += n,
        }
    }
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

fn limits(toml: &str) -> String {
    format!("[limits]\n{toml}\n")
}

#[tokio::test]
async fn per_ip_connection_rate_refuses_with_429_and_spares_other_addresses() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-rate").await;
    let router = router()
        .backend(&backend, "eu")
        .extra(&limits(
            "per_ip_connection_rate = 1\nper_ip_connection_burst = 3",
        ))
        .start()
        .await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(raw_upgrade_status("127.0.0.1", router.public, "").await);
    }
    let accepted = statuses.iter().filter(|s| **s == Some(101)).count();
    let limited = statuses.iter().filter(|s| **s == Some(429)).count();
    assert!(
        (3..=4).contains(&accepted),
        "accepted {accepted}: {statuses:?}"
    );
    assert_eq!(accepted + limited, 10, "{statuses:?}");
    // Another address has its own bucket.
    let mut other = connect_from("127.0.0.2", router.public, "other", &[])
        .await
        .expect("a different address is not limited");
    assert_eq!(read_welcome(&mut other).await.backend, "edge-rate");
    // Metrics are per process, and other tests here limit too: at least ours.
    let counted = metric(
        router.admin,
        r#"wsrouter_rejected_connections_total{reason="rate_limit"}"#,
    )
    .await;
    assert!(
        counted as usize >= limited,
        "{counted} counted, {limited} refused here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_is_held_to_its_rate_while_others_chat() {
    let _trace = trace_init();
    support::raise_fd_limit();
    let backend = TestBackend::start("edge-flood").await;
    let router = router()
        .backend(&backend, "eu")
        .extra(&limits(
            "per_ip_connection_rate = 10\nper_ip_connection_burst = 20",
        ))
        .start()
        .await;
    // An established session from another address, chatting through the flood.
    let mut bystander = connect_from("127.0.0.3", router.public, "bystander", &[])
        .await
        .unwrap();
    read_welcome(&mut bystander).await;

    let started = Instant::now();
    let public = router.public;
    let mut flood = tokio::task::JoinSet::new();
    let attempts = 2_000;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Option<u16>>(attempts);
    for _ in 0..100 {
        let done_tx = done_tx.clone();
        flood.spawn(async move {
            for _ in 0..attempts / 100 {
                let status = raw_upgrade_status("127.0.0.1", public, "").await;
                let _ = done_tx.send(status).await;
            }
        });
    }
    drop(done_tx);
    let mut n = 0;
    while let Some(status) = done_rx.recv().await {
        if n % 200 == 0 {
            echo(&mut bystander, &format!("still here {n}")).await;
        }
        n += 1;
        let _ = status;
    }
    while flood.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let upgraded = backend.sessions() - 1; // the bystander
    let allowed = 20.0 + 10.0 * elapsed + 2.0;
    assert!(
        (upgraded as f64) <= allowed,
        "{upgraded} upgrades from one address in {elapsed:.1} s; the bucket allows {allowed:.0}"
    );
    // A new client from another address still gets in.
    let mut newcomer = connect_from("127.0.0.4", router.public, "newcomer", &[])
        .await
        .unwrap();
    read_welcome(&mut newcomer).await;
}

#[tokio::test]
async fn per_ip_and_global_session_caps() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-caps").await;
    let router = router()
        .backend(&backend, "eu")
        .extra(&limits("per_ip_max_sessions = 2\nmax_sessions = 3"))
        .start()
        .await;
    let a1 = connect_from("127.0.0.1", router.public, "a1", &[])
        .await
        .unwrap();
    let _a2 = connect_from("127.0.0.1", router.public, "a2", &[])
        .await
        .unwrap();
    assert_eq!(
        connect_from("127.0.0.1", router.public, "a3", &[])
            .await
            .err(),
        Some(429)
    );
    let _b1 = connect_from("127.0.0.2", router.public, "b1", &[])
        .await
        .unwrap();
    // Three sessions in all: the router is full, for everyone.
    assert_eq!(
        connect_from("127.0.0.5", router.public, "c1", &[])
            .await
            .err(),
        Some(503)
    );
    // A closed session gives its places back.
    close(a1).await;
    let mut again = None;
    eventually("a freed place is usable", WAIT, async || {
        again = connect_from("127.0.0.1", router.public, "a4", &[])
            .await
            .ok();
        again.is_some()
    })
    .await;
    let per_ip = metric(
        router.admin,
        r#"wsrouter_rejected_connections_total{reason="per_ip_sessions"}"#,
    )
    .await;
    let global = metric(
        router.admin,
        r#"wsrouter_rejected_connections_total{reason="max_sessions"}"#,
    )
    .await;
    assert!(
        per_ip >= 1.0 && global >= 1.0,
        "per_ip {per_ip}, global {global}"
    );
}

#[tokio::test]
async fn per_session_message_and_byte_rates_close_with_1008() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-msgrate").await;
    let router = router()
        .backend(&backend, "eu")
        .extra(&limits(
            "session_message_rate = 5\nsession_message_burst = 5\nsession_byte_rate = 2000\nsession_byte_burst = 2000",
        ))
        .start()
        .await;
    // Within the rate: fine.
    let (mut calm, _) = router.connect(&key("calm", 1), &[]).await;
    calm.send(Message::text("hello")).await.unwrap();
    assert_eq!(recv_data(&mut calm).await, Message::text("hello"));

    // Too many messages at once.
    let (mut chatty, _) = router.connect(&key("chatty", 1), &[]).await;
    for i in 0..30 {
        if chatty.send(Message::text(format!("m{i}"))).await.is_err() {
            break;
        }
    }
    let code = loop {
        match recv_data(&mut chatty).await {
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            _ => continue,
        }
    };
    assert_eq!(code, Some(1008));

    // Too many bytes in few messages.
    let (mut bulky, _) = router.connect(&key("bulky", 1), &[]).await;
    for _ in 0..4 {
        if bulky.send(Message::binary(vec![0u8; 1500])).await.is_err() {
            break;
        }
    }
    let code = loop {
        match recv_data(&mut bulky).await {
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            _ => continue,
        }
    };
    assert_eq!(code, Some(1008));
    // The calm session is undisturbed.
    calm.send(Message::text("still fine")).await.unwrap();
    assert_eq!(recv_data(&mut calm).await, Message::text("still fine"));
}

#[tokio::test]
async fn origin_allow_list_answers_403_before_the_upgrade() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-origin").await;
    let router = router()
        .backend(&backend, "eu")
        .extra(&limits("allowed_origins = [\"https://chat.example\"]"))
        .start()
        .await;
    let status = raw_upgrade_status(
        "127.0.0.1",
        router.public,
        "Origin: https://evil.example\r\n",
    )
    .await;
    assert_eq!(status, Some(403));
    assert_eq!(
        backend.requests(),
        0,
        "a refused Origin reached the backend"
    );
    let (_, welcome) = router
        .connect(&key("origin", 1), &[("Origin", "https://chat.example")])
        .await;
    assert_eq!(welcome.header("origin"), Some("https://chat.example"));
    // Non-browser clients send no Origin; allowed unless under attack.
    router.connect(&key("origin", 2), &[]).await;
    let counted = metric(
        router.admin,
        r#"wsrouter_rejected_connections_total{reason="origin"}"#,
    )
    .await;
    assert!(counted >= 1.0, "{counted}");
}

#[tokio::test]
async fn under_attack_mode_tightens_limits_without_cutting_sessions() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-attack").await;
    let router = router()
        .backend(&backend, "eu")
        .extra(&limits(
            "allowed_origins = [\"https://chat.example\"]\n[limits.under_attack]\nper_ip_max_sessions = 2\nper_ip_connection_rate = 100\nper_ip_connection_burst = 100",
        ))
        .admin_token("attack-token")
        .start()
        .await;
    let (mut established, _) = router.connect(&key("attack", 1), &[]).await;

    assert_eq!(router.admin_post("/api/attack-mode/on", None).await.0, 401);
    assert_eq!(
        router
            .admin_post("/api/attack-mode/on", Some("wrong"))
            .await
            .0,
        401
    );
    let (status, body) = router
        .admin_post("/api/attack-mode/on", Some("attack-token"))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = router.admin_get("/api/attack-mode").await;
    assert!(body.contains("true"), "{body}");

    // The established session keeps flowing.
    established
        .send(Message::text("through the switch"))
        .await
        .unwrap();
    assert_eq!(
        recv_data(&mut established).await,
        Message::text("through the switch")
    );
    // New sessions need an allowed Origin now.
    assert_eq!(
        raw_upgrade_status("127.0.0.1", router.public, "").await,
        Some(403)
    );
    let origin = [("Origin", "https://chat.example")];
    let _second = router.connect(&key("attack", 2), &origin).await;
    // And the stricter per-IP cap (2) counts the established one.
    assert_eq!(
        connect_from("127.0.0.1", router.public, "attack-3", &origin)
            .await
            .err(),
        Some(429)
    );
    // Off again: back to normal.
    router
        .admin_post("/api/attack-mode/off", Some("attack-token"))
        .await;
    router.connect(&key("attack", 4), &[]).await;
    let (_, metrics) = router.admin_get("/metrics").await;
    assert!(!metrics.contains("attack-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_at_the_deadline_while_others_chat() {
    let _trace = trace_init();
    support::raise_fd_limit();
    let backend = TestBackend::start("edge-slow").await;
    let router = router()
        .backend(&backend, "eu")
        .handshake_timeout("1s")
        .start()
        .await;
    let (mut established, _) = router.connect(&key("slow", 0), &[]).await;
    let request =
        format!("GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n{KEY_HEADER}\r\n");
    let mut slow = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..200 {
        let public = router.public;
        let request = request.clone();
        slow.spawn(async move {
            let mut stream = TcpStream::connect(public).await.expect("connect");
            // One byte every 100 ms: never a whole request.
            for byte in request.bytes() {
                if stream.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut buf = [0u8; 64];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await
                {
                    return (n, buf); // answered (408) or closed (0)
                }
            }
            (usize::MAX, [0u8; 64])
        });
    }
    // Meanwhile the established session flows, and a newcomer gets in.
    for i in 0..5 {
        echo(&mut established, &format!("flowing {i}")).await;
    }
    let (_, newcomer) = router.connect(&key("slow", 1), &[]).await;
    assert_eq!(newcomer.backend, "edge-slow");
    while let Some(result) = slow.join_next().await {
        let (n, buf) = result.unwrap();
        assert_ne!(n, usize::MAX, "a slow client was never cut");
        if n > 0 {
            assert!(
                buf.starts_with(b"HTTP/1.1 408"),
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        backend.requests(),
        2,
        "only the two real sessions reached the backend"
    );
}

/// A client frame: FIN/RSV/opcode byte, masked payload.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask = [0x12, 0x34, 0x56, 0x78];
    let len = payload.len();
    let mask_bit = if masked { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

#[tokio::test]
async fn garbage_gets_the_protocol_answer_and_never_reaches_a_backend() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-garbage").await;
    let router = router()
        .backend(&backend, "eu")
        .extra("[relay]\nmax_message_bytes = 1024\n")
        .start()
        .await;
    let (mut bystander, _) = router.connect(&key("garbage", 0), &[]).await;

    // Random bytes and a truncated request before the upgrade: 400 / closed.
    let answer = support::raw_exchange(
        router.public,
        &[
            0x16, 0x03, 0x01, 0xff, 0x00, 0x13, 0x37, b'\r', b'\n', b'\r', b'\n',
        ],
    )
    .await;
    assert_eq!(answer.status, Some(400), "{answer:?}");
    {
        let mut truncated = TcpStream::connect(router.public).await.unwrap();
        truncated
            .write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgr")
            .await
            .unwrap();
        drop(truncated);
    }

    // Invalid frames after the upgrade: each gets its close code.
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked client frame", frame(0x81, b"hi", false), 1002),
        ("reserved opcode", frame(0x83, b"hi", true), 1002),
        ("reserved bit", frame(0xC1, b"hi", true), 1002),
        (
            "oversize control frame",
            frame(0x89, &[0u8; 200], true),
            1002,
        ),
        ("fragmented control frame", frame(0x09, b"ping", true), 1002),
        (
            "invalid UTF-8 text",
            frame(0x81, &[0xff, 0xfe, 0xfd], true),
            1007,
        ),
        (
            "message over the size limit",
            frame(0x82, &[0u8; 2000], true),
            1009,
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut raw = raw_session(router.public, "raw").await;
        raw.write_all(&bytes).await.unwrap();
        assert_eq!(read_close_code(&mut raw).await, Some(expected), "{what}");
    }
    // None of it reached the backend as a message, and the bystander chats on.
    assert!(backend.received().is_empty(), "{:?}", backend.received());
    assert!(backend.received_binary().is_empty());
    bystander.send(Message::text("unbothered")).await.unwrap();
    assert_eq!(recv_data(&mut bystander).await, Message::text("unbothered"));
}

#[tokio::test]
async fn nothing_a_client_sends_chooses_where_the_router_connects() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-dest").await;
    // Something the client would like us to dial instead.
    let bait = TestBackend::start("edge-bait").await;
    let router = router().backend(&backend, "eu").start().await;
    let bait_addr = bait.addr.to_string();
    let headers = [
        ("X-Forwarded-Host", bait_addr.as_str()),
        ("X-Original-URL", "/chat"),
        ("Forwarded", "host=evil.example"),
    ];
    let (_, welcome) = router.connect(&key("dest", 1), &headers).await;
    assert_eq!(welcome.backend, "edge-dest");
    assert_eq!(
        welcome.header("host"),
        Some(backend.addr.to_string().as_str())
    );
    // A Host header naming the bait changes nothing either.
    let mut request = format!("ws://{}/chat?session=dest-2", router.public)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", bait_addr.parse().unwrap());
    let (mut client, _) = within("connect", tokio_tungstenite::connect_async(request))
        .await
        .unwrap();
    assert_eq!(read_welcome(&mut client).await.backend, "edge-dest");
    // Absolute-form and authority-form targets are refused outright.
    for target in [format!("http://{bait_addr}/chat"), bait_addr.clone()] {
        let status = raw_upgrade_status_target(router.public, &target).await;
        assert_eq!(status, Some(400), "{target}");
    }
    assert_eq!(
        bait.requests(),
        0,
        "the router dialed somewhere the client chose"
    );
}

async fn raw_upgrade_status_target(router: SocketAddr, target: &str) -> Option<u16> {
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{KEY_HEADER}\r\n\r\n"
    );
    support::raw_exchange(router, request.as_bytes())
        .await
        .status
}

/// Send `prefix` then an upgrade request from `from`; return the status
/// line's code and, after a 101, the backend's welcome.
async fn proxied_session(
    from: &str,
    router: SocketAddr,
    prefix: &[u8],
) -> (Option<u16>, Option<serde_json::Value>) {
    let mut stream = tcp_from(from, router).await;
    let request = format!(
        "GET /chat?session=proxied HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{KEY_HEADER}\r\n\r\n"
    );
    let _ = stream
        .write_all(&[prefix, request.as_bytes()].concat())
        .await;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match within("an answer", stream.read(&mut byte)).await {
            Ok(1) => head.push(byte[0]),
            _ => return (None, None),
        }
    }
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok());
    if status != Some(101) {
        return (status, None);
    }
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        stream,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    use futures_util::StreamExt;
    let welcome = match within("the welcome", ws.next()).await {
        Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str()).ok(),
        _ => None,
    };
    (status, welcome)
}

fn proxy_v2(ip: [u8; 4], port: u16) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&[127, 0, 0, 1]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&8080u16.to_be_bytes());
    out
}

#[tokio::test]
async fn proxy_protocol_from_a_trusted_peer_sets_the_client_address() {
    let _trace = trace_init();
    let eu = TestBackend::start("edge-pp-eu").await;
    let us = TestBackend::start("edge-pp-us").await;
    let router = router()
        .backend(&eu, "eu")
        .backend(&us, "us")
        .default_region("us")
        .proxy_protocol_from("127.0.0.1")
        .start()
        .await;
    // v1 from the trusted balancer: London, so eu.
    let (status, welcome) = proxied_session(
        "127.0.0.1",
        router.public,
        b"PROXY TCP4 81.2.69.142 127.0.0.1 40000 8080\r\n",
    )
    .await;
    assert_eq!(status, Some(101));
    let welcome = welcome.expect("welcome");
    assert_eq!(welcome["backend"], "edge-pp-eu");
    assert_eq!(welcome["headers"]["x-forwarded-for"], "81.2.69.142");
    assert_eq!(welcome["headers"]["x-wsrouter-client-country"], "GB");
    // v2: London again, in binary.
    let (status, welcome) = proxied_session(
        "127.0.0.1",
        router.public,
        &proxy_v2([81, 2, 69, 142], 40001),
    )
    .await;
    assert_eq!(status, Some(101));
    assert_eq!(
        welcome.expect("welcome")["headers"]["x-forwarded-for"],
        "81.2.69.142"
    );
    // From a peer that is not the balancer, a PROXY line is a bad request.
    let (status, _) = proxied_session(
        "127.0.0.2",
        router.public,
        b"PROXY TCP4 81.2.69.142 127.0.0.1 40000 8080\r\n",
    )
    .await;
    assert_eq!(status, Some(400));
    // A malformed header closes only that connection.
    // (127.0.0.1 must open with a header, so the bystander comes from .2.)
    let mut bystander = connect_from("127.0.0.2", router.public, "pp-0", &[])
        .await
        .unwrap();
    read_welcome(&mut bystander).await;
    let (status, _) = proxied_session("127.0.0.1", router.public, b"PROXY TCP4 banana\r\n").await;
    assert_eq!(
        status, None,
        "a malformed header gets no answer, just a close"
    );
    bystander.send(Message::text("fine")).await.unwrap();
    assert_eq!(recv_data(&mut bystander).await, Message::text("fine"));
    let counted = metric(
        router.admin,
        r#"wsrouter_rejected_connections_total{reason="proxy_protocol"}"#,
    )
    .await;
    assert!(counted >= 1.0);
}

#[tokio::test]
async fn an_oversized_request_head_gets_431_and_reaches_no_backend() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-431").await;
    let router = router().backend(&backend, "eu").start().await;
    // The default limit is 16 KiB of request line and headers.
    let padding = "x".repeat(20 * 1024);
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{KEY_HEADER}\r\nX-Padding: {padding}\r\n\r\n"
    );
    let answer = support::raw_exchange(router.public, request.as_bytes()).await;
    assert_eq!(answer.status, Some(431), "{answer:?}");
    assert_eq!(backend.requests(), 0);
    let counted = metric(
        router.admin,
        r#"wsrouter_rejected_connections_total{reason="header_too_large"}"#,
    )
    .await;
    assert!(counted >= 1.0);
}

#[tokio::test]
async fn keepalive_holds_a_quiet_session_and_the_idle_timeout_cuts_a_silent_one() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-idle").await;
    let router = router()
        .backend(&backend, "eu")
        .extra("[relay]\nping_interval = \"300ms\"\nidle_timeout = \"1s\"\n")
        .start()
        .await;
    // A quiet client that answers pings (tungstenite does, as it reads)
    // outlives the idle timeout several times over.
    let (mut quiet, _) = router.connect(&key("idle", 1), &[]).await;
    let deadline = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut quiet)).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("a quiet session got {other:?}"),
        }
    }
    quiet.send(Message::text("still here")).await.unwrap();
    assert_eq!(recv_data(&mut quiet).await, Message::text("still here"));

    // A client that never answers is closed with 1001 once idle.
    let mut silent = raw_session(router.public, "raw").await;
    let started = Instant::now();
    assert_eq!(read_close_code(&mut silent).await, Some(1001));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut after {:?}",
        started.elapsed()
    );
    // Counted once the (unanswered) close handshake has timed out.
    let series = r#"wsrouter_closes_total{reason="idle_timeout"}"#;
    eventually("the idle close is counted", WAIT, async || {
        metric(router.admin, series).await >= 1.0
    })
    .await;
}

#[tokio::test]
async fn a_fragmented_message_with_a_ping_inside_reaches_the_backend_whole() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-fragments").await;
    let router = router().backend(&backend, "eu").start().await;
    let mut raw = raw_session(router.public, "raw").await;
    // A text message in three fragments, the é cut between the first two,
    // and a ping between them; written 3 bytes at a time.
    let text = "héllo wörld";
    let (first, rest) = text.as_bytes().split_at(2);
    let (second, third) = rest.split_at(5);
    let mut bytes = frame(0x01, first, true);
    bytes.extend(frame(0x89, b"mid-message", true));
    bytes.extend(frame(0x00, second, true));
    bytes.extend(frame(0x80, third, true));
    for piece in bytes.chunks(3) {
        raw.write_all(piece).await.unwrap();
        raw.flush().await.unwrap();
    }
    // The backend got one whole message, and answered the ping; the echo
    // comes back as one text frame.
    let (mut echoed, mut ponged) = (false, false);
    within("the echo and the pong", async {
        while !(echoed && ponged) {
            let (first, payload) = read_frame(&mut raw).await.expect("a frame");
            match first {
                0x81 if payload == text.as_bytes() => echoed = true,
                0x8A => {
                    assert_eq!(payload, b"mid-message");
                    ponged = true;
                }
                0x81 => {} // the welcome
                other => panic!("unexpected frame {other:#x}: {payload:?}"),
            }
        }
    })
    .await;
    assert_eq!(
        backend.received(),
        vec![("raw".to_string(), text.to_string())]
    );
}

/// A client that keeps writing after breaking the size limit still gets the
/// 1009 close frame, on a busy router: after its close frame the router
/// drains what the client sends (a lingering close) instead of dropping
/// the socket, whose unread bytes would make the kernel answer with a
/// reset that destroys the close frame on its way.
#[tokio::test]
async fn a_client_that_keeps_writing_past_the_size_limit_still_gets_1009() {
    let _trace = trace_init();
    let backend = TestBackend::start("edge-linger").await;
    let router = router().backend(&backend, "eu").start().await;
    // The load: sessions echoing 4 KiB messages while the violations run.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = JoinSet::new();
    for i in 0..10 {
        let (mut client, _) = router.connect(&key("linger-load", i), &[]).await;
        let stop = Arc::clone(&stop);
        load.spawn(async move {
            let text = "x".repeat(4096);
            for _ in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                client.send(Message::text(text.clone())).await.unwrap();
                recv_data(&mut client).await;
            }
        });
    }
    for round in 0..6 {
        let raw = raw_session(router.public, &key("linger", round)).await;
        let (mut from_router, mut to_router) = raw.into_split();
        // A text message announced at 20 MiB (the limit is 1 MiB), and
        // all of it sent regardless of what the router answers.
        let writer = tokio::spawn(async move {
            let _ = to_router.write_all(&masked_header(0x81, 20 << 20)).await;
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..320 {
                if to_router.write_all(&chunk).await.is_err() {
                    return false;
                }
            }
            true
        });
        assert_eq!(
            read_close_code(&mut from_router).await,
            Some(1009),
            "round {round}: the close frame was lost"
        );
        assert!(
            writer.await.unwrap(),
            "round {round}: the router reset the connection while the client wrote"
        );
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
}
