//! Where sessions land: GeoIP placement, the client address behind trusted
//! proxies, the headers a backend is told, and session-key pinning.

mod support;

use std::collections::HashMap;

use support::{
    JAPAN, LONDON, MILTON_US, NOT_IN_DB, TestBackend, close, key, router, three_regions, trace_init,
};

#[tokio::test]
async fn clients_land_in_the_closest_region_and_the_backend_is_told_who_they_are() {
    let _trace = trace_init();
    let (eu, us, ap) = three_regions().await;
    let router = router()
        .default_region("us")
        .trust("127.0.0.0/8")
        .one_per_region(&eu, &us, &ap)
        .start()
        .await;

    // London, through a trusted proxy (the loopback peer).
    let (client, welcome) = router
        .connect("london-1", &[("X-Forwarded-For", LONDON)])
        .await;
    assert_eq!(
        welcome.backend, "eu-1",
        "a London client belongs in Frankfurt"
    );
    assert_eq!(
        welcome.path, "/chat?session=london-1",
        "path and query are forwarded"
    );
    assert_eq!(welcome.header("x-wsrouter-region"), Some("eu"));
    assert_eq!(welcome.header("x-wsrouter-client-country"), Some("GB"));
    assert_eq!(welcome.header("x-wsrouter-session"), Some("london-1"));
    assert_eq!(welcome.header("x-real-ip"), Some(LONDON));
    assert_eq!(welcome.header("x-forwarded-proto"), Some("http"));
    assert_eq!(welcome.header("x-forwarded-for"), Some(LONDON));
    close(client).await;

    // The United States and Japan (IPv6).
    let (client, welcome) = router
        .connect("us-1", &[("X-Forwarded-For", MILTON_US)])
        .await;
    assert_eq!(welcome.backend, "us-1");
    assert_eq!(welcome.header("x-wsrouter-region"), Some("us"));
    assert_eq!(welcome.header("x-wsrouter-client-country"), Some("US"));
    close(client).await;
    let (client, welcome) = router.connect("jp-1", &[("X-Forwarded-For", JAPAN)]).await;
    assert_eq!(
        welcome.backend, "ap-1",
        "a Japanese client belongs in Singapore"
    );
    assert_eq!(welcome.header("x-wsrouter-region"), Some("ap"));
    assert_eq!(welcome.header("x-wsrouter-client-country"), Some("JP"));
    assert_eq!(welcome.header("x-real-ip"), Some(JAPAN));
    close(client).await;

    // Nothing known about the client: the default region, and no country.
    let (client, welcome) = router.connect("local-1", &[]).await;
    assert_eq!(
        welcome.backend, "us-1",
        "a loopback client goes to the default region"
    );
    assert_eq!(welcome.header("x-wsrouter-client-country"), None);
    assert_eq!(welcome.header("x-real-ip"), Some("127.0.0.1"));
    close(client).await;
    let (client, welcome) = router
        .connect("unknown-1", &[("X-Forwarded-For", NOT_IN_DB)])
        .await;
    assert_eq!(
        welcome.backend, "us-1",
        "an address the database lacks goes to the default region"
    );
    assert_eq!(welcome.header("x-wsrouter-client-country"), None);
    close(client).await;
}

