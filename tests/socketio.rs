//! Socket.IO clients through the router, with the real `socket.io` server
//! and `socket.io-client` (4.8) in node processes: long-polling with
//! affinity, the upgrade to WebSocket on the same backend, and Socket.IO
//! semantics (acknowledgements, server emits, rooms) across it.

mod support;

use serde_json::json;
use support::socketio::{SioClient, SioServer};
use support::{RouterBuilder, router};

/// engine.io's ping interval for the test servers: a held long-poll is
/// answered within it.
const PING_INTERVAL_MS: u64 = 2_000;

/// Three Socket.IO servers in one region, so steering has a choice.
async fn three_servers() -> Vec<SioServer> {
    let mut servers = Vec::new();
    for id in ["sio-a", "sio-b", "sio-c"] {
        servers.push(SioServer::start(id, PING_INTERVAL_MS).await);
    }
    servers
}

/// The backend whose `welcome` the client gets next.
async fn welcomed_by(client: &mut SioClient) -> String {
    let welcome = client.wait_for("welcome").await;
    welcome["data"]["backend"]
        .as_str()
        .expect("a backend id")
        .to_string()
}

/// The backend that acknowledged the last of `replies`.
fn last_backend(replies: &[serde_json::Value]) -> String {
    let last = replies.last().expect("acknowledgements");
    last["backend"].as_str().expect("a backend id").to_string()
}

/// Take the server `id` out of `servers` (to kill it).
fn take(servers: &mut Vec<SioServer>, id: &str) -> SioServer {
    let at = servers
        .iter()
        .position(|s| s.id == id)
        .expect("a known server");
    servers.remove(at)
}

fn socketio_router(servers: &[SioServer]) -> RouterBuilder {
    servers
        .iter()
        .fold(router(), |builder, server| {
            builder.backend_entry(&server.id, &server.url(), "eu", None, None)
        })
        .extra("[socketio]\npaths = [\"/socket.io/\"]\n")
}

/// Connect, and check what every default-transport client must see: it
/// connects, is welcomed by one server, upgrades to WebSocket, and its
/// acknowledged emits, before and after the upgrade, are answered by that
/// same server. Returns that server's id.
async fn connects_and_upgrades_on_one_backend(client: &mut SioClient) -> String {
    let backend = welcomed_by(client).await;
    let reply = client.emit_acked("echo", json!("hello")).await;
    assert_eq!(reply, json!({"backend": backend, "data": "hello"}));
    // engine.io upgrades in the background, after the first exchange.
    client
        .seen_or_next("the upgrade to WebSocket", |e| {
            e["event"] == "upgrade" && e["transport"] == "websocket"
        })
        .await;
    let reply = client.emit_acked("echo", json!("upgraded")).await;
    assert_eq!(reply, json!({"backend": backend, "data": "upgraded"}));
    let connected = client
        .events
        .iter()
        .filter(|e| e["event"] == "connect")
        .count();
    assert_eq!(connected, 1, "{:?}", client.events);
    assert!(!client.saw_disconnect(), "{:?}", client.events);
    backend
}

#[tokio::test]
async fn a_default_transport_client_polls_then_upgrades_on_the_backend_its_key_steers_to() {
    let mut servers = three_servers().await;
    let router = socketio_router(&servers).start().await;
    let url = format!("http://{}", router.public);
    for key in ["alpha", "bravo", "charlie"] {
        let mut client = SioClient::connect(
            &url,
            json!({"query": {"session": key}, "auth": {"room": key}}),
        );
        let backend = connects_and_upgrades_on_one_backend(&mut client).await;
        // The server that welcomed it saw the connection begin on polling
        // (the handshake) and the key on it; no other server saw it.
        let server = servers
            .iter_mut()
            .find(|s| s.id == backend)
            .expect("a known server");
        let connection = server
            .wait_for("the connection", |e| {
                e["event"] == "connection" && e["session"] == key
            })
            .await;
        assert_eq!(connection["transport"], "polling", "{connection}");
        // A server emit to the room joined in the connection handler.
        let sent = support::http_get(
            format!("127.0.0.1:{}", server.port)
                .parse()
                .expect("address"),
            &format!("/broadcast?room={key}&text=news-for-{key}"),
        )
        .await;
        assert_eq!(sent.0, 200);
        let broadcast = client.wait_for("broadcast").await;
        assert_eq!(
            broadcast["data"],
            json!({"backend": backend, "text": format!("news-for-{key}")})
        );
    }
}

