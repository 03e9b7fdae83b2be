//! Memory no client can exhaust: the replay window's byte bound, the age
//! bound letting an idle session's window go, and the process budget
//! (`limits.max_buffered_bytes`): the largest holders stop being read near
//! it and are closed with 1013 past it, while small sessions relay on.
//!
//! What the router holds is read from its own account (`GET /api/memory`);
//! the burst test also runs the router binary as a process of its own and
//! reads its resident memory from `/proc`.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use serde::Deserialize;
use support::{
    BackendOptions, RouterProcess, TestBackend, WAIT, close_code, echo, eventually, http_get, key,
    masked_header, metric, raise_fd_limit, raw_session, read_welcome, recv_data, router,
    trace_init, try_connect,
};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1024 * 1024;
const KIB: usize = 1024;

/// The router's `GET /api/memory`.
#[derive(Debug, Deserialize)]
struct MemoryState {
    held_bytes: usize,
    peak_bytes: usize,
    limit_bytes: usize,
    pressure: String,
}

async fn memory(admin: SocketAddr) -> MemoryState {
    let (status, body) = http_get(admin, "/api/memory").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A session's share of what the router reports: each session reports its
/// bytes in steps of 16 KiB, so an idle one shows at most this.
const REPORT_STEP: usize = 16 * KIB;

#[tokio::test]
async fn a_burst_of_large_messages_stays_within_the_session_bounds_and_an_idle_session_lets_go() {
    let _trace = trace_init();
    raise_fd_limit();
    let backend = TestBackend::start("mem-burst").await;
    let builder = router()
        .backend(&backend, "eu")
        .extra("[migration]\nreplay_max_age = \"3s\"\n");
    let router = RouterProcess::start(&builder, "burst").await;
    let base_rss = router.rss_bytes();

    // 20 sessions each send 64 messages of 1,000,000 bytes, one after the
    // other (each echoed), then 100 of 4,000 bytes, then go quiet.
    let mut sessions = JoinSet::new();
    for i in 0..20 {
        let url = router.url(&key("burst", i));
        sessions.spawn(async move {
            let (mut client, _) = try_connect(&url, &[]).await.expect("connect");
            read_welcome(&mut client).await;
            for (count, size) in [(64, 1_000_000), (100, 4_000)] {
                let message = vec![7u8; size];
                for _ in 0..count {
                    client.send(Message::binary(message.clone())).await.unwrap();
                    match recv_data(&mut client).await {
                        Message::Binary(echoed) => assert_eq!(echoed.len(), size),
                        other => panic!("expected the echo, got {other:?}"),
                    }
                }
            }
            client
        });
    }
    let mut clients = Vec::new();
    while let Some(client) = sessions.join_next().await {
        clients.push(client.expect("session task"));
    }

    // While they relayed, no session held more than its reader's buffer
    // and write queue for one message each way and its replay window
    // (128 KiB of frames); before the byte bound, each window kept 64 MB.
    let state = memory(router.admin).await;
    assert!(
        state.peak_bytes <= 20 * 5 * MIB,
        "20 sessions held {} bytes at most",
        state.peak_bytes
    );
    // The small messages outran the byte bound: the window let some go,
    // and says so.
    let dropped = metric(router.admin, "wsrouter_replay_dropped_total").await;
    assert!(dropped > 0.0, "no replay drop counted");
    // The 1 MB messages are each bigger than the window: never kept.
    assert!(
        state.held_bytes <= 20 * (2 * 128 * KIB + REPORT_STEP),
        "20 sessions hold {} bytes after their last message",
        state.held_bytes
    );

    // Past `replay_max_age`, the idle sessions' windows are gone: each is
    // back to its idle size.
    eventually("the idle sessions let their windows go", WAIT, async || {
        memory(router.admin).await.held_bytes <= 20 * REPORT_STEP
    })
    .await;
    let idle_rss = router.rss_bytes();
    assert!(
        idle_rss < base_rss + 256 * MIB as u64,
        "resident memory went from {base_rss} to {idle_rss} bytes with 20 idle sessions"
    );
    // And they still relay.
    for client in &mut clients {
        client.send(Message::text("still here")).await.unwrap();
        assert_eq!(recv_data(client).await, Message::text("still here"));
    }
}

#[tokio::test]
async fn partial_messages_past_the_budget_pause_then_close_the_largest_with_1013() {
    let _trace = trace_init();
    raise_fd_limit();
    let backend = TestBackend::start("mem-partial").await;
    let router = router()
        .backend(&backend, "eu")
        .extra("[limits]\nmax_buffered_bytes = 67108864\n")
        .start()
        .await;
    assert_eq!(memory(router.admin).await.limit_bytes, 64 * MIB);
    let (mut bystander, _) = router.connect("mem-bystander", &[]).await;

    // 300 sessions each announce a 1,048,000-byte message and send all of
    // it but the last byte: 300 MB offered against a 64 MiB budget. Each
    // notes the close code the router ends it with, if it does.
    let close_codes = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut attackers = JoinSet::new();
    for i in 0..300 {
        let raw = raw_session(router.public, &key("partial", i)).await;
        let close_codes = Arc::clone(&close_codes);
        attackers.spawn(async move {
            let (mut from_router, mut to_router) = raw.into_split();
            let writer = tokio::spawn(async move {
                let len = 1_048_000;
                let _ = to_router.write_all(&masked_header(0x82, len)).await;
                let _ = to_router.write_all(&vec![1u8; len as usize - 1]).await;
                // Hold the connection open until the router ends it.
                std::future::pending::<()>().await;
            });
            let code = close_code(&mut from_router).await;
            writer.abort();
            close_codes.lock().push(code);
        });
    }
    let closed_with = |code: Option<u16>| close_codes.lock().iter().filter(|c| **c == code).count();

    // The router holds up to its budget, then closes the largest holders.
    eventually(
        "the router closes attackers with 1013",
        2 * WAIT,
        async || closed_with(Some(1013)) > 0,
    )
    .await;
    let state = memory(router.admin).await;
    // (The pressure state flips as sessions close and the paused read
    // again; what it says is one of three words.)
    assert!(
        ["normal", "pausing", "shedding"].contains(&state.pressure.as_str()),
        "{state:?}"
    );
    assert!(
        state.peak_bytes >= state.limit_bytes / 4 * 3,
        "never reached the pause threshold: {state:?}"
    );
    assert!(
        metric(
            router.admin,
            "wsrouter_closes_total{reason=\"memory_pressure\"}"
        )
        .await
            >= 1.0
    );

    // Meanwhile the ordinary session relays, and a new one connects.
    echo(&mut bystander, "unbothered").await;
    let (mut newcomer, _) = router.connect("mem-newcomer", &[]).await;
    echo(&mut newcomer, "hello during the attack").await;

    // A while later: the total never passed the budget, and every attacker
    // the router ended it ended with 1013 (the rest are still paused).
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Growing a buffer is checked against the budget before it happens;
    // what a session already holds reaches the total in steps, so the
    // total may run one step per session behind.
    let state = memory(router.admin).await;
    let lag = 41 * REPORT_STEP;
    assert!(
        state.peak_bytes <= state.limit_bytes + lag,
        "held {} bytes at most, over the {} budget and {lag} of reporting lag",
        state.peak_bytes,
        state.limit_bytes
    );
    let codes = close_codes.lock().clone();
    assert!(codes.iter().all(|code| *code == Some(1013)), "{codes:?}");
    assert!(
        codes.len() < 300,
        "every attacker was closed: none was only paused"
    );
    attackers.shutdown().await;
    echo(&mut bystander, "still unbothered").await;
}

#[tokio::test]
async fn a_mass_move_stays_within_the_budget() {
    let _trace = trace_init();
    raise_fd_limit();
    let dying = TestBackend::start("mem-move-eu").await;
    // Slow to take the sessions: the moving sessions' queues fill.
    let slow = TestBackend::start_with(
        "mem-move-us",
        BackendOptions {
            upgrade_delay: Some(Duration::from_millis(1500)),
            ..BackendOptions::default()
        },
    )
    .await;
    let router = router()
        .backend(&dying, "eu")
        .backend(&slow, "us")
        .extra("[limits]\nmax_buffered_bytes = 16777216\n")
        .start()
        .await;

    // 40 sessions; their backend dies under them, and each then sends 50
    // messages of 16 KiB without waiting for echoes: 800 KiB each, under
    // the 1 MiB queue of a moving session, 32 MiB in all against a budget
    // of 16 MiB.
    let mut clients = Vec::new();
    for i in 0..40 {
        let (client, welcome) = router.connect(&key("mass-move", i), &[]).await;
        assert_eq!(welcome.backend, "mem-move-eu");
        clients.push(client);
    }
    drop(dying);
    let mut sessions = JoinSet::new();
    for client in clients {
        sessions.spawn(async move {
            let (mut sink, mut stream) = futures_util::StreamExt::split(client);
            let sender = tokio::spawn(async move {
                for n in 0..50u8 {
                    let mut message = vec![3u8; 16 * KIB];
                    message[0] = n;
                    if sink.send(Message::binary(message)).await.is_err() {
                        break;
                    }
                }
                sink
            });
            // Then: the session moved (the new backend's welcome, then every
            // echo, read as it comes), or it was closed with 1013.
            let mut end = None;
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut stream)).await
            {
                match message {
                    Message::Text(text) if text.contains("mem-move-us") => end = Some("moved"),
                    Message::Binary(echo) if end == Some("moved") && echo[0] == 49 => break,
                    Message::Close(Some(frame)) => {
                        assert_eq!(u16::from(frame.code), 1013, "{frame:?}");
                        end = Some("closed");
                        break;
                    }
                    _ => {}
                }
            }
            let mut sink = sender.await.expect("sender");
            if end == Some("moved") {
                // And it relays on the new backend (or, holding that much
                // while the budget is short, is closed with 1013 too).
                sink.send(Message::text("after the move")).await.unwrap();
                loop {
                    match futures_util::StreamExt::next(&mut stream).await {
                        Some(Ok(Message::Text(text))) if text == "after the move" => break,
                        Some(Ok(Message::Close(Some(frame)))) => {
                            assert_eq!(u16::from(frame.code), 1013, "{frame:?}");
                            end = Some("closed");
                            break;
                        }
                        Some(Ok(_)) => {}
                        other => panic!("a moved session failed: {other:?}"),
                    }
                }
            }
            end
        });
    }

    let (mut moved, mut closed) = (0, 0);
    while let Some(session) = sessions.join_next().await {
        match session.expect("session task") {
            Some("moved") => moved += 1,
            Some("closed") => closed += 1,
            end => panic!("a session neither moved nor closed: {end:?}"),
        }
    }
    // Growing a buffer is checked against the budget before it happens;
    // what a session already holds reaches the total in steps, so the
    // total may run one step per session behind.
    let state = memory(router.admin).await;
    let lag = 41 * REPORT_STEP;
    assert!(
        state.peak_bytes <= state.limit_bytes + lag,
        "held {} bytes at most, over the {} budget and {lag} of reporting lag",
        state.peak_bytes,
        state.limit_bytes
    );
    assert!(closed > 0, "the queues never reached the budget");
    assert!(moved > 0, "no session moved");
}
