//! The public listener before any upgrade: plain HTTP answers for requests
//! that will not upgrade, the handshake deadline, and that none of it ever
//! reaches a backend.

mod support;

use std::time::Duration;

use support::{TestBackend, raw_exchange, read_answer, router, trace_init, try_connect};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error as WsError;

const UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn requests_that_do_not_upgrade_get_plain_answers_and_never_reach_a_backend() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-door").await;
    let router = router().backend(&backend, "eu").start().await;
    let addr = router.public;

    // An unknown path, even with a proper upgrade.
    let answer = raw_exchange(
        addr,
        format!("GET /nope HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.status, Some(404), "{answer:?}");
    match try_connect(&format!("ws://{addr}/elsewhere?session=k"), &[]).await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 404),
        other => panic!("expected 404 from a WebSocket client on an unknown path, got {other:?}"),
    }

    // The WebSocket path asked for as a web page.
    let answer = raw_exchange(addr, b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(answer.status, Some(426), "{answer:?}");
    assert!(
        answer.head.contains("\r\nupgrade: websocket"),
        "426 names the protocol: {answer:?}"
    );

    // Not HTTP at all.
    let answer = raw_exchange(addr, b"\x00\x01\x02 hello?\r\n\r\n").await;
    assert_eq!(answer.status, Some(400), "{answer:?}");
    let answer = raw_exchange(
        addr,
        b"GET /chat HTTP/1.1\r\nHost x\r\nbroken header line\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, Some(400), "{answer:?}");

    // A wrong method or WebSocket version on the right path.
    let answer = raw_exchange(
        addr,
        format!("POST /chat HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}Content-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(answer.status, Some(405), "{answer:?}");
    assert!(
        answer.head.contains("\r\nallow: get"),
        "405 names the method: {answer:?}"
    );
    let answer = raw_exchange(
        addr,
        format!(
            "GET /chat HTTP/1.1\r\nHost: x\r\n{}\r\n",
            UPGRADE_HEADERS.replace("Version: 13", "Version: 8")
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(answer.status, Some(426), "{answer:?}");
    assert!(
        answer.head.contains("\r\nsec-websocket-version: 13"),
        "426 names the version: {answer:?}"
    );
    // No Host header.
    let answer = raw_exchange(
        addr,
        format!("GET /chat HTTP/1.1\r\n{UPGRADE_HEADERS}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.status, Some(400), "{answer:?}");

    assert_eq!(
        backend.requests(),
        0,
        "a request that did not upgrade reached the backend"
    );
}

#[tokio::test]
async fn an_absolute_form_target_is_refused_and_never_dialed() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-abs").await;
    // A server the router does not know; the request names it.
    let bait = TestBackend::start("bait").await;
    let router = router().backend(&backend, "eu").start().await;

    for target in [
        format!("http://{}/chat", bait.addr),
        format!("ws://{}/chat?session=abs", bait.addr),
    ] {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\n{UPGRADE_HEADERS}\r\n",
            bait.addr
        );
        let answer = raw_exchange(router.public, request.as_bytes()).await;
        assert_eq!(answer.status, Some(400), "{target}: {answer:?}");
    }
    // Authority-form, as for CONNECT.
    let request = format!(
        "CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        bait.addr, bait.addr
    );
    let answer = raw_exchange(router.public, request.as_bytes()).await;
    assert_eq!(answer.status, Some(400), "{answer:?}");

    assert_eq!(
        bait.requests(),
        0,
        "the router connected where the client told it to"
    );
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_cut_at_the_handshake_deadline() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-slow").await;
    let deadline = Duration::from_secs(1);
    let router = router()
        .handshake_timeout("1s")
        .backend(&backend, "eu")
        .start()
        .await;

    let started = Instant::now();
    let mut stream = TcpStream::connect(router.public).await.unwrap();
    // Half a request head, then nothing.
    stream
        .write_all(b"GET /chat?session=slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut stream).await;
    let elapsed = started.elapsed();

    assert_eq!(
        answer.status,
        Some(408),
        "the router answers 408 and closes: {answer:?}"
    );
    assert!(
        elapsed >= deadline - Duration::from_millis(50),
        "the connection was cut after {elapsed:?}, before the {deadline:?} deadline"
    );
    assert!(
        elapsed < deadline + Duration::from_secs(10),
        "the connection was held for {elapsed:?}, far past the {deadline:?} deadline"
    );
    assert_eq!(backend.requests(), 0);

    // A client that keeps trickling bytes does not extend the deadline: it
    // is the whole request that must arrive in time.
    let started = Instant::now();
    let stream = TcpStream::connect(router.public).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        let head = b"GET /chat?session=slowloris HTTP/1.1\r\nHost: x\r\n";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut buf = [0u8; 1024];
    let cut = support::within("the trickling client to be cut", async {
        // An answer (408) or the connection's end, whichever comes.
        let _ = tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await;
        started.elapsed()
    })
    .await;
    trickle.abort();
    assert!(
        cut >= deadline - Duration::from_millis(50) && cut < deadline + Duration::from_secs(10),
        "a trickling client was cut after {cut:?} (deadline {deadline:?})"
    );

    // The router still serves a client that is not slow.
    let (client, welcome) = router.connect("after-slow", &[]).await;
    assert_eq!(welcome.backend, "eu-slow");
    support::close(client).await;
}