#[tokio::test]
async fn without_a_session_key_the_sid_keeps_polls_and_the_upgrade_on_one_backend() {
    let servers = three_servers().await;
    let router = socketio_router(&servers).start().await;
    let url = format!("http://{}", router.public);
    // Without a key, each request would be steered by a fresh random key:
    // only the sid the router learned from the handshake keeps them together
    // (else the second request reaches a server that answers "Session ID
    // unknown" and the client never connects).
    for _ in 0..4 {
        let mut client = SioClient::connect(&url, json!({}));
        connects_and_upgrades_on_one_backend(&mut client).await;
    }
}

/// Emit `count` numbered events 100 ms apart, calling `midway` after the
/// first `at`; returns their seqs.
async fn emit_paced(
    client: &mut SioClient,
    label: &str,
    count: usize,
    at: usize,
    midway: impl AsyncFnOnce(),
) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut midway = Some(midway);
    for i in 0..count {
        if i == at
            && let Some(midway) = midway.take()
        {
            midway().await;
        }
        seqs.push(client.emit("echo", json!(format!("{label}-{i}"))).await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    seqs
}

#[tokio::test]
async fn a_socketio_session_survives_a_crash_and_a_drain_without_a_disconnect() {
    let mut servers = three_servers().await;
    let router = socketio_router(&servers).start().await;
    let url = format!("http://{}", router.public);
    let mut client = SioClient::connect(
        &url,
        json!({"transports": ["websocket"], "query": {"session": "survivor"}, "auth": {"room": "lobby"}}),
    );
    let first = welcomed_by(&mut client).await;

    // Its backend is killed while it emits every 100 ms.
    let mut dead = take(&mut servers, &first);
    let seqs = emit_paced(&mut client, "crash", 10, 3, async || dead.kill().await).await;
    let replies = client.acks(&seqs).await;
    let second = last_backend(&replies);
    assert_ne!(second, first);
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply["data"], format!("crash-{i}"), "{replies:?}");
    }
    // The new server ran its connection handler for the session, and knew
    // where it came from.
    let server = servers.iter_mut().find(|s| s.id == second).expect("known");
    let connection = server
        .wait_for("the moved session's connection", |e| {
            e["event"] == "connection" && e["migratedFrom"] == first.as_str()
        })
        .await;
    assert_eq!(connection["auth"], json!({"room": "lobby"}), "{connection}");

    // Then that backend is drained.
    let drain = format!("/api/backends/{second}/drain");
    let r = &router;
    let seqs = emit_paced(&mut client, "drain", 10, 3, async || {
        assert_eq!(r.admin_post(&drain, None).await.0, 200);
    })
    .await;
    let replies = client.acks(&seqs).await;
    let third = last_backend(&replies);
    assert!(third != first && third != second, "{replies:?}");
    let server = servers.iter_mut().find(|s| s.id == third).expect("known");
    server
        .wait_for("the drained session's connection", |e| {
            e["event"] == "connection" && e["migratedFrom"] == second.as_str()
        })
        .await;
    // The room joined in that handler reaches the client.
    let news = "/broadcast?room=lobby&text=after-the-moves";
    let sent = support::http_get(
        format!("127.0.0.1:{}", server.port)
            .parse()
            .expect("address"),
        news,
    )
    .await;
    assert_eq!(sent.0, 200);
    let broadcast = client.wait_for("broadcast").await;
    assert_eq!(
        broadcast["data"],
        json!({"backend": third, "text": "after-the-moves"})
    );
    assert!(
        !client.saw_disconnect(),
        "the application saw a disconnect: {:?}",
        client.events
    );
    let connects = client
        .events
        .iter()
        .filter(|e| e["event"] == "connect")
        .count();
    assert_eq!(connects, 1, "{:?}", client.events);
}

