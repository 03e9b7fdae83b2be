//! Upgrading the router in place, with the real binary: SIGUSR2 or
//! `POST /api/upgrade` starts a new process that takes the listening
//! sockets from the old one, so no connection is refused; a new process
//! that cannot take over leaves the old one serving, and says why.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use support::{
    RouterBuilder, RouterProcess, TestBackend, WAIT, echo, eventually, http_post, log_of,
    read_welcome, router, try_connect,
};

/// A router whose old process keeps its sessions `old_process_timeout`.
fn upgradable(backend: &TestBackend, old_process_timeout: &str) -> RouterBuilder {
    router().backend(backend, "eu").extra(&format!(
        "[upgrade]\nold_process_timeout = \"{old_process_timeout}\"\n"
    ))
}

/// Connect, read the welcome and echo one message: what a client needs
/// from a router to call it working. The error says which step failed.
async fn full_session(url: &str) -> Result<(), String> {
    let (mut client, _) = try_connect(url, &[])
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::time::timeout(WAIT, async {
        read_welcome(&mut client).await;
        echo(&mut client, "hello").await;
    })
    .await
    .map_err(|_| "no welcome and echo in time".to_string())
}

/// The inodes of the listening TCP sockets on `port` (from
/// /proc/net/tcp): the same inodes before and after an upgrade mean the
/// new process accepts on the very sockets the old one had.
fn listening_sockets(port: u16) -> std::collections::BTreeSet<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let listening = fields.get(3) == Some(&"0A");
            let ours = u16::from_str_radix(local_port, 16).ok()? == port;
            (listening && ours).then(|| fields.get(9)?.parse().ok())?
        })
        .collect()
}

fn is_running(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A client that sends numbered messages every 50 ms and reads their
/// echoes as they come, until told to stop; returns what it sent and every
/// data message or close it received.
fn stream_numbers(
    client: support::Client,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<Message>)> {
    tokio::spawn(async move {
        let (mut sink, mut stream) = client.split();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(Ok(message)) = stream.next().await {
                match message {
                    Message::Ping(_) | Message::Pong(_) => {}
                    other => got.push(other),
                }
            }
            got
        });
        let mut sent = 0;
        while !stop.load(Ordering::SeqCst) {
            if sink.send(Message::text(sent.to_string())).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every echo has time to come back, then the client leaves.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = sink.send(Message::Close(None)).await;
        let got = tokio::time::timeout(WAIT, reader)
            .await
            .expect("the session ends")
            .expect("reader");
        (sent, got)
    })
}

