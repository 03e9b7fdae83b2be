//! Operating a live router: draining and undraining a backend, health moves
//! that do not pull sessions back, config reloads (remove, add, reweight, a
//! broken file), the admin bearer token, passive ejection, and SIGTERM on
//! the real binary. Every test runs real routers, backends and WebSocket
//! clients on loopback; timing is only asserted as lower bounds (pacing, the
//! grace period) and generous upper bounds.
//!
//! The metrics recorder is process-wide, so every test uses backend ids no
//! other test uses and reads only its own series.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::{
    CITY_DB, ChildGuard, Client, TestBackend, WAIT, Welcome, closed_port, echo, eventually,
    expect_close, free_port, key, log_of, manifest_dir, raise_fd_limit, read_answer, read_welcome,
    recv_data, router, temp_file, trace_init, try_connect, try_status,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

// === helpers ===

/// Every task's result; a panic in a task fails the test with its message.
async fn join_all<T: 'static>(mut set: JoinSet<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(set.len());
    while let Some(result) = set.join_next().await {
        match result {
            Ok(value) => out.push(value),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a client task failed: {e}"),
        }
    }
    out
}

/// The welcome of the backend a session was moved to: the next data
/// message, from `to`, naming `from` as the backend it left.
async fn expect_moved(client: &mut Client, key: &str, from: &str, to: &str) -> Welcome {
    let welcome = match recv_data(client).await {
        Message::Text(text) => serde_json::from_str::<Welcome>(text.as_str()).unwrap_or_else(|e| {
            panic!("session {key}: expected a welcome from the new backend ({e}), got {text}")
        }),
        other => panic!("session {key}: expected a welcome from the new backend, got {other:?}"),
    };
    assert_eq!(
        welcome.backend, to,
        "session {key} moved to the wrong backend"
    );
    assert_eq!(
        welcome.header("x-wsrouter-migrated-from"),
        Some(from),
        "session {key}: {welcome:?}"
    );
    assert_eq!(
        welcome.header("x-wsrouter-session"),
        Some(key),
        "session {key} lost its key in the move"
    );
    welcome
}

/// The sum of every sample of `name` whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `wsrouter_migrations_total{from,to,reason}` as the router reports it.
async fn migrations(router: &support::RouterHandle, from: &str, to: &str, reason: &str) -> f64 {
    let (status, body) = router.admin_get("/metrics").await;
    assert_eq!(status, 200);
    metric(
        &body,
        "wsrouter_migrations_total",
        &[("from", from), ("to", to), ("reason", reason)],
    )
}

/// The ids `/api/backends` lists, in order.
async fn listed_ids(router: &support::RouterHandle) -> Vec<String> {
    router
        .backends_api()
        .await
        .iter()
        .map(|b| b["id"].as_str().expect("id is a string").to_string())
        .collect()
}

/// Connect every key with at most `concurrency` handshakes in flight; each
/// session reads its welcome, then sends `before-KEY` and gets the echo.
async fn connect_many(
    router: &support::RouterHandle,
    keys: &[String],
    concurrency: usize,
) -> Vec<(String, Client, Welcome)> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let url = router.url(key);
        let key = key.clone();
        let permits = Arc::clone(&permits);
        set.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            let (mut client, _) = try_connect(&url, &[])
                .await
                .unwrap_or_else(|e| panic!("connect {key}: {e}"));
            let welcome = read_welcome(&mut client).await;
            echo(&mut client, &format!("before-{key}")).await;
            (i, key, client, welcome)
        });
    }
    let mut sessions = join_all(set).await;
    sessions.sort_by_key(|s| s.0);
    sessions
        .into_iter()
        .map(|(_, key, client, welcome)| (key, client, welcome))
        .collect()
}

