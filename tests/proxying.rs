//! The dial and the relay: failed dials, backend refusals, what passes
//! through on the 101, messages both ways, and close codes.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::{
    BackendOptions, LONDON, Refusal, TestBackend, WAIT, close, closed_port, echo, eventually,
    expect_close, key, recv, recv_data, router, trace_init, try_connect,
};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn a_backend_that_refuses_connections_is_skipped_at_dial_time() {
    let _trace = trace_init();
    let live = TestBackend::start("eu-live").await;
    // Weighted so that nearly every key ranks the dead backend first, and
    // the dial has to fail over. Health checks are slow in this router, so
    // the dead backend stays "healthy" and only the dial finds it out.
    let dead = closed_port();
    let router = router()
        .backend_entry("eu-dead", &dead.url(), "eu", Some(100), None)
        .weighted(&live, "eu", 1)
        .start()
        .await;
    for i in 0..10 {
        let (client, welcome) = router.connect(&key("dead", i), &[]).await;
        assert_eq!(welcome.backend, "eu-live");
        close(client).await;
    }
    assert_eq!(live.sessions(), 10);
}

#[tokio::test]
async fn when_every_dial_fails_the_client_gets_502() {
    let _trace = trace_init();
    let (dead_eu, dead_us) = (closed_port(), closed_port());
    let router = router()
        .backend_entry("eu-dead-1", &dead_eu.url(), "eu", None, None)
        .backend_entry("us-dead-1", &dead_us.url(), "us", None, None)
        .start()
        .await;
    match try_connect(&router.url("dead-end"), &[]).await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 502),
        Err(e) => panic!("expected 502, got {e}"),
        Ok(_) => panic!("a session with no backend listening"),
    }
}

#[tokio::test]
async fn a_backend_refusal_reaches_the_client_and_is_not_retried_elsewhere() {
    let _trace = trace_init();
    let refusing = TestBackend::start_with(
        "eu-refusing",
        BackendOptions {
            refuse: Some(Refusal {
                status: 403,
                set_cookie: Some("denied=1; Path=/".into()),
                body: "not allowed here\n".into(),
            }),
            ..BackendOptions::default()
        },
    )
    .await;
    let other = TestBackend::start("us-other").await;
    let router = router()
        .trust("127.0.0.0/8")
        .backend(&refusing, "eu")
        .backend(&other, "us")
        .start()
        .await;

    let result = try_connect(&router.url("refused-1"), &[("X-Forwarded-For", LONDON)]).await;
    let response = match result {
        Err(WsError::Http(response)) => response,
        Err(e) => panic!("expected the backend's HTTP refusal, got {e}"),
        Ok(_) => panic!("the upgrade succeeded though the backend refused it"),
    };
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(
        response
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok()),
        Some("denied=1; Path=/")
    );
    let body = response.body().as_deref().unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(body), "not allowed here\n");
    assert_eq!(refusing.requests(), 1);
    assert_eq!(
        other.requests(),
        0,
        "an application refusal must not be retried on another backend"
    );
}

#[tokio::test]
async fn the_backends_subprotocol_and_cookie_pass_through_on_the_101() {
    let _trace = trace_init();
    let backend = TestBackend::start_with(
        "eu-proto",
        BackendOptions {
            subprotocol: Some("chat.v2".into()),
            set_cookie: Some("sticky=eu-proto; Path=/".into()),
            ..BackendOptions::default()
        },
    )
    .await;
    let router = router().backend(&backend, "eu").start().await;

    let (mut client, response) = try_connect(
        &router.url("proto-1"),
        &[("Sec-WebSocket-Protocol", "chat.v1, chat.v2")],
    )
    .await
    .expect("upgrade");
    assert_eq!(response.status().as_u16(), 101);
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("chat.v2")
    );
    assert_eq!(
        response
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok()),
        Some("sticky=eu-proto; Path=/")
    );
    let welcome = support::read_welcome(&mut client).await;
    assert_eq!(
        welcome.header("sec-websocket-protocol"),
        Some("chat.v1, chat.v2")
    );
    close(client).await;

    // Without an offer, no subprotocol is chosen.
    let (client, response) = try_connect(&router.url("proto-2"), &[])
        .await
        .expect("upgrade");
    assert!(response.headers().get("sec-websocket-protocol").is_none());
    close(client).await;
}

