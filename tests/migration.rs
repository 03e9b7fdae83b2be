//! Live migration: backends die or close with a "go elsewhere" code while
//! clients are mid-stream; the clients' sockets stay open, no client message
//! is lost, order holds, and a message in flight arrives whole.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::{
    BackendOptions, BackendProcess, Client, TestBackend, WAIT, eventually, expect_close, key,
    metric, raise_fd_limit, read_welcome, recv_data, router, trace_init, try_connect, within,
};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Everything one client saw.
#[derive(Debug, Default)]
struct Seen {
    /// Backends that greeted this session, in order.
    welcomes: Vec<serde_json::Value>,
    /// Close frame codes received (the tests expect none).
    closes: Vec<u16>,
    /// Echoed message numbers, in arrival order.
    echoes: Vec<usize>,
}

/// Read everything the router sends until the echo of `last` arrives or the
/// connection ends.
async fn read_until_echo(
    mut rx: futures_util::stream::SplitStream<Client>,
    key: String,
    last: usize,
) -> Seen {
    let mut seen = Seen::default();
    let prefix = format!("{key}#");
    while let Some(Ok(message)) = rx.next().await {
        match message {
            Message::Text(text) => {
                if let Some(n) = text.as_str().strip_prefix(&prefix) {
                    let n: usize = n.parse().expect("numbered message");
                    seen.echoes.push(n);
                    if n == last {
                        break;
                    }
                } else {
                    seen.welcomes
                        .push(serde_json::from_str(text.as_str()).expect("a welcome is JSON"));
                }
            }
            Message::Close(frame) => {
                seen.closes
                    .push(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                break;
            }
            _ => {}
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_mid_stream_closes_no_client_and_loses_no_message() {
    let _trace = trace_init();
    raise_fd_limit();
    const SESSIONS: usize = 200;
    const MESSAGES: usize = 40;
    // The replay margin (`replay_max_messages`, default 8): messages the
    // backend was seen to read that are replayed all the same.
    const MARGIN: usize = 8;
    // What the window held before the watermark: the last 64 forwarded.
    const OLD_WINDOW: usize = 64;
    let doomed = TestBackend::start("chaos-doomed").await;
    let spare = TestBackend::start("chaos-spare").await;
    // Loopback clients land on the default region, eu: all on `doomed`.
    let router = router()
        .backend(&doomed, "eu")
        .backend(&spare, "us")
        .extra("[migration]\ntimeout = \"20s\"\n")
        .start()
        .await;

    let connected = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(tokio::sync::Notify::new());
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let url = router.url(&key("chaos", i));
        let (connected, go) = (Arc::clone(&connected), Arc::clone(&go));
        clients.spawn(async move {
            let key = key("chaos", i);
            let (mut client, _) = try_connect(&url, &[]).await.expect("connect");
            let first = read_welcome(&mut client).await;
            assert_eq!(first.backend, "chaos-doomed");
            let (mut tx, rx) = client.split();
            let reader = tokio::spawn(read_until_echo(rx, key.clone(), MESSAGES - 1));
            let ready = go.notified();
            connected.fetch_add(1, Ordering::SeqCst);
            ready.await;
            for n in 0..MESSAGES {
                tx.send(Message::text(format!("{key}#{n}")))
                    .await
                    .expect("send");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let seen = within("the echo of the last message", reader)
                .await
                .expect("reader");
            let _ = tx.send(Message::Close(None)).await;
            (key, seen)
        });
    }
    eventually("every session connected", WAIT, async || {
        connected.load(Ordering::SeqCst) == SESSIONS
    })
    .await;
    go.notify_waiters();

    // Kill the backend abruptly once it is well into the streams.
    eventually("the streams are under way", WAIT, async || {
        doomed.received().len() >= SESSIONS * MESSAGES * 3 / 4
    })
    .await;
    doomed.stop();
    let killed_at = Instant::now();

    let mut results = HashMap::new();
    while let Some(joined) = clients.join_next().await {
        let (key, seen) = joined.expect("client task");
        results.insert(key, seen);
    }
    let moved_within = killed_at.elapsed();

    // Every numbered message reached some backend at least once, and
    // duplicates stay within the replay window.
    let mut delivered: HashMap<String, BTreeMap<usize, usize>> = HashMap::new();
    for (session, text) in doomed.received().into_iter().chain(spare.received()) {
        let n: usize = text.rsplit('#').next().unwrap().parse().unwrap();
        *delivered.entry(session).or_default().entry(n).or_default() += 1;
    }
    let mut duplicates = 0;
    // What replaying the last 64 forwarded (the window before watermarks)
    // would have sent again.
    let mut old_duplicates = 0;
    for i in 0..SESSIONS {
        let key = key("chaos", i);
        let seen = &results[&key];
        assert!(
            seen.closes.is_empty(),
            "{key} saw a close: {:?}",
            seen.closes
        );
        let got = delivered
            .get(&key)
            .unwrap_or_else(|| panic!("{key}: nothing delivered"));
        for n in 0..MESSAGES {
            assert!(
                got.contains_key(&n),
                "{key}: message {n} was lost; delivered {got:?}"
            );
        }
        let dups: usize = got.values().map(|c| c - 1).sum();
        let before_kill = doomed.received().iter().filter(|(s, _)| *s == key).count();
        assert!(
            dups <= before_kill,
            "{key}: {dups} duplicates, more than the {before_kill} messages sent before the kill"
        );
        duplicates += dups;
        old_duplicates += before_kill.min(OLD_WINDOW);
        // The session was greeted again by the spare, told where it came from.
        let resumed = seen
            .welcomes
            .last()
            .expect("a welcome from the new backend");
        assert_eq!(resumed["backend"], "chaos-spare", "{key}");
        assert_eq!(
            resumed["headers"]["x-wsrouter-migrated-from"],
            "chaos-doomed"
        );
        assert!(resumed["headers"]["x-wsrouter-replayed"].as_str().is_some());
    }
    println!(
        "chaos run: {duplicates} duplicates for {} messages (a 64-message window: \
         {old_duplicates}); all sessions moved within {moved_within:?}",
        SESSIONS * MESSAGES
    );
    // Only what the backend had not read, and the margin, came again.
    assert!(
        duplicates < old_duplicates,
        "{duplicates} duplicates, no fewer than a 64-message window's {old_duplicates}"
    );
    // The margin of read messages is replayed all the same, in case the
    // application had not handled them.
    assert!(
        duplicates >= SESSIONS * MARGIN,
        "{duplicates} duplicates: the margin of {MARGIN} a session was not replayed"
    );

    let moved = metric(
        router.admin,
        r#"wsrouter_migrations_total{from="chaos-doomed",to="chaos-spare",reason="upstream_lost"}"#,
    )
    .await;
    assert_eq!(moved as usize, SESSIONS);
}

#[tokio::test]
async fn a_backend_closing_with_1012_moves_the_session_and_1000_ends_it() {
    let _trace = trace_init();
    let restarting = TestBackend::start("close-restarting").await;
    let spare = TestBackend::start("close-spare").await;
    let router = router()
        .backend(&restarting, "eu")
        .backend(&spare, "us")
        .start()
        .await;

    let (mut client, welcome) = router.connect(&key("close", 1), &[]).await;
    assert_eq!(welcome.backend, "close-restarting");
    client.send(Message::text("before")).await.unwrap();
    assert_eq!(recv_data(&mut client).await, Message::text("before"));

    restarting.close_all(1012, "service restart");
    let resumed = read_welcome(&mut client).await;
    assert_eq!(resumed.backend, "close-spare");
    assert_eq!(
        resumed.header("x-wsrouter-migrated-from"),
        Some("close-restarting")
    );
    // The message sent before the close is replayed: at-least-once.
    assert_eq!(resumed.header("x-wsrouter-replayed"), Some("1"));
    assert_eq!(recv_data(&mut client).await, Message::text("before"));
    client.send(Message::text("after")).await.unwrap();
    assert_eq!(recv_data(&mut client).await, Message::text("after"));

    // 1000 from the (new) backend is passed to the client: the session ends.
    spare.close_all(1000, "done");
    assert_eq!(expect_close(&mut client).await, (1000, "done".to_string()));
}

#[tokio::test]
async fn with_every_backend_down_the_client_gets_1013_in_bounded_time() {
    let _trace = trace_init();
    let only = TestBackend::start("down-only").await;
    let other = TestBackend::start("down-other").await;
    let router = router()
        .backend(&only, "eu")
        .backend(&other, "us")
        .extra("[migration]\ntimeout = \"2s\"\n")
        .start()
        .await;
    let (mut client, welcome) = router.connect(&key("down", 1), &[]).await;
    assert_eq!(welcome.backend, "down-only");

    other.stop();
    only.stop();
    let started = Instant::now();
    let (code, _) = expect_close(&mut client).await;
    assert_eq!(code, 1013);
    assert!(
        started.elapsed() < WAIT,
        "the 1013 took {:?}",
        started.elapsed()
    );
    // Counted once the close handshake is over.
    let series = r#"wsrouter_closes_total{reason="migration_failed"}"#;
    eventually("the failed move is counted", WAIT, async || {
        metric(router.admin, series).await >= 1.0
    })
    .await;
}

#[tokio::test]
async fn client_messages_over_the_queue_bound_during_a_move_get_1013() {
    let _trace = trace_init();
    let only = TestBackend::start("queue-only").await;
    let router = router()
        .backend(&only, "eu")
        .extra("[migration]\ntimeout = \"30s\"\nqueue_max_bytes = 4096\n")
        .start()
        .await;
    let (mut client, _) = router.connect(&key("queue", 1), &[]).await;
    only.stop();
    // Nowhere to go for 30 s: what the client sends meanwhile is queued,
    // and past 4 KiB the client is told to come back later.
    let chunk = "x".repeat(1024);
    let mut code = None;
    for _ in 0..64 {
        if client.send(Message::text(chunk.clone())).await.is_err() {
            break;
        }
        if let Ok(Some(Ok(Message::Close(frame)))) =
            tokio::time::timeout(Duration::from_millis(50), client.next()).await
        {
            code = frame.map(|f| u16::from(f.code));
            break;
        }
    }
    let code = match code {
        Some(code) => code,
        None => expect_close(&mut client).await.0,
    };
    assert_eq!(code, 1013);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_and_a_message_in_flight_arrives_whole() {
    let _trace = trace_init();
    const MESSAGES: usize = 120;
    let doomed = TestBackend::start("order-doomed").await;
    let spare = TestBackend::start("order-spare").await;
    let router = router()
        .backend(&doomed, "eu")
        .backend(&spare, "us")
        // Room to queue every message, should the move be slow, and to
        // replay every message: on loopback the dead backend's socket
        // buffers can hold most of the 6 MB sent, unread, when it dies (the
        // window's own bounds are tested in unit tests and tests/memory.rs).
        .extra(
            "[migration]\nreplay_max_messages = 128\nreplay_max_bytes = 16777216\nqueue_max_bytes = 16777216\n",
        )
        .start()
        .await;
    // Large binary messages (a distinct length per sequence number), sent
    // back to back, so the kill lands while frames are on the wire.
    let len = |n: usize| 48 * 1024 + n * 97;
    let session = key("order", 1);
    let (client, _) = router.connect(&session, &[]).await;
    let (mut tx, mut rx) = client.split();
    let reader = tokio::spawn(async move {
        let mut closes = Vec::new();
        let mut last = None;
        while let Some(Ok(message)) = rx.next().await {
            match message {
                Message::Binary(data) => {
                    last = Some(data[0]);
                    if usize::from(data[0]) == (MESSAGES - 1) % 256
                        && data.len() == len(MESSAGES - 1)
                    {
                        break;
                    }
                }
                Message::Close(frame) => {
                    closes.push(frame);
                    break;
                }
                _ => {}
            }
        }
        (closes, last)
    });
    for n in 0..MESSAGES {
        let mut payload = vec![b'.'; len(n)];
        payload[0] = (n % 256) as u8;
        tx.send(Message::binary(payload)).await.expect("send");
        if n == MESSAGES / 3 {
            doomed.stop();
        }
        tokio::task::yield_now().await;
    }
    let (closes, _) = within("the echo of the last message", reader)
        .await
        .expect("reader");
    assert!(closes.is_empty(), "the client saw a close: {closes:?}");

    // Every message arrived whole somewhere; the spare saw them in order.
    let expected_len = |first: u8, length: usize| {
        (0..MESSAGES).any(|n| (n % 256) as u8 == first && len(n) == length)
    };
    let mut delivered = [false; MESSAGES];
    for (who, log) in [
        ("doomed", doomed.received_binary()),
        ("spare", spare.received_binary()),
    ] {
        let mut previous = None;
        for (s, length, first) in log {
            assert_eq!(s, session);
            assert!(
                expected_len(first, length),
                "{who} got a cut message: {length} bytes"
            );
            let n = usize::from(first);
            delivered[n] = true;
            if who == "spare" {
                // Replays come first, then new messages: strictly increasing.
                assert!(
                    previous.is_none_or(|p| n > p),
                    "out of order on the spare: {n} after {previous:?}"
                );
                previous = Some(n);
            }
        }
    }
    let lost: Vec<usize> = (0..MESSAGES).filter(|&n| !delivered[n]).collect();
    assert!(lost.is_empty(), "lost messages: {lost:?}");
    drop(router);
}

#[tokio::test]
#[ignore = "not a test: the body of a backend process that the frozen-backend test starts"]
async fn backend_process() {
    support::backend_process_main().await;
}

/// One client sending `count` numbered messages every `every`, and what
/// came back: the echoed numbers, the backends that greeted it, closes.
async fn stream_and_collect(url: String, key: String, count: usize, every: Duration) -> Seen {
    let (client, _) = try_connect(&url, &[]).await.expect("connect");
    let (mut tx, rx) = client.split();
    let reader = tokio::spawn(read_until_echo(rx, key.clone(), count - 1));
    for n in 0..count {
        tx.send(Message::text(format!("{key}#{n}")))
            .await
            .expect("send");
        tokio::time::sleep(every).await;
    }
    let seen = within("the echo of the last message", reader)
        .await
        .expect("reader");
    let _ = tx.send(Message::Close(None)).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_backend_loses_no_message_and_its_sessions_move_before_the_health_checks_notice() {
    let _trace = trace_init();
    raise_fd_limit();
    const SESSIONS: usize = 100;
    const MESSAGES: usize = 120;
    // A backend process that will be frozen (SIGSTOP, never resumed), with
    // the default health settings (5 s, 2 s timeout, fall 3: ~14 s).
    let frozen = BackendProcess::start("frozen-eu", None).await;
    let spare = TestBackend::start("frozen-spare").await;
    let router = router()
        .backend_entry(&frozen.id, &frozen.url, "eu", None, None)
        .backend(&spare, "us")
        .start()
        .await;
    // 100 clients at 20 messages a second for 6 s.
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let (url, key) = (router.url(&key("frozen", i)), key("frozen", i));
        clients.spawn(async move {
            let seen =
                stream_and_collect(url, key.clone(), MESSAGES, Duration::from_millis(50)).await;
            (key, seen)
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    frozen.freeze();

    while let Some(joined) = clients.join_next().await {
        let (key, seen) = joined.expect("client task");
        assert!(
            seen.closes.is_empty(),
            "{key} saw a close: {:?}",
            seen.closes
        );
        // Every message came back: none was lost in the frozen backend.
        let echoed: std::collections::BTreeSet<usize> = seen.echoes.iter().copied().collect();
        let lost: Vec<usize> = (0..MESSAGES).filter(|n| !echoed.contains(n)).collect();
        assert!(lost.is_empty(), "{key} lost {lost:?}");
        let resumed = seen.welcomes.last().expect("a welcome");
        assert_eq!(resumed["backend"], "frozen-spare", "{key}");
    }
    // The stalls moved the sessions and told passive health, before the
    // active checks (three failed checks, 5 s apart) could notice.
    let stalled = metric(
        router.admin,
        r#"wsrouter_migrations_total{from="frozen-eu",to="frozen-spare",reason="stalled"}"#,
    )
    .await;
    assert_eq!(stalled as usize, SESSIONS);
    assert_eq!(router.backend_state(&frozen.id).await, "ejected");
}

#[tokio::test]
async fn a_slow_backend_then_killed_loses_nothing_it_had_not_read() {
    let _trace = trace_init();
    const MESSAGES: usize = 300;
    // Reads 50 messages a second; the client sends 300 at once: far more
    // outstanding than the old 64-message window held.
    let slow = TestBackend::start_with(
        "slow-eu",
        BackendOptions {
            read_delay: Some(Duration::from_millis(20)),
            ..BackendOptions::default()
        },
    )
    .await;
    let spare = TestBackend::start("slow-spare").await;
    // A small window: the client waits for the backend (backpressure).
    let router = router()
        .backend(&slow, "eu")
        .backend(&spare, "us")
        .extra("[migration]\nreplay_max_bytes = 1024\n")
        .start()
        .await;
    let session = key("slow", 1);
    let collect = tokio::spawn(stream_and_collect(
        router.url(&session),
        session.clone(),
        MESSAGES,
        Duration::ZERO,
    ));
    // The client is held back until the backend's watermark moves, and
    // let go again; then the backend dies with messages unread.
    eventually("the client was held back and let go", WAIT, async || {
        metric(router.admin, "wsrouter_client_read_pause_seconds_count").await > 0.0
    })
    .await;
    assert!(
        slow.received().len() < MESSAGES,
        "the slow backend read everything"
    );
    slow.stop();
    let seen = collect.await.expect("client");
    assert!(seen.closes.is_empty(), "{:?}", seen.closes);
    let mut delivered = std::collections::BTreeSet::new();
    for (_, text) in slow.received().into_iter().chain(spare.received()) {
        delivered.insert(text.rsplit('#').next().unwrap().parse::<usize>().unwrap());
    }
    let lost: Vec<usize> = (0..MESSAGES).filter(|n| !delivered.contains(n)).collect();
    assert!(lost.is_empty(), "lost {lost:?}");
    // What it had not read was replayed.
    let unread = metric(
        router.admin,
        r#"wsrouter_replayed_messages_total{kind="unread"}"#,
    )
    .await;
    assert!(unread > 0.0);
}

#[tokio::test]
async fn watermark_pongs_never_reach_the_client_and_other_pongs_do() {
    let _trace = trace_init();
    let backend = TestBackend::start("wm-pongs").await;
    let router = router()
        .backend(&backend, "eu")
        .extra("[migration]\nwatermark_interval = \"50ms\"\n")
        .start()
        .await;
    let (mut client, _) = router.connect(&key("wm-pongs", 1), &[]).await;
    // Enough traffic over more than a watermark interval for several
    // watermark pings, and a ping of the client's own.
    let mut pongs = Vec::new();
    let mut echoes = 0;
    for n in 0..20 {
        client
            .send(Message::text(format!("m{n}")))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .send(Message::Ping(b"client ping".to_vec().into()))
        .await
        .expect("ping");
    while echoes < 20 || pongs.is_empty() {
        match within("the echoes and the pong", client.next())
            .await
            .expect("open")
            .expect("no error")
        {
            Message::Text(_) => echoes += 1,
            Message::Pong(payload) => pongs.push(payload.to_vec()),
            _ => {}
        }
    }
    assert_eq!(pongs, vec![b"client ping".to_vec()]);
    // Yet the backend was sent watermark pings (and answered them).
    let watermark_pings = backend
        .pings()
        .iter()
        .filter(|p| p.starts_with(b"wsrouter-wm:"))
        .count();
    assert!(watermark_pings >= 2, "{watermark_pings} watermark pings");
}

#[tokio::test]
async fn a_drain_delivers_everything_the_old_backend_sent_then_the_new_ones_messages() {
    let _trace = trace_init();
    let old = Arc::new(TestBackend::start("handover-old").await);
    let new = TestBackend::start("handover-new").await;
    let router = router()
        .backend(&old, "eu")
        .backend(&new, "us")
        .start()
        .await;
    let session = key("handover", 1);
    let (mut client, welcome) = router.connect(&session, &[]).await;
    assert_eq!(welcome.backend, "handover-old");
    // The old backend broadcasts steadily, before, during and after the
    // drain (a chat room's traffic).
    let broadcaster = {
        let old = Arc::clone(&old);
        tokio::spawn(async move {
            for burst in 0..1000 {
                for n in 0..8 {
                    old.announce(&format!("old-{burst}-{n}"));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = router
        .admin_post("/api/backends/handover-old/drain", None)
        .await;
    assert_eq!(status, 200, "{body}");
    // The client reads the old backend's messages, then the new one's
    // welcome; nothing of the old backend's comes after it.
    let mut from_old = Vec::new();
    loop {
        match recv_data(&mut client).await {
            Message::Text(text) if text.starts_with("old-") => from_old.push(text.to_string()),
            Message::Text(text) if text.contains("handover-new") => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    support::echo(&mut client, "on the new backend").await;
    broadcaster.abort();
    // Every message the old backend sent this session reached it, in order.
    let sent: Vec<String> = old
        .announced()
        .into_iter()
        .filter(|(s, _)| *s == session)
        .map(|(_, text)| text)
        .collect();
    assert!(!sent.is_empty());
    let missing: Vec<&String> = sent.iter().filter(|t| !from_old.contains(t)).collect();
    assert!(
        missing.is_empty(),
        "{} of the old backend's {} messages lost, from {:?}",
        missing.len(),
        sent.len(),
        missing.first()
    );
    assert!(from_old == sent, "the old backend's messages out of order");
    assert!(
        old.closes().contains(&(1001, "session moved".to_string())),
        "{:?}",
        old.closes()
    );
}