// === drain and undrain ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_backend_with_500_sessions_moves_every_one_paced_and_loses_nothing() {
    let _trace = trace_init();
    raise_fd_limit();
    const SESSIONS: usize = 500;
    const RATE: u32 = 250;
    let a = TestBackend::start("drain500-eu-a").await;
    let b = TestBackend::start("drain500-us-b").await;
    // Loopback clients fall back to the default region (eu), so every
    // session starts on eu-a, and us-b is the only place to move to.
    let router = router()
        .backend(&a, "eu")
        .backend(&b, "us")
        .extra(&format!("[migration]\nmax_rate_per_backend = {RATE}\n"))
        .start()
        .await;

    let keys: Vec<String> = (0..SESSIONS).map(|i| key("drain500", i)).collect();
    let sessions = connect_many(&router, &keys, 50).await;
    for (key, _, welcome) in &sessions {
        assert_eq!(welcome.backend, a.id, "session {key} did not start on eu-a");
    }
    assert_eq!(a.sessions(), SESSIONS);
    assert_eq!(router.backend_sessions(&a.id).await, SESSIONS as u64);
    assert_eq!(router.backend_sessions(&b.id).await, 0);

    // Every client waits for its move; anything else (a close above all)
    // fails the test.
    let mut waiting = JoinSet::new();
    for (key, mut client, _) in sessions {
        let (from, to) = (a.id.clone(), b.id.clone());
        waiting.spawn(async move {
            let welcome = expect_moved(&mut client, &key, &from, &to).await;
            (key, client, welcome, Instant::now())
        });
    }

    let (status, body) = router
        .admin_post(&format!("/api/backends/{}/drain", a.id), None)
        .await;
    let drained_at = Instant::now();
    assert_eq!(status, 200, "drain: {body}");
    let answer: Value = serde_json::from_str(&body).expect("drain answers JSON");
    assert_eq!(answer["id"], a.id.as_str(), "{answer}");
    assert_eq!(answer["state"], "draining", "{answer}");

    let moved = join_all(waiting).await;
    let last_move = moved.iter().map(|m| m.3).max().expect("sessions");
    let pacing = Duration::from_secs_f64(SESSIONS as f64 / RATE as f64 * 0.6);
    assert!(
        last_move - drained_at >= pacing,
        "{SESSIONS} sessions moved in {:?}, faster than {RATE}/s allows (at least {pacing:?})",
        last_move - drained_at
    );
    for (key, _, welcome, _) in &moved {
        assert_eq!(
            welcome.header("x-wsrouter-replayed"),
            Some("0"),
            "a planned move replays nothing (session {key})"
        );
    }

    // The drained backend ends empty and stays draining; nobody was lost.
    let r = &router;
    eventually("eu-a has no sessions left", WAIT, async || {
        r.backend_sessions(&a.id).await == 0
    })
    .await;
    assert_eq!(router.backend_state(&a.id).await, "draining");
    assert_eq!(router.backend_sessions(&b.id).await, SESSIONS as u64);
    assert_eq!(b.sessions(), SESSIONS, "one dial per moved session");
    assert_eq!(
        migrations(&router, &a.id, &b.id, "drain").await,
        SESSIONS as f64
    );
    // Each old backend connection was closed cleanly (1001), not cut.
    eventually(
        "eu-a received a close for every moved session",
        WAIT,
        async || a.closes().len() == SESSIONS,
    )
    .await;
    assert!(
        a.closes().iter().all(|(code, _)| *code == 1001),
        "{:?}",
        a.closes()
    );

    // Every session still relays, now through us-b.
    let mut talking = JoinSet::new();
    for (key, mut client, _, _) in moved {
        talking.spawn(async move {
            echo(&mut client, &format!("after-{key}")).await;
            client
        });
    }
    let clients = join_all(talking).await;
    let on_b = b.received();
    let on_a = a.received();
    for key in &keys {
        let after = format!("after-{key}");
        let before = format!("before-{key}");
        assert!(
            on_b.iter().any(|(k, t)| k == key && *t == after),
            "us-b never got {after}"
        );
        assert!(
            on_a.iter().any(|(k, t)| k == key && *t == before),
            "eu-a never got {before}"
        );
    }
    assert_eq!(on_b.len(), SESSIONS, "us-b got replays or strays: {on_b:?}");
    assert_eq!(on_a.len(), SESSIONS, "eu-a got messages after the move");
    drop(clients);
}

/// Twenty sessions over two backends of one region; returns the sessions
/// on `on` and the others.
async fn split_sessions(
    router: &support::RouterHandle,
    prefix: &str,
    on: &str,
) -> (Vec<(String, Client)>, Vec<(String, Client)>) {
    let keys: Vec<String> = (0..20).map(|i| key(prefix, i)).collect();
    let (mut here, mut elsewhere) = (Vec::new(), Vec::new());
    for (key, client, welcome) in connect_many(router, &keys, 10).await {
        if welcome.backend == on {
            here.push((key, client));
        } else {
            elsewhere.push((key, client));
        }
    }
    assert!(
        !here.is_empty() && !elsewhere.is_empty(),
        "20 keys should spread over both backends ({} on {on})",
        here.len()
    );
    (here, elsewhere)
}