#[tokio::test]
async fn the_router_sets_its_own_headers_and_forwards_the_clients() {
    let _trace = trace_init();
    let (eu, us, ap) = three_regions().await;
    let router = router()
        .trust("127.0.0.0/8")
        .one_per_region(&eu, &us, &ap)
        .start()
        .await;
    let (client, welcome) = router
        .connect(
            "forwarded-1",
            &[
                ("X-Forwarded-For", LONDON),
                // A client cannot speak for the router.
                ("X-Wsrouter-Region", "mars"),
                ("X-Wsrouter-Session", "someone-else"),
                ("X-Wsrouter-Client-Country", "ZZ"),
                ("Origin", "https://chat.example"),
                ("Cookie", "visitor=42"),
                ("Authorization", "Bearer abc"),
                ("User-Agent", "wsrouter-test"),
                ("Accept-Language", "en-GB"),
            ],
        )
        .await;
    assert_eq!(welcome.backend, "eu-1");
    assert_eq!(welcome.header("x-wsrouter-region"), Some("eu"));
    assert_eq!(welcome.header("x-wsrouter-session"), Some("forwarded-1"));
    assert_eq!(welcome.header("x-wsrouter-client-country"), Some("GB"));
    assert_eq!(welcome.header("origin"), Some("https://chat.example"));
    assert_eq!(welcome.header("cookie"), Some("visitor=42"));
    assert_eq!(welcome.header("authorization"), Some("Bearer abc"));
    assert_eq!(welcome.header("user-agent"), Some("wsrouter-test"));
    assert_eq!(welcome.header("accept-language"), Some("en-GB"));
    assert_eq!(
        welcome.header("host"),
        Some(eu.addr.to_string().as_str()),
        "the backend is addressed by its own name"
    );
    close(client).await;
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let _trace = trace_init();
    let (eu, us, ap) = three_regions().await;
    // No trusted proxies: the loopback peer is the client.
    let router = router()
        .default_region("us")
        .one_per_region(&eu, &us, &ap)
        .start()
        .await;
    let (client, welcome) = router
        .connect(
            "spoof-1",
            &[
                ("X-Forwarded-For", LONDON),
                ("Forwarded", "for=81.2.69.142"),
            ],
        )
        .await;
    assert_eq!(
        welcome.backend, "us-1",
        "a claimed London address must not steer"
    );
    assert_eq!(welcome.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(welcome.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(welcome.header("x-wsrouter-client-country"), None);
    close(client).await;
}

#[tokio::test]
async fn a_session_key_lands_on_the_same_backend_through_any_router() {
    let _trace = trace_init();
    let backends = [
        TestBackend::start("eu-a").await,
        TestBackend::start("eu-b").await,
        TestBackend::start("eu-c").await,
    ];
    let mut config = router();
    for b in &backends {
        config = config.backend(b, "eu");
    }
    // Two independent instances of the same configuration.
    let first = config.start().await;
    let second = config.start().await;

    let mut used = HashMap::new();
    for i in 0..24 {
        let key = key("pinned", i);
        let (a, on_first) = first.connect(&key, &[]).await;
        let (b, on_second) = second.connect(&key, &[]).await;
        assert_eq!(
            on_first.backend, on_second.backend,
            "key {key} landed on different backends through two routers"
        );
        // A reconnect to the same instance resumes there too.
        let (c, again) = first.connect(&key, &[]).await;
        assert_eq!(
            on_first.backend, again.backend,
            "key {key} moved on reconnect"
        );
        *used.entry(on_first.backend).or_insert(0) += 1;
        close(a).await;
        close(b).await;
        close(c).await;
    }
    assert!(
        used.len() >= 2,
        "24 keys should not all hash to one of three backends: {used:?}"
    );
}

#[tokio::test]
async fn keys_spread_across_a_region_by_weight() {
    let _trace = trace_init();
    let light = TestBackend::start("eu-light").await;
    let heavy = TestBackend::start("eu-heavy").await;
    let router = router()
        .weighted(&light, "eu", 1)
        .weighted(&heavy, "eu", 3)
        .start()
        .await;

    let n = 400;
    let mut on_heavy = 0;
    for i in 0..n {
        let (client, welcome) = router.connect(&key("spread", i), &[]).await;
        match welcome.backend.as_str() {
            "eu-heavy" => on_heavy += 1,
            "eu-light" => {}
            other => panic!("unexpected backend {other}"),
        }
        close(client).await;
    }
    // Expected 0.75; the standard deviation for 400 keys is about 0.022, so
    // 0.65..0.85 is over four of them, while an unweighted hash (0.5) or one
    // that pins everything (0 or 1) is far outside.
    let share = on_heavy as f64 / n as f64;
    assert!(
        (0.65..=0.85).contains(&share),
        "weight 3 of 4 should take about 75% of the keys, took {:.1}%",
        share * 100.0
    );
    assert_eq!(heavy.sessions() + light.sessions(), n);
}

#[tokio::test]
async fn a_full_region_spills_to_the_next_closest() {
    let _trace = trace_init();
    let (eu, us, ap) = (
        TestBackend::start("eu-full").await,
        TestBackend::start("us-1").await,
        TestBackend::start("ap-1").await,
    );
    let router = router()
        .trust("127.0.0.0/8")
        .backend_entry("eu-full", &eu.url(), "eu", None, Some(1))
        .backend(&us, "us")
        .backend(&ap, "ap")
        .start()
        .await;
    let london = [("X-Forwarded-For", LONDON)];
    let (first, welcome) = router.connect("full-1", &london).await;
    assert_eq!(welcome.backend, "eu-full");
    let api = router.backends_api().await;
    let entry = api.iter().find(|b| b["id"] == "eu-full").unwrap();
    assert_eq!(
        (entry["sessions"].as_u64(), entry["max_sessions"].as_u64()),
        (Some(1), Some(1))
    );

    // eu is full: London's next closest region is us (not ap).
    let (second, welcome) = router.connect("full-2", &london).await;
    assert_eq!(welcome.backend, "us-1");
    assert_eq!(welcome.header("x-wsrouter-region"), Some("us"));

    // A slot frees when a session ends.
    close(first).await;
    let r = &router;
    support::eventually("eu-full has no session", support::WAIT, async || {
        r.backends_api()
            .await
            .iter()
            .any(|b| b["id"] == "eu-full" && b["sessions"] == 0)
    })
    .await;
    let (third, welcome) = router.connect("full-3", &london).await;
    assert_eq!(welcome.backend, "eu-full");
    close(second).await;
    close(third).await;
}

#[tokio::test]
async fn a_client_without_a_session_key_gets_a_fresh_one() {
    let _trace = trace_init();
    let backend = TestBackend::start("eu-1").await;
    let router = router().backend(&backend, "eu").start().await;
    let url = format!("ws://{}/chat", router.public);
    let mut keys = Vec::new();
    for _ in 0..2 {
        let (mut client, _) = support::try_connect(&url, &[]).await.expect("upgrade");
        let welcome = support::read_welcome(&mut client).await;
        let key = welcome
            .header("x-wsrouter-session")
            .expect("a session key")
            .to_string();
        assert!(
            key.len() >= 16 && key.bytes().all(|b| b.is_ascii_alphanumeric()),
            "generated key {key:?}"
        );
        keys.push(key);
        close(client).await;
    }
    assert_ne!(keys[0], keys[1], "two visitors without keys share one");
}

#[tokio::test]
async fn only_the_right_most_untrusted_forwarded_address_counts() {
    let _trace = trace_init();
    let (eu, us, ap) = three_regions().await;
    let router = router()
        .default_region("us")
        .trust("127.0.0.0/8")
        .trust("10.0.0.0/8")
        .one_per_region(&eu, &us, &ap)
        .start()
        .await;
    // The client wrote a Japanese address; London is what our proxies saw,
    // behind one more trusted hop.
    let chain = format!("{JAPAN}, {LONDON}, 10.1.2.3");
    let (client, welcome) = router
        .connect("chain-1", &[("X-Forwarded-For", chain.as_str())])
        .await;
    assert_eq!(welcome.backend, "eu-1");
    assert_eq!(welcome.header("x-forwarded-for"), Some(LONDON));
    assert_eq!(welcome.header("x-real-ip"), Some(LONDON));
    close(client).await;
    // Forwarded works when X-Forwarded-For is absent.
    let (client, welcome) = router
        .connect(
            "chain-2",
            &[("Forwarded", "for=\"[2001:218::1]:4711\";proto=https")],
        )
        .await;
    assert_eq!(welcome.backend, "ap-1");
    close(client).await;
}
