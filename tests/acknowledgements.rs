//! Exactly once for backends that acknowledge: a backend whose 101 says
//! `X-Wsrouter-Ack: pong` sends `wsrouter-ack N` pongs for the client
//! messages it has finished with, and the router replays exactly the
//! unacknowledged ones after a failure, none after a drain, and treats a
//! malformed or decreasing acknowledgement as the backend failing.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::{
    Acks, BackendOptions, Client, TestBackend, WAIT, echo, eventually, key, metric, read_welcome,
    recv_data, router, trace_init, try_connect, within,
};
use tokio_tungstenite::tungstenite::Message;

fn acknowledging() -> BackendOptions {
    BackendOptions {
        acks: Acks::Each,
        ..BackendOptions::default()
    }
}

/// How many times each numbered message of `session` reached the backends.
fn deliveries(backends: &[&TestBackend], session: &str) -> BTreeMap<usize, usize> {
    let mut seen = BTreeMap::new();
    for backend in backends {
        for (s, text) in backend.received() {
            if s == session {
                let n: usize = text.rsplit('#').next().unwrap().parse().unwrap();
                *seen.entry(n).or_default() += 1;
            }
        }
    }
    seen
}

/// Read until the echo of `last`, skipping welcomes; pongs fail the test
/// (acknowledgements are the router's, never the client's).
async fn until_echo(client: &mut Client, key: &str, last: usize) {
    let wanted = format!("{key}#{last}");
    loop {
        match within("the echo", client.next())
            .await
            .expect("open")
            .expect("no error")
        {
            Message::Text(text) if text == wanted => return,
            Message::Pong(payload) => panic!("a pong reached the client: {payload:?}"),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_acknowledging_backend_loses_nothing_and_duplicates_nothing() {
    let _trace = trace_init();
    const SESSIONS: usize = 50;
    const MESSAGES: usize = 40;
    let doomed = TestBackend::start_with("ack-doomed", acknowledging()).await;
    let spare = TestBackend::start_with("ack-spare", acknowledging()).await;
    let router = router()
        .backend(&doomed, "eu")
        .backend(&spare, "us")
        .start()
        .await;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let (url, key) = (router.url(&key("ack-chaos", i)), key("ack-chaos", i));
        clients.spawn(async move {
            let (mut client, _) = try_connect(&url, &[]).await.expect("connect");
            read_welcome(&mut client).await;
            let (mut tx, mut rx) = client.split();
            let reader_key = key.clone();
            let reader = tokio::spawn(async move {
                let wanted = format!("{reader_key}#{}", MESSAGES - 1);
                while let Some(Ok(message)) = rx.next().await {
                    match message {
                        Message::Text(text) if text == wanted => return,
                        Message::Pong(payload) => panic!("a pong reached the client: {payload:?}"),
                        Message::Close(frame) => panic!("closed: {frame:?}"),
                        _ => {}
                    }
                }
                panic!("the connection ended");
            });
            for n in 0..MESSAGES {
                tx.send(Message::text(format!("{key}#{n}")))
                    .await
                    .expect("send");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            within("the last echo", reader).await.expect("reader");
            key
        });
    }
    eventually("the streams are under way", WAIT, async || {
        doomed.received().len() >= SESSIONS * MESSAGES * 3 / 4
    })
    .await;
    doomed.stop();
    let mut duplicates = 0;
    while let Some(joined) = clients.join_next().await {
        let key = joined.expect("client task");
        let seen = deliveries(&[&doomed, &spare], &key);
        for n in 0..MESSAGES {
            assert!(seen.contains_key(&n), "{key}: message {n} was lost");
        }
        duplicates += seen.values().map(|c| c - 1).sum::<usize>();
    }
    println!(
        "acknowledging chaos run: {duplicates} duplicates for {} messages",
        SESSIONS * MESSAGES
    );
    assert_eq!(duplicates, 0, "an acknowledged message was replayed");
    assert!(
        metric(router.admin, "wsrouter_acknowledged_messages_total").await
            >= (SESSIONS * MESSAGES) as f64 * 0.75
    );
}

#[tokio::test]
async fn draining_an_acknowledging_backend_replays_nothing_and_loses_nothing() {
    let _trace = trace_init();
    let old = TestBackend::start_with("ack-drain-old", acknowledging()).await;
    let new = TestBackend::start_with("ack-drain-new", acknowledging()).await;
    let router = router()
        .backend(&old, "eu")
        .backend(&new, "us")
        .start()
        .await;
    let session = key("ack-drain", 1);
    let (mut client, _) = router.connect(&session, &[]).await;
    for n in 0..10 {
        client
            .send(Message::text(format!("{session}#{n}")))
            .await
            .unwrap();
        until_echo(&mut client, &session, n).await;
    }
    let (status, body) = router
        .admin_post("/api/backends/ack-drain-old/drain", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let welcome = loop {
        if let Message::Text(text) = recv_data(&mut client).await
            && text.contains("ack-drain-new")
        {
            break serde_json::from_str::<serde_json::Value>(&text).unwrap();
        }
    };
    assert_eq!(welcome["headers"]["x-wsrouter-replayed"], "0");
    for n in 10..20 {
        client
            .send(Message::text(format!("{session}#{n}")))
            .await
            .unwrap();
        until_echo(&mut client, &session, n).await;
    }
    let seen = deliveries(&[&old, &new], &session);
    assert_eq!(seen.len(), 20, "{seen:?}");
    assert!(seen.values().all(|c| *c == 1), "{seen:?}");
}

#[tokio::test]
async fn malformed_and_decreasing_acknowledgements_count_as_the_backend_failing() {
    let _trace = trace_init();
    for (acks, label) in [
        (Acks::Malformed, "malformed"),
        (Acks::Decreasing, "decreasing"),
    ] {
        let bad = TestBackend::start_with(
            &format!("ack-{label}"),
            BackendOptions {
                acks,
                ..BackendOptions::default()
            },
        )
        .await;
        let good = TestBackend::start_with(&format!("ack-{label}-good"), acknowledging()).await;
        let router = router()
            .backend(&bad, "eu")
            .backend(&good, "us")
            .trust("127.0.0.1/32")
            .start()
            .await;
        // A bystander on the good backend (its region's visitor).
        let (mut bystander, welcome) = router
            .connect(
                &key(&format!("ack-{label}-bystander"), 1),
                &[("X-Forwarded-For", support::MILTON_US)],
            )
            .await;
        assert_eq!(welcome.backend, good.id);
        let errors_before = metric(router.admin, "wsrouter_backend_ack_errors_total").await;
        let session = key(&format!("ack-{label}"), 1);
        let (mut client, welcome) = router.connect(&session, &[]).await;
        assert_eq!(welcome.backend, bad.id);
        for n in 0..5 {
            client
                .send(Message::text(format!("{session}#{n}")))
                .await
                .unwrap();
        }
        // The session moves to the good backend, and every message is
        // handled by one or the other (what the bad one acknowledged
        // before going wrong is not sent again).
        until_echo(&mut client, &session, 4).await;
        eventually("the session is on the good backend", WAIT, async || {
            deliveries(&[&good], &session).contains_key(&4)
        })
        .await;
        let seen = deliveries(&[&bad, &good], &session);
        assert!((0..5).all(|n| seen.contains_key(&n)), "{label}: {seen:?}");
        assert!(
            metric(router.admin, "wsrouter_backend_ack_errors_total").await > errors_before,
            "{label}: not counted"
        );
        echo(&mut bystander, "unbothered").await;
    }
}