#[tokio::test]
async fn sigusr2_hands_listeners_and_live_sessions_to_a_new_process_without_a_close() {
    support::raise_fd_limit();
    let backend = TestBackend::start("upgrade-eu").await;
    let mut router = RouterProcess::start(&upgradable(&backend, "30s"), "upgrade-sigusr2").await;
    let old = router.pid();
    assert_eq!(router.pid_in_file(), Some(old));
    let sockets = listening_sockets(router.public.port());
    assert!(!sockets.is_empty());

    // 200 sessions stream numbered messages both ways (the backend echoes).
    const SESSIONS: usize = 200;
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for i in 0..SESSIONS {
        let (mut client, _) = try_connect(&router.url(&format!("stream-{i}")), &[])
            .await
            .expect("connect");
        read_welcome(&mut client).await;
        streams.push(stream_numbers(client, Arc::clone(&stop)));
    }
    assert_eq!(backend.sessions(), SESSIONS);

    // And a client connects every 10 ms, through the whole upgrade,
    // without waiting for the one before.
    let connector = tokio::spawn({
        let (stop, url) = (Arc::clone(&stop), router.url("steady"));
        async move {
            let mut attempts = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let url = url.clone();
                attempts.push(tokio::spawn(async move { full_session(&url).await }));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut failures = Vec::new();
            for attempt in &mut attempts {
                if let Err(error) = attempt.await.expect("attempt") {
                    failures.push(error);
                }
            }
            (attempts.len(), failures)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = router.upgrade().await;
    assert!(is_running(new), "{}", log_of(&router.log));
    // Every session went over: the old process has nothing left and exits,
    // long before its 30 s.
    router.wait_for_exit().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);

    let (attempts, failures) = connector.await.expect("connector");
    assert!(
        failures.is_empty(),
        "{} of {attempts} connections failed: {failures:?}\n{}",
        failures.len(),
        log_of(&router.log)
    );
    assert!(attempts >= 20, "only {attempts} connections were tried");
    for (i, stream) in streams.into_iter().enumerate() {
        let (sent, got) = stream.await.expect("stream");
        // Every echo exactly once and in order; a close only at the end,
        // in answer to the client's own.
        let echoes: Vec<Message> = (0..sent).map(|n| Message::text(n.to_string())).collect();
        let data_end = got.len() - usize::from(got.last().is_some_and(Message::is_close));
        assert_eq!(got[..data_end], echoes[..], "session {i}: sent 0..{sent}");
    }
    // The backend saw no new connection: the 200, the steady client's.
    assert_eq!(
        backend.sessions(),
        SESSIONS + attempts,
        "a session was dialed again"
    );
    // No socket was bound afresh: the new process accepts on the old
    // one's, queues and all.
    assert_eq!(listening_sockets(router.public.port()), sockets);
    let received = support::metric(
        router.admin,
        "wsrouter_handover_sessions_total{result=\"received\"}",
    )
    .await;
    assert!(received >= SESSIONS as f64, "received {received}");
    // Both processes' logs: the hand-over went right on either side.
    let log = log_of(&router.log);
    let complaints: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .filter(|line| line.contains("wsrouter::upgrade") || line.contains("handover"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
    assert!(
        log.contains("the old process handed everything over"),
        "{log}"
    );
}

#[tokio::test]
async fn the_admin_api_upgrades_twice_in_a_row_and_answers_with_the_new_pid() {
    let backend = TestBackend::start("upgrade-api-eu").await;
    let router = RouterProcess::start(&upgradable(&backend, "1s"), "upgrade-api").await;
    let (mut through_both, _) = try_connect(&router.url("through-both"), &[])
        .await
        .expect("connect");
    read_welcome(&mut through_both).await;
    let mut holder = router.pid();
    for round in 0..2 {
        let (status, body) = http_post(router.admin, "/api/upgrade", None).await;
        assert_eq!(
            status,
            200,
            "round {round}: {body}\n{}",
            log_of(&router.log)
        );
        let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let pid = answer["pid"].as_u64().expect("a pid") as u32;
        assert_ne!(pid, holder);
        assert_eq!(router.new_holder(holder).await, pid);
        full_session(&router.url(&format!("round-{round}")))
            .await
            .expect("a session after the upgrade");
        echo(&mut through_both, &format!("after upgrade {round}")).await;
        holder = pid;
    }
    assert_eq!(backend.sessions(), 3, "a session was dialed again");
}

#[tokio::test]
async fn a_new_process_with_a_bad_configuration_leaves_the_old_one_serving() {
    let backend = TestBackend::start("upgrade-bad-eu").await;
    let router = RouterProcess::start(&upgradable(&backend, "1s"), "upgrade-bad").await;
    let (mut session, _) = try_connect(&router.url("kept"), &[])
        .await
        .expect("connect");
    read_welcome(&mut session).await;
    let good = std::fs::read_to_string(&router.config).expect("config");
    let bad = good.replace(
        "old_process_timeout = \"1s\"",
        "old_process_timeout = \"soon\"",
    );
    assert_ne!(bad, good);
    std::fs::write(&router.config, bad).expect("write config");

    let (status, body) = http_post(router.admin, "/api/upgrade", None).await;
    assert_eq!(status, 500, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["result"], "refused", "{answer}");
    let error = answer["error"].as_str().expect("an error");
    assert!(
        error.contains("upgrade.old_process_timeout"),
        "the reason names the field: {error}"
    );
    // Nothing changed: the same process holds the listeners and serves.
    assert_eq!(router.pid_in_file(), Some(router.pid()));
    echo(&mut session, "still here").await;
    full_session(&router.url("new"))
        .await
        .expect("a new session");
    assert!(
        log_of(&router.log).contains("upgrade failed; this process keeps serving"),
        "{}",
        log_of(&router.log)
    );
}

#[tokio::test]
async fn a_hand_over_version_the_new_process_does_not_speak_is_refused() {
    let backend = TestBackend::start("upgrade-version-eu").await;
    let builder = upgradable(&backend, "1s");
    let env = [("WSROUTER_TEST_HANDOVER_VERSION", "999")];
    let router = RouterProcess::start_with_env(&builder, "upgrade-version", &env).await;
    let (mut session, _) = try_connect(&router.url("kept"), &[])
        .await
        .expect("connect");
    read_welcome(&mut session).await;

    let (status, body) = http_post(router.admin, "/api/upgrade", None).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("hand-over version 999"), "{body}");
    assert_eq!(router.pid_in_file(), Some(router.pid()));
    echo(&mut session, "still here").await;
    full_session(&router.url("new"))
        .await
        .expect("a new session");
}

#[tokio::test]
async fn an_idle_session_and_one_in_the_middle_of_a_fragmented_message_go_over_intact() {
    let backend = TestBackend::start("upgrade-frag-eu").await;
    let mut router = RouterProcess::start(&upgradable(&backend, "30s"), "upgrade-frag").await;
    let (mut idle, _) = try_connect(&router.url("idle"), &[])
        .await
        .expect("connect");
    read_welcome(&mut idle).await;
    let (mut fragmented, _) = try_connect(&router.url("fragmented"), &[])
        .await
        .expect("connect");
    read_welcome(&mut fragmented).await;

    // A 150 kB text message in three fragments: two go before the upgrade
    // (the old process holds them, unforwarded), the last one after.
    let parts: Vec<String> = (0..3).map(|i| format!("{i}").repeat(50_000)).collect();
    let fragment = |i: usize, last: bool| {
        let opcode = if i == 0 { Data::Text } else { Data::Continue };
        Message::Frame(Frame::message(parts[i].clone(), OpCode::Data(opcode), last))
    };
    fragmented.send(fragment(0, false)).await.expect("send");
    fragmented.send(fragment(1, false)).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;

    router.upgrade().await;
    router.wait_for_exit().await;

    fragmented.send(fragment(2, true)).await.expect("send");
    let whole = parts.concat();
    match support::recv_data(&mut fragmented).await {
        Message::Text(text) => assert!(text.as_str() == whole, "the message came back changed"),
        other => panic!("expected the whole message back, got {other:?}"),
    }
    echo(&mut idle, "awake after the upgrade").await;
    echo(&mut fragmented, "and this one too").await;
    assert_eq!(backend.sessions(), 2, "a session was dialed again");
}

#[tokio::test]
async fn an_upgrade_in_the_middle_of_a_drain_goes_on_draining_and_closes_nothing() {
    let (a, b) = (
        TestBackend::start("drain-a").await,
        TestBackend::start("drain-b").await,
    );
    let builder = router()
        .backend(&a, "eu")
        .backend(&b, "eu")
        .extra("[upgrade]\nold_process_timeout = \"30s\"\n")
        .extra("[migration]\nmax_rate_per_backend = 4\n");
    let mut router = RouterProcess::start(&builder, "upgrade-drain").await;
    let mut on_a = Vec::new();
    for i in 0..40 {
        let (mut client, _) = try_connect(&router.url(&format!("drain-{i}")), &[])
            .await
            .expect("connect");
        if read_welcome(&mut client).await.backend == a.id {
            on_a.push(client);
        }
    }
    assert!(on_a.len() >= 5, "only {} sessions on drain-a", on_a.len());

    // The drain moves 4 sessions a second; the upgrade comes in the middle.
    let (status, body) = http_post(router.admin, "/api/backends/drain-a/drain", None).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    router.upgrade().await;
    router.wait_for_exit().await;

    // The new process goes on draining: every session of drain-a ends up
    // on drain-b, and none was closed.
    let (_, body) = support::http_get(router.admin, "/api/backends").await;
    let backends: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON");
    let drain_a = backends
        .iter()
        .find(|b| b["id"] == "drain-a")
        .expect("drain-a");
    assert_eq!(drain_a["state"], "draining", "{body}");
    for client in &mut on_a {
        while read_welcome(client).await.backend != b.id {}
        echo(client, "moved and upgraded").await;
    }
}

#[tokio::test]
async fn systemd_hears_the_new_main_pid_and_a_second_signal_to_the_old_process_is_refused() {
    let backend = TestBackend::start("upgrade-notify-eu").await;
    let socket_path = support::temp_file("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    notify.set_read_timeout(Some(WAIT)).expect("read timeout");
    let path = socket_path.display().to_string();
    let env = [("NOTIFY_SOCKET", path.as_str())];
    let router =
        RouterProcess::start_with_env(&upgradable(&backend, "1s"), "upgrade-notify", &env).await;
    let heard = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(heard(), format!("MAINPID={}\nREADY=1\n", router.pid()));

    // A connection still in its handshake keeps the old process alive
    // after the upgrade (until its handshake deadline)...
    let mut half_open = tokio::net::TcpStream::connect(router.public)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut half_open, b"GET /chat HTTP/1.1\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let old = router.pid();
    support::signal(old, "USR2");
    let new = router.new_holder(old).await;
    assert_eq!(heard(), format!("MAINPID={new}\nREADY=1\n"));
    // ...so a second signal reaches it: refused, not a second upgrade.
    support::signal(old, "USR2");
    eventually(
        "the refusal of the second signal in the log",
        WAIT,
        async || log_of(&router.log).contains("an upgrade is already under way"),
    )
    .await;
    full_session(&router.url("after")).await.expect("a session");
    assert_eq!(router.pid_in_file(), Some(new), "one upgrade, not two");
    let _ = std::fs::remove_file(&socket_path);
}

#[tokio::test]
async fn a_client_s_rate_limit_goes_over_with_its_session() {
    let backend = TestBackend::start("upgrade-budget-eu").await;
    let builder = upgradable(&backend, "30s")
        .extra("[limits]\nsession_message_rate = 1\nsession_message_burst = 10\n");
    let mut router = RouterProcess::start(&builder, "upgrade-budget").await;
    let (mut client, _) = try_connect(&router.url("budget"), &[])
        .await
        .expect("connect");
    read_welcome(&mut client).await;
    // The burst spent in the old process...
    for i in 0..10 {
        echo(&mut client, &format!("burst {i}")).await;
    }
    router.upgrade().await;
    router.wait_for_exit().await;
    // ...is not given back by the new one: eight more messages at once
    // exceed the rate (a fresh bucket would take ten; the spent one has
    // refilled one a second since).
    let mut closed = None;
    for i in 0..8 {
        client
            .send(Message::text(format!("after {i}")))
            .await
            .expect("send");
        match support::recv_data(&mut client).await {
            Message::Text(_) => {}
            Message::Close(frame) => {
                closed = frame.map(|f| u16::from(f.code));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        closed,
        Some(1008),
        "the rate limit did not hold across the upgrade"
    );
}

#[tokio::test]
async fn a_session_on_a_backend_the_new_configuration_removes_moves_then_goes_over() {
    let (a, b) = (
        TestBackend::start("removed-a").await,
        TestBackend::start("kept-b").await,
    );
    let builder = router()
        .backend(&a, "eu")
        .backend(&b, "eu")
        .extra("[upgrade]\nold_process_timeout = \"30s\"\n");
    let mut router = RouterProcess::start(&builder, "upgrade-removed").await;
    let mut on_a = None;
    for i in 0..20 {
        let (mut client, _) = try_connect(&router.url(&format!("removed-{i}")), &[])
            .await
            .expect("connect");
        if read_welcome(&mut client).await.backend == a.id {
            on_a = Some(client);
            break;
        }
    }
    let mut client = on_a.expect("a session on removed-a");

    // The new configuration has no removed-a.
    let config = std::fs::read_to_string(&router.config).expect("config");
    let block = format!(
        "[[backends]]\nid = \"removed-a\"\nurl = \"{}\"\nregion = \"eu\"\n",
        a.url()
    );
    assert!(config.contains(&block), "{config}");
    std::fs::write(&router.config, config.replace(&block, "")).expect("write config");
    router.upgrade().await;
    router.wait_for_exit().await;

    // The session moved to kept-b (a planned move, as for a removed
    // backend), then went over: no close, and it still echoes.
    assert_eq!(read_welcome(&mut client).await.backend, b.id);
    echo(&mut client, "on kept-b, in the new process").await;
    let received = support::metric(
        router.admin,
        "wsrouter_handover_sessions_total{result=\"received\"}",
    )
    .await;
    assert!(received >= 1.0, "received {received}");
}

#[tokio::test]
async fn a_backend_the_old_process_found_down_starts_down_in_the_new_one() {
    let (up, down) = (
        TestBackend::start("health-up").await,
        TestBackend::start("health-down").await,
    );
    let builder = router()
        .backend(&up, "eu")
        .backend(&down, "eu")
        .fast_health_checks()
        .rise_fall(2, 3)
        .extra("[upgrade]\nold_process_timeout = \"30s\"\n");
    let mut router = RouterProcess::start(&builder, "upgrade-health").await;
    down.set_health(503);
    let admin = router.admin;
    let state_of = async |id: &str| -> String {
        let (_, body) = support::http_get(admin, "/api/backends").await;
        let backends: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON");
        let backend = backends.iter().find(|b| b["id"] == id).expect("listed");
        backend["state"].as_str().expect("a state").to_string()
    };
    eventually(
        "the old process to find health-down down",
        WAIT,
        async || state_of("health-down").await == "unhealthy",
    )
    .await;

    router.upgrade().await;
    router.wait_for_exit().await;
    // Its first checks alone would take three failures (1.5 s) to say so.
    assert_eq!(state_of("health-down").await, "unhealthy");
    assert_eq!(state_of("health-up").await, "healthy");
}

#[tokio::test]
async fn an_upgrade_starts_what_the_path_the_router_was_started_by_names_now() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let backend = TestBackend::start("upgrade-path-eu").await;
    let dir = support::temp_file("release");
    std::fs::create_dir_all(&dir).expect("dir");
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_wsrouter"));
    // Deployed as a symbolic link to "version 1" (the binary itself)...
    let current = dir.join("wsrouter");
    symlink(binary, &current).expect("symlink");
    let mut router =
        RouterProcess::start_at(&current, &upgradable(&backend, "1s"), "upgrade-path", &[]).await;
    // ...then switched to "version 2": a wrapper that leaves a mark and
    // runs the binary.
    let marker = dir.join("version-2-ran");
    let version_2 = dir.join("wsrouter-2");
    let script = format!(
        "#!/bin/sh\ntouch {}\nexec {} \"$@\"\n",
        marker.display(),
        binary.display()
    );
    std::fs::write(&version_2, script).expect("write");
    std::fs::set_permissions(&version_2, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::remove_file(&current).expect("unlink");
    symlink(&version_2, &current).expect("switch the symlink");

    router.upgrade().await;
    router.wait_for_exit().await;
    assert!(
        marker.exists(),
        "the upgrade did not start what the path names now"
    );
    full_session(&router.url("after")).await.expect("a session");
    let _ = std::fs::remove_dir_all(&dir);
}
