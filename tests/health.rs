//! Active health checks as an operator and a visitor see them: the state in
//! `/api/backends`, `/readyz`, and where new sessions go.

mod support;

use support::{TestBackend, WAIT, close, eventually, key, router, trace_init, try_connect};
use tokio_tungstenite::tungstenite::Error as WsError;

#[tokio::test]
async fn an_unhealthy_backend_gets_no_new_sessions_until_it_recovers() {
    let _trace = trace_init();
    let a = TestBackend::start("eu-a").await;
    let b = TestBackend::start("eu-b").await;
    let router = router()
        .fast_health_checks()
        .backend(&a, "eu")
        .backend(&b, "eu")
        .start()
        .await;

    // Healthy at start, checked, ready.
    let r = &router;
    eventually("both backends have been checked", WAIT, async || {
        r.backends_api()
            .await
            .iter()
            .all(|b| b["last_check"]["ok"] == true)
    })
    .await;
    assert_eq!(router.backend_state("eu-a").await, "healthy");
    assert_eq!(router.backend_state("eu-b").await, "healthy");
    assert!(a.health_checks() > 0 && b.health_checks() > 0);
    assert_eq!(router.admin_get("/readyz").await.0, 200);

    // Find keys that hash to eu-a.
    let mut keys_on_a = Vec::new();
    for i in 0..20 {
        let key = key("health", i);
        let (client, welcome) = router.connect(&key, &[]).await;
        if welcome.backend == "eu-a" {
            keys_on_a.push(key);
        }
        close(client).await;
    }
    assert!(!keys_on_a.is_empty(), "some of 20 keys should hash to eu-a");

    // eu-a starts failing its checks: marked unhealthy, its keys go to eu-b,
    // and the router is still ready.
    a.set_health(503);
    eventually("eu-a is unhealthy in /api/backends", WAIT, async || {
        r.backend_state("eu-a").await == "unhealthy"
    })
    .await;
    let api = router.backends_api().await;
    let entry = api.iter().find(|b| b["id"] == "eu-a").unwrap();
    assert_eq!(entry["last_check"]["ok"], false, "{entry}");
    assert_eq!(router.backend_state("eu-b").await, "healthy");
    let sessions_on_a = a.sessions();
    for key in &keys_on_a {
        let (client, welcome) = router.connect(key, &[]).await;
        assert_eq!(
            welcome.backend, "eu-b",
            "key {key} went to an unhealthy backend"
        );
        close(client).await;
    }
    assert_eq!(
        a.sessions(),
        sessions_on_a,
        "eu-a accepted a session while unhealthy"
    );
    assert_eq!(
        router.admin_get("/readyz").await.0,
        200,
        "one healthy backend is enough"
    );

    // Both failing: not ready, and a visitor gets a plain 503.
    b.set_health(503);
    eventually("/readyz answers 503", WAIT, async || {
        r.admin_get("/readyz").await.0 == 503
    })
    .await;
    assert_eq!(router.backend_state("eu-b").await, "unhealthy");
    match try_connect(&router.url("nobody-home"), &[]).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            assert!(
                response.headers().contains_key("retry-after"),
                "{response:?}"
            );
        }
        Err(e) => panic!("expected 503 with no healthy backend, got {e}"),
        Ok(_) => panic!("a session was placed with no healthy backend"),
    }

    // eu-a recovers: ready again, and its keys come back to it.
    a.set_health(200);
    eventually("eu-a is healthy again", WAIT, async || {
        r.backend_state("eu-a").await == "healthy"
    })
    .await;
    assert_eq!(router.admin_get("/readyz").await.0, 200);
    for key in &keys_on_a {
        let (client, welcome) = router.connect(key, &[]).await;
        assert_eq!(
            welcome.backend, "eu-a",
            "key {key} did not return to its recovered backend"
        );
        close(client).await;
    }
}

#[tokio::test]
async fn a_backend_that_stops_listening_is_marked_unhealthy() {
    let _trace = trace_init();
    let a = TestBackend::start("eu-gone").await;
    let b = TestBackend::start("us-stays").await;
    let router = router()
        .fast_health_checks()
        .backend(&a, "eu")
        .backend(&b, "us")
        .start()
        .await;
    let (client, welcome) = router.connect("gone-1", &[]).await;
    assert_eq!(welcome.backend, "eu-gone");
    close(client).await;

    a.stop();
    let r = &router;
    eventually("eu-gone is unhealthy", WAIT, async || {
        r.backend_state("eu-gone").await == "unhealthy"
    })
    .await;
    // The default region has nothing healthy: spill to the next region.
    let (client, welcome) = router.connect("gone-2", &[]).await;
    assert_eq!(welcome.backend, "us-stays");
    close(client).await;
}