/// After a backend is usable again: its keys' new sessions land on it,
/// and the sessions that moved off it stay where they are.
async fn comes_back_without_pulling_sessions_back(
    router: &support::RouterHandle,
    back: &TestBackend,
    other: &TestBackend,
    moved: &mut [(String, Client)],
    stayed: &mut [(String, Client)],
) {
    let before = back.sessions();
    let mut fresh = Vec::new();
    for (key, _) in moved.iter() {
        let (client, welcome) = router.connect(key, &[]).await;
        assert_eq!(
            welcome.backend, back.id,
            "a new session for {key} should hash to {} again",
            back.id
        );
        assert_eq!(welcome.header("x-wsrouter-migrated-from"), None);
        fresh.push(client);
    }
    assert_eq!(back.sessions(), before + moved.len());

    // Give a pull-back every chance to happen: a moved session that went
    // back would get a third welcome instead of its echo below. (A wait on
    // the absence of an event: nothing in the router's state marks it.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (key, client) in moved.iter_mut() {
        let text = format!("stays-{key}");
        echo(client, &text).await;
        assert!(
            other.received().iter().any(|(k, t)| k == key && *t == text),
            "{text} did not reach {}",
            other.id
        );
        assert!(
            !back.received().iter().any(|(_, t)| *t == text),
            "{text} reached {}: the moved session went back",
            back.id
        );
    }
    for (key, client) in stayed.iter_mut() {
        echo(client, &format!("untouched-{key}")).await;
    }
    assert_eq!(router.backend_sessions(&back.id).await, moved.len() as u64);
    assert_eq!(
        router.backend_sessions(&other.id).await,
        (moved.len() + stayed.len()) as u64
    );
    drop(fresh);
}