#[tokio::test]
async fn messages_relay_both_ways_and_pings_are_answered() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-echo").await;
    let router = router().backend(&backend, "eu").start().await;
    let (mut client, _) = router.connect("echo-1", &[]).await;

    client.send(Message::text("hello, backend")).await.unwrap();
    assert_eq!(
        recv_data(&mut client).await,
        Message::text("hello, backend")
    );

    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    client.send(Message::binary(bytes.clone())).await.unwrap();
    assert_eq!(recv_data(&mut client).await, Message::binary(bytes));

    // Many in a row keep their order.
    for i in 0..50 {
        client
            .send(Message::text(format!("message {i}")))
            .await
            .unwrap();
    }
    for i in 0..50 {
        assert_eq!(
            recv_data(&mut client).await,
            Message::text(format!("message {i}"))
        );
    }

    client
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    loop {
        match recv(&mut client).await {
            Message::Pong(payload) => {
                assert_eq!(payload.as_ref(), b"are you there");
                break;
            }
            Message::Ping(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    close(client).await;
}

/// Message `i` of the burst test: sizes across the router's read and
/// direct-read thresholds, every byte telling which message it belongs to.
fn burst_message(i: usize) -> Vec<u8> {
    const SIZES: [usize; 6] = [1, 125, 3_000, 16_500, 40_000, 70_000];
    let tag = (i % 251) as u8;
    (0..SIZES[i % SIZES.len()])
        .map(|j| tag.wrapping_add(j as u8))
        .collect()
}

#[tokio::test]
async fn a_burst_bigger_than_the_socket_buffers_arrives_whole_and_in_order() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-burst").await;
    let router = router().backend(&backend, "eu").start().await;
    let (client, _) = router.connect("burst-1", &[]).await;
    let (mut sink, mut stream) = client.split();
    // About 8 MB each way, written without waiting for the echoes: every
    // hop's buffers fill, so the router's writes are cut short and queued,
    // and its reads stop and start again mid-frame.
    const COUNT: usize = 360;
    let writer = tokio::spawn(async move {
        for i in 0..COUNT {
            sink.send(Message::binary(burst_message(i))).await.unwrap();
        }
        sink
    });
    for i in 0..COUNT {
        let echoed = loop {
            match tokio::time::timeout(WAIT, stream.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => break data,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("message {i}: expected its echo, got {other:?}"),
            }
        };
        assert!(
            echoed[..] == burst_message(i)[..],
            "message {i} came back changed ({} bytes)",
            echoed.len()
        );
    }
    let sink = writer.await.unwrap();
    close(sink.reunite(stream).unwrap()).await;
}

#[tokio::test]
async fn a_client_close_reaches_the_backend_with_its_code_and_reason() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-closes").await;
    let router = router().backend(&backend, "eu").start().await;
    let (mut client, _) = router.connect("close-1", &[]).await;

    client
        .close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    // The router answers the close handshake.
    let (code, reason) = expect_close(&mut client).await;
    assert_eq!((code, reason.as_str()), (4001, "bye"));
    let b = &backend;
    eventually("the backend received the close", WAIT, async || {
        !b.closes().is_empty()
    })
    .await;
    assert_eq!(backend.closes(), vec![(4001, "bye".to_string())]);
}

#[tokio::test]
async fn a_backend_close_reaches_the_client_with_its_code_and_reason() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-closer").await;
    let router = router().backend(&backend, "eu").start().await;
    for (i, (code, reason)) in [
        (4002, "room closed"),
        (1000, "done"),
        (1008, "policy violation"),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut client, _) = router.connect(&key("backend-close", i), &[]).await;
        client
            .send(Message::text(format!("close:{code}:{reason}")))
            .await
            .unwrap();
        let (got_code, got_reason) = expect_close(&mut client).await;
        assert_eq!((got_code, got_reason.as_str()), (code, reason));
        // Then the connection ends.
        let end = support::within("the connection to end", client.next()).await;
        assert!(
            matches!(end, None | Some(Err(_))),
            "nothing may follow the close, got {end:?}"
        );
    }
    assert!(
        backend.closes().is_empty(),
        "the backend closed; no client close was due"
    );
}

#[tokio::test]
async fn a_backend_answering_5xx_to_the_upgrade_is_skipped() {
    let _trace = trace_init();
    let busy = TestBackend::start_with(
        "eu-busy",
        BackendOptions {
            refuse: Some(Refusal {
                status: 503,
                set_cookie: None,
                body: "busy\n".into(),
            }),
            ..BackendOptions::default()
        },
    )
    .await;
    let ok = TestBackend::start("eu-ok").await;
    // Weighted so that nearly every key tries eu-busy first.
    let router = router()
        .weighted(&busy, "eu", 100)
        .weighted(&ok, "eu", 1)
        .start()
        .await;
    for i in 0..5 {
        let (client, welcome) = router.connect(&key("busy", i), &[]).await;
        assert_eq!(
            welcome.backend, "eu-ok",
            "a backend's 503 is not the client's answer"
        );
        close(client).await;
    }
    assert!(
        busy.requests() >= 1,
        "the busy backend should have been tried first"
    );
}

#[tokio::test]
async fn a_backend_url_path_prefixes_the_clients_path() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-prefixed").await;
    let url = format!("{}/tenant-7/", backend.url());
    let router = router()
        .backend_entry("eu-prefixed", &url, "eu", None, None)
        .start()
        .await;
    let (client, welcome) = router.connect("prefix-1", &[]).await;
    assert_eq!(welcome.backend, "eu-prefixed");
    assert_eq!(welcome.path, "/tenant-7/chat?session=prefix-1");
    close(client).await;
}