#[tokio::test]
async fn a_namespace_joined_long_after_the_session_opened_survives_a_crash() {
    let mut servers = three_servers().await;
    let router = socketio_router(&servers).start().await;
    let url = format!("http://{}", router.public);
    let mut client = SioClient::connect(
        &url,
        json!({"transports": ["websocket"], "query": {"session": "late-joiner"}}),
    );
    let first = welcomed_by(&mut client).await;
    let reply = client.emit_acked("echo", json!("main")).await;
    assert_eq!(reply["backend"], first.as_str());
    // The second namespace's CONNECT goes by in the middle of the session,
    // over the WebSocket, with its own auth payload.
    client.join("/desk", json!({"room": "front"})).await;
    let seq = client.emit_on("/desk", "echo", json!("desk-0")).await;
    let reply = client.acks(&[seq]).await.remove(0);
    assert_eq!(
        reply,
        json!({"backend": first, "nsp": "/desk", "data": "desk-0"})
    );

    take(&mut servers, &first).kill().await;
    let mut seqs = Vec::new();
    for i in 1..=4 {
        seqs.push(
            client
                .emit_on("/desk", "echo", json!(format!("desk-{i}")))
                .await,
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let replies = client.acks(&seqs).await;
    let second = last_backend(&replies);
    assert_ne!(second, first);
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply["nsp"], "/desk", "{replies:?}");
        assert_eq!(reply["data"], format!("desk-{}", i + 1), "{replies:?}");
    }
    // The new server connected both namespaces, the second with its auth,
    // and the room joined there reaches the client.
    let server = servers.iter_mut().find(|s| s.id == second).expect("known");
    for nsp in ["/", "/desk"] {
        server
            .wait_for("the moved session's connections", |e| {
                e["event"] == "connection" && e["nsp"] == nsp && e["migratedFrom"] == first.as_str()
            })
            .await;
    }
    let desk = server
        .wait_for("the /desk connection", |e| {
            e["event"] == "connection" && e["nsp"] == "/desk"
        })
        .await;
    assert_eq!(desk["auth"], json!({"room": "front"}), "{desk}");
    let address = format!("127.0.0.1:{}", server.port)
        .parse()
        .expect("address");
    let news = "/broadcast?nsp=/desk&room=front&text=still-here";
    assert_eq!(support::http_get(address, news).await.0, 200);
    let broadcast = client.wait_for("broadcast").await;
    assert_eq!(
        broadcast,
        json!({"event": "broadcast", "nsp": "/desk", "data": {"backend": second, "nsp": "/desk", "text": "still-here"}})
    );
    assert!(!client.saw_disconnect(), "{:?}", client.events);
}

#[tokio::test]
async fn a_session_that_long_polled_first_survives_a_crash_with_its_auth() {
    let mut servers = three_servers().await;
    let router = socketio_router(&servers).start().await;
    let url = format!("http://{}", router.public);
    // Default transports: the namespace CONNECT (with its auth payload)
    // goes over long-polling, before the upgrade.
    let mut client = SioClient::connect(
        &url,
        json!({"query": {"session": "poller"}, "auth": {"room": "upstairs"}}),
    );
    let first = connects_and_upgrades_on_one_backend(&mut client).await;
    let mut dead = take(&mut servers, &first);
    let seqs = emit_paced(&mut client, "after-upgrade", 6, 2, async || {
        dead.kill().await
    })
    .await;
    let replies = client.acks(&seqs).await;
    let second = last_backend(&replies);
    assert_ne!(second, first);
    let server = servers.iter_mut().find(|s| s.id == second).expect("known");
    let connection = server
        .wait_for("the moved session's connection", |e| {
            e["event"] == "connection" && e["migratedFrom"] == first.as_str()
        })
        .await;
    assert_eq!(
        connection["auth"],
        json!({"room": "upstairs"}),
        "{connection}"
    );
    assert_eq!(connection["transport"], "websocket", "{connection}");
    assert!(!client.saw_disconnect(), "{:?}", client.events);
}