#[tokio::test]
async fn an_undrained_backend_gets_new_sessions_but_not_its_moved_ones_back() {
    let _trace = trace_init();
    let a = TestBackend::start("undrain-eu-a").await;
    let b = TestBackend::start("undrain-eu-b").await;
    let router = router().backend(&a, "eu").backend(&b, "eu").start().await;
    let (mut on_a, mut on_b) = split_sessions(&router, "undrain", &a.id).await;

    let (status, body) = router
        .admin_post(&format!("/api/backends/{}/drain", a.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    for (key, client) in on_a.iter_mut() {
        let welcome = expect_moved(client, key, &a.id, &b.id).await;
        assert_eq!(welcome.header("x-wsrouter-replayed"), Some("0"));
    }
    let r = &router;
    eventually("eu-a is empty", WAIT, async || {
        r.backend_sessions(&a.id).await == 0
    })
    .await;
    // A draining backend takes no new session, even for its own keys.
    let (client, welcome) = router.connect(&on_a[0].0, &[]).await;
    assert_eq!(
        welcome.backend, b.id,
        "a draining backend got a new session"
    );
    drop(client);

    let (status, body) = router
        .admin_post(&format!("/api/backends/{}/undrain", a.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("undrain answers JSON");
    assert_eq!(answer["state"], "healthy", "{answer}");
    assert_eq!(router.backend_state(&a.id).await, "healthy");
    eventually("the probe session is gone", WAIT, async || {
        r.backend_sessions(&b.id).await == (on_a.len() + on_b.len()) as u64
    })
    .await;

    comes_back_without_pulling_sessions_back(&router, &a, &b, &mut on_a, &mut on_b).await;
    assert_eq!(
        migrations(&router, &a.id, &b.id, "drain").await,
        on_a.len() as f64
    );
    assert_eq!(migrations(&router, &b.id, &a.id, "drain").await, 0.0);
}

#[tokio::test]
async fn a_recovered_backend_gets_new_sessions_but_not_its_moved_ones_back() {
    let _trace = trace_init();
    let a = TestBackend::start("recover-eu-a").await;
    let b = TestBackend::start("recover-eu-b").await;
    let router = router()
        .fast_health_checks()
        .backend(&a, "eu")
        .backend(&b, "eu")
        .start()
        .await;
    let (mut on_a, mut on_b) = split_sessions(&router, "recover", &a.id).await;

    // eu-a fails its checks: its sessions move (reason health).
    a.set_health(503);
    for (key, client) in on_a.iter_mut() {
        let welcome = expect_moved(client, key, &a.id, &b.id).await;
        // A health move may replay the last messages (the backend might have
        // lost them); the test backend echoes the replays, so read those.
        let replayed: usize = welcome
            .header("x-wsrouter-replayed")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a moved session is told its replay count: {welcome:?}"));
        assert!(replayed <= 1, "only one message was ever sent: {welcome:?}");
        for _ in 0..replayed {
            match recv_data(client).await {
                Message::Text(t) if t.as_str() == format!("before-{key}") => {}
                other => panic!("expected the echo of a replayed message, got {other:?}"),
            }
        }
    }
    assert_eq!(router.backend_state(&a.id).await, "unhealthy");
    let r = &router;
    eventually("eu-a is empty", WAIT, async || {
        r.backend_sessions(&a.id).await == 0
    })
    .await;
    assert_eq!(
        migrations(&router, &a.id, &b.id, "health").await,
        on_a.len() as f64
    );

    // It recovers: new sessions hash to it again, moved ones stay on eu-b.
    a.set_health(200);
    eventually("eu-a is healthy again", WAIT, async || {
        r.backend_state(&a.id).await == "healthy"
    })
    .await;
    comes_back_without_pulling_sessions_back(&router, &a, &b, &mut on_a, &mut on_b).await;
    assert_eq!(migrations(&router, &b.id, &a.id, "health").await, 0.0);
}

#[tokio::test]
async fn a_drain_requested_during_a_health_move_still_empties_the_backend() {
    let _trace = trace_init();
    let a = TestBackend::start("overlap-eu-a").await;
    let b = TestBackend::start("overlap-us-b").await;
    // Slow pacing, so the health move is still under way when the drain
    // comes and when the backend recovers.
    let router = router()
        .fast_health_checks()
        .backend(&a, "eu")
        .backend(&b, "us")
        .extra("[migration]\nmax_rate_per_backend = 2\n")
        .start()
        .await;
    let keys: Vec<String> = (0..10).map(|i| key("overlap", i)).collect();
    let mut sessions = connect_many(&router, &keys, 10).await;
    assert!(sessions.iter().all(|(_, _, w)| w.backend == a.id));

    a.set_health(503);
    let r = &router;
    eventually("eu-a is unhealthy", WAIT, async || {
        r.backend_state(&a.id).await == "unhealthy"
    })
    .await;
    let (status, body) = router
        .admin_post(&format!("/api/backends/{}/drain", a.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    // It passes its checks again, but it is still draining: every session
    // must still leave it.
    a.set_health(200);
    eventually(
        "the draining backend is empty",
        Duration::from_secs(30),
        async || r.backend_sessions(&a.id).await == 0,
    )
    .await;
    assert_eq!(router.backend_state(&a.id).await, "draining");
    for (key, client, _) in sessions.iter_mut() {
        expect_moved(client, key, &a.id, &b.id).await;
    }
}

#[tokio::test]
async fn draining_a_backend_with_nowhere_to_go_keeps_its_sessions_relaying() {
    let _trace = trace_init();
    let a = TestBackend::start("alone-eu-a").await;
    // The move gives up only after the migration timeout; make it longer
    // than the bound on every wait, so a session stalled by the move shows.
    let router = router()
        .backend(&a, "eu")
        .extra("[migration]\ntimeout = \"30s\"\n")
        .start()
        .await;
    let (mut client, welcome) = router.connect("alone-1", &[]).await;
    assert_eq!(welcome.backend, a.id);
    echo(&mut client, "before the drain").await;

    let (status, body) = router
        .admin_post(&format!("/api/backends/{}/drain", a.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    // No other backend: the session stays (DESIGN: a planned move that finds
    // no backend stays where it is), and keeps relaying both ways between
    // the drain's requests (one every half second while it stays).
    let r = &router;
    let stayed = async || {
        let text = r.admin_get("/metrics").await.1;
        metric(
            &text,
            "wsrouter_migrations_stayed_total",
            &[("reason", "drain")],
        )
    };
    for i in 0..3 {
        let before = stayed().await;
        eventually(
            "the session was asked to move, and stayed",
            WAIT,
            async || stayed().await > before,
        )
        .await;
        echo(&mut client, &format!("while draining {i}")).await;
    }
    assert_eq!(router.backend_sessions(&a.id).await, 1);
    assert_eq!(router.backend_state(&a.id).await, "draining");
}

// === reload ===

#[tokio::test]
async fn a_reload_that_removes_a_backend_moves_its_sessions_without_a_close() {
    let _trace = trace_init();
    let a = TestBackend::start("rm-eu-a").await;
    let b = TestBackend::start("rm-us-b").await;
    let path = temp_file("reload-remove.toml");
    let router = router()
        .backend(&a, "eu")
        .backend(&b, "us")
        .start_from_file(&path)
        .await;
    let keys: Vec<String> = (0..10).map(|i| key("rm", i)).collect();
    let mut sessions = connect_many(&router, &keys, 10).await;
    assert!(sessions.iter().all(|(_, _, w)| w.backend == a.id));

    support::router().backend(&b, "us").write_to(&path);
    let (status, body) = router.admin_post("/api/reload", None).await;
    assert_eq!(status, 200, "reload: {body}");
    let summary: Value = serde_json::from_str(&body).expect("reload answers JSON");
    assert_eq!(summary["removed"], serde_json::json!([a.id]), "{summary}");
    assert_eq!(summary["added"], serde_json::json!([]), "{summary}");

    for (key, client, _) in sessions.iter_mut() {
        let welcome = expect_moved(client, key, &a.id, &b.id).await;
        assert_eq!(welcome.header("x-wsrouter-replayed"), Some("0"));
    }
    assert_eq!(listed_ids(&router).await, vec![b.id.clone()]);
    assert_eq!(router.backend_sessions(&b.id).await, keys.len() as u64);
    for (key, client, _) in sessions.iter_mut() {
        echo(client, &format!("after-{key}")).await;
    }
    assert_eq!(
        migrations(&router, &a.id, &b.id, "removed").await,
        keys.len() as f64
    );
    // The removed backend saw every session leave cleanly.
    eventually("rm-eu-a got a close per session", WAIT, async || {
        a.closes().len() == keys.len()
    })
    .await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_reload_with_a_broken_config_is_refused_and_changes_nothing() {
    let _trace = trace_init();
    let a = TestBackend::start("broken-eu-a").await;
    let b = TestBackend::start("broken-us-b").await;
    let path = temp_file("reload-broken.toml");
    let router = router()
        .backend(&a, "eu")
        .backend(&b, "us")
        .start_from_file(&path)
        .await;
    let keys: Vec<String> = (0..5).map(|i| key("broken", i)).collect();
    let mut sessions = connect_many(&router, &keys, 5).await;
    let before = router.backends_api().await;

    // A backend in a region the file does not define; eu-a is gone from it
    // too, so applying it by mistake would show.
    support::router()
        .backend(&b, "us")
        .backend_entry("broken-mars-1", &b.url(), "mars", None, None)
        .write_to(&path);
    let (status, body) = router.admin_post("/api/reload", None).await;
    assert_eq!(status, 422, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("422 answers JSON");
    let problems: Vec<&str> = answer["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems listed: {answer}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("backends[1].region") && p.contains("mars")),
        "the problem names the field and the region: {problems:?}"
    );

    // Not TOML at all: refused the same way.
    std::fs::write(&path, "[[backends]\nid = ").expect("write");
    let (status, body) = router.admin_post("/api/reload", None).await;
    assert_eq!(status, 422, "{body}");

    // Nothing changed: same backends, states, weights and sessions.
    let after = router.backends_api().await;
    let summary = |list: &[Value]| -> Vec<(Value, Value, Value, Value, Value)> {
        list.iter()
            .map(|b| {
                let field = |name: &str| b[name].clone();
                (
                    field("id"),
                    field("url"),
                    field("state"),
                    field("weight"),
                    field("sessions"),
                )
            })
            .collect()
    };
    assert_eq!(summary(&after), summary(&before));
    assert_eq!(router.backend_sessions(&a.id).await, keys.len() as u64);
    // The sessions were not touched: their next message is their echo.
    for (key, client, _) in sessions.iter_mut() {
        echo(client, &format!("still-{key}")).await;
    }
    assert_eq!(a.sessions(), keys.len());
    assert!(b.received().is_empty());
    // And a new session still works, placed by the running configuration.
    let (mut client, welcome) = router.connect("broken-new", &[]).await;
    assert_eq!(welcome.backend, a.id);
    echo(&mut client, "hello").await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_reload_adds_a_backend_and_reweights_another() {
    let _trace = trace_init();
    let a = TestBackend::start("grow-eu-a").await;
    let c = TestBackend::start("grow-eu-c").await;
    let path = temp_file("reload-add.toml");
    let router = router().backend(&a, "eu").start_from_file(&path).await;
    let mut sessions = connect_many(&router, &[key("grow", 0), key("grow", 1)], 2).await;
    assert_eq!(listed_ids(&router).await, vec![a.id.clone()]);
    assert_eq!(c.health_checks(), 0);

    support::router()
        .weighted(&a, "eu", 5)
        .backend(&c, "eu")
        .write_to(&path);
    let (status, body) = router.admin_post("/api/reload", None).await;
    assert_eq!(status, 200, "reload: {body}");
    let summary: Value = serde_json::from_str(&body).expect("reload answers JSON");
    assert_eq!(summary["added"], serde_json::json!([c.id]), "{summary}");
    assert_eq!(
        summary["reconfigured"],
        serde_json::json!([a.id]),
        "{summary}"
    );
    assert_eq!(summary["removed"], serde_json::json!([]), "{summary}");

    let api = router.backends_api().await;
    let entry = |id: &str| {
        api.iter()
            .find(|b| b["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from /api/backends: {api:?}"))
            .clone()
    };
    assert_eq!(entry(&a.id)["weight"], 5);
    assert_eq!(entry(&c.id)["region"], "eu");
    assert_eq!(entry(&c.id)["url"], c.url());

    // The new backend is health-checked, and takes new sessions.
    let r = &router;
    eventually("grow-eu-c has been checked", WAIT, async || {
        c.health_checks() > 0
            && r.backends_api()
                .await
                .iter()
                .any(|b| b["id"] == c.id.as_str() && b["last_check"]["ok"] == true)
    })
    .await;
    assert_eq!(router.backend_state(&c.id).await, "healthy");
    let mut landed_on_c = 0;
    for i in 0..40 {
        let (client, welcome) = router.connect(&key("grow-new", i), &[]).await;
        if welcome.backend == c.id {
            landed_on_c += 1;
        }
        drop(client);
    }
    assert!(
        landed_on_c > 0,
        "no new session of 40 went to the added backend"
    );
    assert!(
        landed_on_c < 40,
        "weight 5 against 1 keeps most keys on grow-eu-a"
    );
    // The sessions that were there before are untouched.
    for (key, client, _) in sessions.iter_mut() {
        echo(client, &format!("still-{key}")).await;
    }
    let _ = std::fs::remove_file(&path);
}

// === admin token ===

#[tokio::test]
async fn mutating_admin_calls_need_the_bearer_token_and_it_never_leaks() {
    let _trace = trace_init();
    let a = TestBackend::start("token-eu-a").await;
    let b = TestBackend::start("token-us-b").await;
    let router = router()
        .admin_token("s3cret")
        .backend(&a, "eu")
        .backend(&b, "us")
        .start()
        .await;
    let drain = format!("/api/backends/{}/drain", a.id);

    let (status, _) = router.admin_post(&drain, None).await;
    assert_eq!(status, 401, "drain without a token");
    assert_eq!(router.backend_state(&a.id).await, "healthy");
    for wrong in ["s3cres", "s3cret2", "S3CRET", ""] {
        let (status, _) = router.admin_post(&drain, Some(wrong)).await;
        assert_eq!(status, 401, "drain with token {wrong:?}");
    }
    assert_eq!(router.backend_state(&a.id).await, "healthy");
    let (status, _) = router.admin_post("/api/reload", None).await;
    assert_eq!(status, 401, "reload without a token");
    // A token in another scheme is no bearer token.
    let mut stream = TcpStream::connect(router.admin).await.expect("connect");
    let request = format!(
        "POST {drain} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic s3cret\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    assert_eq!(read_answer(&mut stream).await.status, Some(401));
    assert_eq!(router.backend_state(&a.id).await, "healthy");

    let (status, body) = router.admin_post(&drain, Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(router.backend_state(&a.id).await, "draining");
    let (status, body) = router
        .admin_post(&format!("/api/backends/{}/undrain", a.id), Some("s3cret"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(router.backend_state(&a.id).await, "healthy");

    // Reading needs no token, and no answer contains it.
    for path in ["/metrics", "/api/backends", "/healthz", "/readyz"] {
        let (status, body) = router.admin_get(path).await;
        assert_eq!(status, 200, "GET {path} without a token: {body}");
        assert!(!body.contains("s3cret"), "GET {path} shows the token");
    }
}

// === passive health ===

#[tokio::test]
async fn a_failed_dial_ejects_a_backend_before_active_checks_notice() {
    let _trace = trace_init();
    let live = TestBackend::start("passive-eu-live").await;
    let dead = closed_port();
    let dead_id = "passive-eu-dead";
    // Active checks are the harness's slow ones (every 60 s, three failures
    // to fall): only the failed dial can take the dead backend out.
    let router = router()
        .extra("[passive_health]\nmax_failures = 1\ncooldown = \"30s\"\n")
        .backend_entry(dead_id, &dead.url(), "eu", None, None)
        .backend(&live, "eu")
        .start()
        .await;
    assert_eq!(router.backend_state(dead_id).await, "healthy");

    // A key whose rendezvous ranking puts the dead backend first.
    let view = |id: &str| wsrouter::steer::BackendView {
        region: 0,
        weight: 1,
        id_hash: wsrouter::steer::id_hash(id),
        available: true,
    };
    let ranks_dead_first = |key: &str| {
        wsrouter::steer::rendezvous_score(key, &view(dead_id))
            > wsrouter::steer::rendezvous_score(key, &view(&live.id))
    };
    let dead_first = (0..)
        .map(|i| key("passive", i))
        .find(|k| ranks_dead_first(k))
        .expect("some key ranks the dead backend first");

    let (mut client, welcome) = router.connect(&dead_first, &[]).await;
    assert_eq!(welcome.backend, live.id, "the failed dial fails over");
    echo(&mut client, "placed").await;
    let r = &router;
    eventually("the dead backend is ejected", WAIT, async || {
        r.backend_state(dead_id).await == "ejected"
    })
    .await;
    assert_eq!(router.backend_state(&live.id).await, "healthy");
    assert_eq!(
        router.admin_get("/readyz").await.0,
        200,
        "an ejected backend does not make the router unready while another is healthy"
    );
    // Still ejected for the next sessions, which go straight to the live one.
    let (_client, welcome) = router.connect(&format!("{dead_first}-again"), &[]).await;
    assert_eq!(welcome.backend, live.id);
    assert_eq!(router.backend_state(dead_id).await, "ejected");
}

// === SIGTERM on the binary ===

#[tokio::test]
async fn sigterm_stops_accepting_keeps_relaying_for_the_grace_then_closes_with_1001() {
    let _trace = trace_init();
    let grace = Duration::from_secs(2);
    let backend = TestBackend::start("sigterm-eu").await;
    let (public_port, admin_port) = (free_port(), free_port());
    let public: SocketAddr = ([127, 0, 0, 1], public_port).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let geoip = manifest_dir().join(CITY_DB).display().to_string();
    let toml = router()
        .geoip(&geoip)
        .backend(&backend, "eu")
        .shutdown_grace("2s")
        .toml();
    let toml = toml
        .replacen(
            "public = \"127.0.0.1:0\"",
            &format!("public = \"{public}\""),
            1,
        )
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{admin}\""),
            1,
        );
    assert!(toml.contains(&public.to_string()) && toml.contains(&admin.to_string()));
    let config = temp_file("sigterm.toml");
    std::fs::write(&config, &toml).expect("write config");
    let log = temp_file("sigterm.log");

    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_wsrouter"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "wsrouter=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start the wsrouter binary"),
    );
    let deadline = Instant::now() + WAIT;
    while try_status(admin, "/readyz").await != Some(200) {
        if let Some(status) = child.0.try_wait().expect("child status") {
            panic!("wsrouter exited early ({status}):\n{}", log_of(&log));
        }
        assert!(
            Instant::now() < deadline,
            "wsrouter not ready:\n{}",
            log_of(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let url = format!("ws://{public}/chat?session=sigterm-1");
    let (mut client, _) = try_connect(&url, &[]).await.expect("connect");
    let welcome = read_welcome(&mut client).await;
    assert_eq!(welcome.backend, backend.id);
    echo(&mut client, "before the signal").await;

    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM failed");

    // Not ready any more (503 while the grace runs, or refused once it is
    // over); by then the public listener is closed.
    eventually("/readyz stops answering 200", WAIT, async || {
        try_status(admin, "/readyz").await != Some(200)
    })
    .await;
    assert!(
        TcpStream::connect(public).await.is_err(),
        "a new connection was accepted after SIGTERM:\n{}",
        log_of(&log)
    );

    // Within the grace, the live session keeps relaying.
    tokio::time::sleep_until(signalled + Duration::from_secs(1)).await;
    echo(&mut client, "during the grace").await;
    let readyz = try_status(admin, "/readyz").await;
    assert!(readyz.is_none_or(|s| s == 503), "/readyz: {readyz:?}");

    // Then it is closed with 1001, not before the grace is over.
    let (code, reason) =
        tokio::time::timeout(grace + Duration::from_secs(10), expect_close(&mut client))
            .await
            .unwrap_or_else(|_| panic!("no close within the grace + 10 s:\n{}", log_of(&log)));
    let closed_after = signalled.elapsed();
    assert_eq!(code, 1001, "close reason {reason:?}");
    assert!(
        closed_after >= grace,
        "the session was closed {closed_after:?} after SIGTERM, before the {grace:?} grace"
    );
    let b = &backend;
    eventually("the backend got a 1001 close", WAIT, async || {
        b.closes().iter().any(|(code, _)| *code == 1001)
    })
    .await;

    // And the process exits cleanly.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("child status") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "wsrouter still running after the grace:\n{}",
            log_of(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "wsrouter exited with {status}:\n{}",
        log_of(&log)
    );
    assert!(TcpStream::connect(public).await.is_err());
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn what_the_old_backend_sends_during_a_planned_move_still_reaches_the_client() {
    let _trace = trace_init();
    let a = TestBackend::start("bcast-eu-a").await;
    // The next backend is slow to answer upgrades, so the move takes a
    // while, and the old one speaks meanwhile.
    let slow = support::BackendOptions {
        upgrade_delay: Some(Duration::from_millis(800)),
        ..Default::default()
    };
    let b = TestBackend::start_with("bcast-us-b", slow).await;
    let router = router().backend(&a, "eu").backend(&b, "us").start().await;
    let key = key("bcast", 1);
    let (mut client, welcome) = router.connect(&key, &[]).await;
    assert_eq!(welcome.backend, a.id);

    let (status, body) = router
        .admin_post(&format!("/api/backends/{}/drain", a.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    // Mid-move: the next backend has the upgrade request and is slow to
    // answer it.
    eventually("the move dials the next backend", WAIT, async || {
        b.requests() >= 1
    })
    .await;
    a.announce("news from a, mid-move");
    match recv_data(&mut client).await {
        Message::Text(text) => assert_eq!(text.as_str(), "news from a, mid-move"),
        other => panic!("expected the old backend's broadcast, got {other:?}"),
    }
    expect_moved(&mut client, &key, &a.id, &b.id).await;
    echo(&mut client, "now on b").await;
}

#[tokio::test]
async fn a_reload_applies_new_health_check_settings_to_the_backends_it_keeps() {
    let _trace = trace_init();
    let a = TestBackend::start("hc-reload-eu-a").await;
    let path = temp_file("reload-health.toml");
    // Checks every 60 s: the first one runs at start, the next far later.
    let router = router().backend(&a, "eu").start_from_file(&path).await;
    let a_ref = &a;
    eventually("the first check ran", WAIT, async || {
        a_ref.health_checks() >= 1
    })
    .await;
    a.set_health(503);

    support::router()
        .backend(&a, "eu")
        .fast_health_checks()
        .write_to(&path);
    let (status, body) = router.admin_post("/api/reload", None).await;
    assert_eq!(status, 200, "reload: {body}");
    // The kept backend is checked every 500 ms now, and found down.
    let r = &router;
    eventually("hc-reload-eu-a is unhealthy", WAIT, async || {
        r.backend_state(&a_ref.id).await == "unhealthy"
    })
    .await;
    let _ = std::fs::remove_file(&path);
}
