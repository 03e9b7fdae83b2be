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

fn socketio_router(servers: &[SioServer]) -> RouterBuilder {
    servers
        .iter()
        .fold(router(), |builder, server| {
            builder.backend_entry(&server.id, &server.url(), "eu", None, None)
        })
        .extra("[socketio]\npaths = [\"/socket.io/\"]\n")
}

/// Connect, and check what every default-transport client must see: it
/// connects, upgrades to WebSocket, is welcomed by one server, and its
/// acknowledged emit is answered by that same server. Returns that
/// server's id.
async fn connects_and_upgrades_on_one_backend(client: &mut SioClient) -> String {
    let welcome = client.wait_for("welcome").await;
    let backend = welcome["data"]["backend"]
        .as_str()
        .expect("a backend id")
        .to_string();
    let reply = client.emit_acked("echo", json!("hello")).await;
    assert_eq!(reply, json!({"backend": backend, "data": "hello"}));
    let upgraded = client
        .events
        .iter()
        .any(|e| e["event"] == "upgrade" && e["transport"] == "websocket");
    assert!(
        upgraded,
        "the client never upgraded to WebSocket: {:?}",
        client.events
    );
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