#[tokio::test]
async fn stopping_the_router_closes_sessions_with_1001_and_stops_accepting() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-stop").await;
    let router = router().backend(&backend, "eu").start().await;
    let public = router.public;
    let (mut client, _) = router.connect("stop-1", &[]).await;

    // The router waits for the close handshake, so the client must keep
    // reading while it stops.
    let stopping = tokio::spawn(router.stop());
    let (code, _) = expect_close(&mut client).await;
    assert_eq!(
        code, 1001,
        "a client of a stopping router is told to go away and come back"
    );
    // Reading on sends the answer to the close and sees the connection end.
    support::within("the connection to end", async {
        while let Some(Ok(_)) = client.next().await {}
    })
    .await;
    support::within("the router to stop", stopping)
        .await
        .expect("stop");

    let b = &backend;
    eventually("the backend was told the session ended", WAIT, async || {
        !b.closes().is_empty()
    })
    .await;
    assert_eq!(backend.closes()[0].0, 1001);
    assert!(
        tokio::net::TcpStream::connect(public).await.is_err(),
        "a stopped router must not accept connections"
    );
}

#[tokio::test]
async fn frames_sent_right_behind_the_request_are_not_lost() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-eager").await;
    let router = router().backend(&backend, "eu").start().await;

    // The request head and a first (masked) text frame in one write, before
    // any answer: the router must keep the frame for the relay.
    let payload = b"sent early";
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut bytes = b"GET /chat?session=eager HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut stream = tokio::net::TcpStream::connect(router.public).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes)
        .await
        .unwrap();

    // Read the 101 head, then speak WebSocket on what follows.
    let mut head = Vec::new();
    support::within("the 101", async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut byte)
                .await
                .unwrap();
            assert_eq!(n, 1, "the router closed before answering");
            head.push(byte[0]);
        }
    })
    .await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut client = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let welcome = recv_data(&mut client).await;
    assert!(matches!(welcome, Message::Text(_)), "{welcome:?}");
    assert_eq!(recv_data(&mut client).await, Message::text("sent early"));
    let _ = client.close(None).await;
}

#[tokio::test]
async fn a_client_that_vanishes_is_reported_to_the_backend_as_going_away() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-vanish").await;
    let router = router().backend(&backend, "eu").start().await;
    let (client, _) = router.connect("vanish-1", &[]).await;
    // Drop the TCP connection without a close frame.
    drop(client);
    let b = &backend;
    eventually("the backend was told", WAIT, async || {
        !b.closes().is_empty()
    })
    .await;
    assert_eq!(backend.closes()[0].0, 1001);
}

#[tokio::test]
async fn dials_to_one_backend_wait_their_turn_past_max_concurrent_dials() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _trace = trace_init();
    // A backend slow to answer upgrades, which records how many it was
    // holding at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (counts, peak) = (Arc::clone(&in_flight), Arc::clone(&most));
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (counts, peak) = (Arc::clone(&counts), Arc::clone(&peak));
            tokio::spawn(async move {
                // Health checks are answered at once and not counted.
                let mut start = [0u8; 9];
                if stream.peek(&mut start).await.is_err() || &start != b"GET /chat" {
                    let _ = tokio::io::AsyncWriteExt::write_all(
                        &mut stream,
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                    return;
                }
                let now = counts.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let ws = tokio_tungstenite::accept_async(stream).await;
                counts.fetch_sub(1, Ordering::SeqCst);
                if let Ok(mut ws) = ws {
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_text() && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    let mut builder = router().backend_entry("eu-slow", &format!("ws://{addr}"), "eu", None, None);
    builder.max_concurrent_dials = Some(2);
    let router = builder.start().await;

    let connects = (0..6).map(|i| {
        let url = router.url(&key("dial-limit", i));
        async move { try_connect(&url, &[]).await }
    });
    let clients = futures_util::future::join_all(connects).await;
    for (i, client) in clients.into_iter().enumerate() {
        let (mut client, _) = client.unwrap_or_else(|e| panic!("session {i}: {e}"));
        client.send(Message::text("after the queue")).await.unwrap();
        assert_eq!(
            recv_data(&mut client).await,
            Message::text("after the queue")
        );
    }
    // Six sessions were dialed, never more than two at once.
    assert_eq!(most.load(Ordering::SeqCst), 2);
    server.abort();
}

#[tokio::test]
async fn a_public_listener_bound_without_reuseport_is_shared_by_the_session_threads() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-shared-listener").await;
    let mut builder = router()
        .backend(&backend, "eu")
        .extra("[runtime]\nsession_threads = 3\n");
    builder.plain_public_listener = true;
    let router = builder.start().await;
    // Every connection is accepted by one of the threads, and works.
    for i in 0..12 {
        let (mut client, welcome) = router.connect(&key("shared", i), &[]).await;
        assert_eq!(welcome.backend, backend.id);
        echo(&mut client, &format!("hello {i}")).await;
        close(client).await;
    }
}
