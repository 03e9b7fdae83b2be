//! Moves that stop: a message that makes its backend close with 1011 (a
//! poison message) reaches at most `max_redeliveries` backends and the
//! session is closed with 1011; a chain of moves never returns to a backend
//! it left while another is available; ordinary failover (a crash, then a
//! second crash of the next backend seconds later) never hits either limit.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::{
    Client, TestBackend, WAIT, echo, eventually, key, read_welcome, recv_data, router, trace_init,
    try_connect,
};
use tokio_tungstenite::tungstenite::Message;

/// Three backends in one region ("eu").
async fn one_region() -> (TestBackend, TestBackend, TestBackend) {
    (
        TestBackend::start("eu-a").await,
        TestBackend::start("eu-b").await,
        TestBackend::start("eu-c").await,
    )
}

/// Read until a close frame: the backends that greeted the session on the
/// way (one per move) and the close's code and reason.
async fn until_close(client: &mut Client) -> (Vec<String>, u16, String) {
    let mut greeted = Vec::new();
    loop {
        match recv_data(client).await {
            Message::Text(text) if text.starts_with('{') => {
                let welcome: serde_json::Value = serde_json::from_str(&text).expect("welcome");
                greeted.push(welcome["backend"].as_str().unwrap_or_default().to_string());
            }
            Message::Close(Some(frame)) => {
                return (greeted, u16::from(frame.code), frame.reason.to_string());
            }
            Message::Close(None) => return (greeted, 1005, String::new()),
            _ => {}
        }
    }
}

/// The next welcome's backend, skipping echoes.
async fn next_welcome(client: &mut Client) -> String {
    loop {
        if let Message::Text(text) = recv_data(client).await
            && text.starts_with('{')
        {
            let welcome: serde_json::Value = serde_json::from_str(&text).expect("welcome");
            return welcome["backend"].as_str().unwrap_or_default().to_string();
        }
    }
}

#[tokio::test]
async fn a_poison_message_reaches_at_most_max_redeliveries_backends_and_closes_with_1011() {
    let _trace = trace_init();
    let (a, b, c) = one_region().await;
    let router = router()
        .backend(&a, "eu")
        .backend(&b, "eu")
        .backend(&c, "eu")
        .start()
        .await;
    let mut ordinary = Vec::new();
    for i in 0..6 {
        ordinary.push(router.connect(&key("ordinary", i), &[]).await.0);
    }
    let (mut poisoned, _) = router.connect("poisoned", &[]).await;

    // Every backend answers this message by closing with 1011.
    let poison = "close:1011:cannot handle this";
    poisoned.send(Message::text(poison)).await.unwrap();
    let (greeted, code, reason) = until_close(&mut poisoned).await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("refused"), "{reason}");
    // The default max_redeliveries is 2: the first backend and one replay.
    let reached: Vec<&str> = [&a, &b, &c]
        .into_iter()
        .filter(|backend| {
            backend
                .received()
                .iter()
                .any(|(k, text)| k == "poisoned" && text == poison)
        })
        .map(|backend| backend.id.as_str())
        .collect();
    assert!(
        (1..=3).contains(&reached.len()),
        "the message reached {reached:?}"
    );
    assert!(greeted.len() <= 2, "moved to {greeted:?}");

    // Nobody else noticed, a new session is served, every backend is up.
    for client in &mut ordinary {
        echo(client, "unbothered").await;
    }
    let (mut newcomer, _) = router.connect("after-the-poison", &[]).await;
    echo(&mut newcomer, "hello").await;
    for backend in [&a, &b, &c] {
        assert_eq!(router.backend_state(&backend.id).await, "healthy");
    }
}

#[tokio::test]
async fn a_chain_of_moves_never_returns_to_a_backend_it_left() {
    let _trace = trace_init();
    let (a, b, c) = one_region().await;
    let router = router()
        .backend(&a, "eu")
        .backend(&b, "eu")
        .backend(&c, "eu")
        .start()
        .await;
    let (mut client, first) = router.connect("chain", &[]).await;
    let backends = [&a, &b, &c];
    let by_id = |id: &str| *backends.iter().find(|b| b.id == id).expect("known backend");

    // The first backend leaves gracefully; then the second.
    by_id(&first.backend).close_all(1001, "restarting");
    let second = next_welcome(&mut client).await;
    assert_ne!(second, first.backend);
    by_id(&second).close_all(1001, "restarting");
    let third = next_welcome(&mut client).await;
    assert!(
        third != first.backend && third != second,
        "went back from {second} to {third} (left {} first)",
        first.backend
    );
    echo(&mut client, "still here").await;
}

#[tokio::test]
async fn two_honest_crashes_seconds_apart_close_no_session() {
    let _trace = trace_init();
    let (a, b, c) = one_region().await;
    let router = router()
        .backend(&a, "eu")
        .backend(&b, "eu")
        .backend(&c, "eu")
        .start()
        .await;
    // Sessions that each send a message every 50 ms for 6 s.
    let mut sessions = tokio::task::JoinSet::new();
    for i in 0..12 {
        let url = router.url(&key("honest", i));
        sessions.spawn(async move {
            let (mut client, _) = try_connect(&url, &[]).await.expect("connect");
            read_welcome(&mut client).await;
            let (mut sink, mut stream) = futures_util::StreamExt::split(client);
            let sender = tokio::spawn(async move {
                for n in 0..120 {
                    sink.send(Message::text(format!("m{n}"))).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                sink
            });
            // Every echo comes back, and no close.
            let mut last = None;
            while last != Some(119) {
                let message =
                    tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut stream))
                        .await
                        .expect("a message in time")
                        .expect("open")
                        .expect("no error");
                match message {
                    Message::Text(text) if text.starts_with('m') => {
                        last = text[1..].parse().ok();
                    }
                    Message::Close(frame) => panic!("session closed: {frame:?}"),
                    _ => {}
                }
            }
            drop(sender.await.expect("sender"));
        });
    }
    // A crash, then one of the others seconds later.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(b);
    while let Some(session) = sessions.join_next().await {
        session.expect("a session survived both crashes");
    }
    eventually("the survivor is healthy", WAIT, async || {
        router.backend_state(&c.id).await == "healthy"
    })
    .await;
}