/// One long-polling request on a connection of its own: (status, body).
async fn poll(
    router: std::net::SocketAddr,
    method: &str,
    query: &str,
    body: &str,
) -> (u16, String) {
    let request = format!(
        "{method} /socket.io/?EIO=4&transport=polling{query} HTTP/1.1\r\nHost: chat.example\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = support::raw_exchange(router, request.as_bytes()).await;
    (answer.status.expect("an HTTP answer"), answer.body)
}

/// The `sid` of an engine.io OPEN packet body.
fn sid_of(open: &str) -> String {
    let json: serde_json::Value =
        serde_json::from_str(open.strip_prefix('0').expect("an OPEN packet")).expect("json");
    json["sid"].as_str().expect("a sid").to_string()
}

#[tokio::test]
async fn the_polling_requests_of_one_session_alternate_between_two_routers_and_reach_one_backend() {
    let servers = three_servers().await;
    let builder = socketio_router(&servers);
    let (a, b) = (builder.start().await, builder.start().await);
    let key = "&session=two-routers";
    let (status, open) = poll(a.public, "GET", key, "").await;
    assert_eq!(status, 200, "{open}");
    let sid = format!("{key}&sid={}", sid_of(&open));
    // Each request goes to the other router; neither saw the other's.
    assert_eq!(
        poll(b.public, "POST", &sid, "40").await,
        (200, "ok".to_string())
    );
    let (status, connected) = poll(a.public, "GET", &sid, "").await;
    assert_eq!(status, 200, "{connected}");
    let packets: Vec<&str> = connected.split('\u{1e}').collect();
    assert!(packets[0].starts_with("40{\"sid\":"), "{connected}");
    let welcome = packets
        .iter()
        .find(|p| p.starts_with("42[\"welcome\""))
        .map(|p| p.to_string());
    let welcome = match welcome {
        Some(welcome) => welcome,
        None => poll(b.public, "GET", &sid, "").await.1,
    };
    let backend = servers
        .iter()
        .find(|s| welcome.contains(&format!("\"backend\":\"{}\"", s.id)))
        .map(|s| s.id.clone())
        .unwrap_or_else(|| panic!("no server named in {welcome}"));
    assert_eq!(
        poll(b.public, "POST", &sid, r#"421["echo","across routers"]"#).await,
        (200, "ok".to_string())
    );
    let (status, ack) = poll(a.public, "GET", &sid, "").await;
    assert_eq!(status, 200);
    assert_eq!(
        ack,
        format!(r#"431[{{"backend":"{backend}","data":"across routers"}}]"#)
    );
}

#[tokio::test]
async fn a_polling_only_session_whose_backend_dies_reconnects_to_a_live_one() {
    let mut servers = three_servers().await;
    let router = socketio_router(&servers).start().await;
    let url = format!("http://{}", router.public);
    let mut client = SioClient::connect(
        &url,
        json!({"transports": ["polling"], "query": {"session": "poll-only"}}),
    );
    let first = welcomed_by(&mut client).await;
    take(&mut servers, &first).kill().await;
    // engine.io notices, and Socket.IO reconnects by itself.
    client.wait_for("disconnect").await;
    let second = welcomed_by(&mut client).await;
    assert_ne!(second, first);
    let reply = client.emit_acked("echo", json!("back")).await;
    assert_eq!(reply, json!({"backend": second, "data": "back"}));
}

#[tokio::test]
async fn a_connect_the_new_server_refuses_reaches_the_client_as_a_connect_error() {
    let mut servers = Vec::new();
    for id in ["strict-a", "strict-b"] {
        servers.push(SioServer::start_with(id, PING_INTERVAL_MS, &["--refuse-moved"]).await);
    }
    let router = socketio_router(&servers).start().await;
    let url = format!("http://{}", router.public);
    let mut client = SioClient::connect(
        &url,
        json!({"transports": ["websocket"], "query": {"session": "refused"}, "reconnection": false}),
    );
    let first = welcomed_by(&mut client).await;
    take(&mut servers, &first).kill().await;
    let error = client.wait_for("connect_error").await;
    assert_eq!(
        error["message"], "moved sessions are refused here",
        "{error}"
    );
    servers[0]
        .wait_for("the refusal", |e| {
            e["event"] == "refused" && e["migratedFrom"] == first.as_str()
        })
        .await;
}

#[tokio::test]
async fn bad_input_on_a_socketio_path_gets_a_clear_answer_and_disturbs_no_session() {
    let servers = three_servers().await;
    let router = socketio_router(&servers)
        .extra("max_body_bytes = 2048\n")
        .start()
        .await;
    let url = format!("http://{}", router.public);
    let mut bystander = SioClient::connect(&url, json!({"query": {"session": "bystander"}}));
    let backend = connects_and_upgrades_on_one_backend(&mut bystander).await;

    // A sid this router never saw, from a client without a key.
    let (status, body) = poll(router.public, "GET", "&sid=nobody-knows-me", "").await;
    assert_eq!(
        (status, body.as_str()),
        (400, r#"{"code":1,"message":"Session ID unknown"}"#)
    );
    // A body over socketio.max_body_bytes.
    let (status, _) = poll(router.public, "POST", "&session=big", &"4".repeat(4096)).await;
    assert_eq!(status, 413);
    // A chunked body.
    let chunked = "POST /socket.io/?EIO=4&transport=polling&session=c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n40\r\n0\r\n\r\n";
    let answer = support::raw_exchange(router.public, chunked.as_bytes()).await;
    assert_eq!(answer.status, Some(411));
    // An absolute-form target never names a destination.
    let absolute = "GET http://127.0.0.1:1/socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = support::raw_exchange(router.public, absolute.as_bytes()).await;
    assert_eq!(answer.status, Some(400), "{}", answer.body);
    // Garbage for a real session goes to its backend unchanged; engine.io
    // answers it (and ends that session), nobody else notices.
    let (status, open) = poll(router.public, "GET", "&session=garbage", "").await;
    assert_eq!(status, 200);
    let sid = format!("&session=garbage&sid={}", sid_of(&open));
    let (status, body) = poll(router.public, "POST", &sid, "\u{0}\u{1e}not engine.io").await;
    assert!(status == 400 || status == 200, "{status} {body}");

    let reply = bystander.emit_acked("echo", json!("still here")).await;
    assert_eq!(reply, json!({"backend": backend, "data": "still here"}));
    assert!(!bystander.saw_disconnect(), "{:?}", bystander.events);
}

#[tokio::test]
async fn binary_events_are_replayed_whole_across_a_crash() {
    let mut servers = three_servers().await;
    // An odd margin, and a watermark that keeps up with the emits: the
    // replay is the margin of messages the server had read, and begins
    // inside an event, with an attachment but not its placeholder packet.
    let router = socketio_router(&servers)
        .extra("[migration]\nreplay_max_messages = 7\nwatermark_interval = \"10ms\"\n")
        .start()
        .await;
    let url = format!("http://{}", router.public);
    let mut client = SioClient::connect(
        &url,
        json!({"transports": ["websocket"], "query": {"session": "binary"}}),
    );
    let first = welcomed_by(&mut client).await;
    let mut dead = take(&mut servers, &first);
    let mut seqs = Vec::new();
    for i in 0..12 {
        if i == 4 {
            dead.kill().await;
        }
        // A placeholder packet and its attachment, as two frames.
        seqs.push(client.emit_blob(&format!("blob-{i}"), 1000 + i).await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let replies = client.acks(&seqs).await;
    for (i, (reply, seq)) in replies.iter().zip(&seqs).enumerate() {
        assert_eq!(reply["label"], format!("blob-{i}"), "{replies:?}");
        assert_eq!(reply["bytes"], 1000 + i, "{replies:?}");
        assert_eq!(reply["fill"], seq % 256, "{replies:?}");
    }
    assert_ne!(replies.last().expect("acks")["backend"], first.as_str());
    assert!(!client.saw_disconnect(), "{:?}", client.events);
}

#[tokio::test]
async fn a_socketio_session_goes_to_a_new_router_process_at_an_upgrade_unnoticed() {
    let mut servers = three_servers().await;
    let builder = socketio_router(&servers).extra("[upgrade]\nold_process_timeout = \"30s\"\n");
    let mut router = support::RouterProcess::start(&builder, "socketio-upgrade").await;
    let url = format!("http://{}", router.public);
    let mut client = SioClient::connect(
        &url,
        json!({"query": {"session": "upgraded"}, "auth": {"room": "lobby"}}),
    );
    let backend = connects_and_upgrades_on_one_backend(&mut client).await;

    router.upgrade().await;
    router.wait_for_exit().await;

    // The same Socket.IO session, on the same backend connection.
    let reply = client.emit_acked("echo", json!("after the upgrade")).await;
    assert_eq!(
        reply,
        json!({"backend": backend, "data": "after the upgrade"})
    );
    assert!(!client.saw_disconnect(), "{:?}", client.events);
    let server = servers.iter_mut().find(|s| s.id == backend).expect("known");
    server
        .wait_for("the echo after the upgrade", |e| {
            e["event"] == "echo" && e["data"] == "after the upgrade"
        })
        .await;
    let connections: Vec<_> = server
        .events
        .iter()
        .filter(|e| e["event"] == "connection")
        .collect();
    assert_eq!(
        connections.len(),
        1,
        "the server saw the client connect again"
    );
}

#[tokio::test]
async fn a_long_polling_session_without_a_key_keeps_its_backend_across_an_upgrade() {
    let servers = three_servers().await;
    let builder = socketio_router(&servers).extra("[upgrade]\nold_process_timeout = \"30s\"\n");
    let mut router = support::RouterProcess::start(&builder, "socketio-upgrade-sid").await;
    let url = format!("http://{}", router.public);
    // No key: only the router's sid table keeps the polls on one backend.
    let mut client = SioClient::connect(&url, json!({"transports": ["polling"]}));
    let backend = welcomed_by(&mut client).await;
    let reply = client.emit_acked("echo", json!("before")).await;
    assert_eq!(reply["backend"], backend.as_str());

    router.upgrade().await;
    router.wait_for_exit().await;
    // The next polls reach the new process, which knows the sid.
    for i in 0..3 {
        let reply = client.emit_acked("echo", json!(format!("after-{i}"))).await;
        assert_eq!(reply["backend"], backend.as_str(), "{reply}");
    }
    assert!(!client.saw_disconnect(), "{:?}", client.events);
}
