//! GeoIP fallbacks: a Country database (no coordinates) still places
//! clients by their continent, and an explicit country mapping wins over
//! distance.

mod support;

use support::{
    COUNTRY_DB, JAPAN, LONDON, MILTON_US, NOT_IN_DB, close, router, three_regions, trace_init,
};

#[tokio::test]
async fn a_country_database_places_clients_by_continent() {
    let _trace = trace_init();
    let (eu, us, ap) = three_regions().await;
    let router = router()
        .geoip(COUNTRY_DB)
        .trust("127.0.0.0/8")
        .one_per_region(&eu, &us, &ap)
        .start()
        .await;
    // The default region is eu, so landing elsewhere proves the fallback.
    for (ip, backend, country) in [
        (JAPAN, "ap-1", "JP"),
        (MILTON_US, "us-1", "US"),
        (LONDON, "eu-1", "GB"),
    ] {
        let (client, welcome) = router
            .connect(&format!("country-{country}"), &[("X-Forwarded-For", ip)])
            .await;
        assert_eq!(welcome.backend, backend, "client at {ip} ({country})");
        assert_eq!(welcome.header("x-wsrouter-client-country"), Some(country));
        close(client).await;
    }
}

#[tokio::test]
async fn a_country_mapping_overrides_distance() {
    let _trace = trace_init();
    let (eu, us, ap) = three_regions().await;
    let router = router()
        .default_region("ap")
        .country("JP", &["us"])
        .country("gb", &["ap", "us"])
        .trust("127.0.0.0/8")
        .one_per_region(&eu, &us, &ap)
        .start()
        .await;
    // Tokyo is closest to Singapore, but the map says us.
    let (client, welcome) = router
        .connect("map-jp", &[("X-Forwarded-For", JAPAN)])
        .await;
    assert_eq!(welcome.backend, "us-1");
    assert_eq!(welcome.header("x-wsrouter-region"), Some("us"));
    close(client).await;
    // Lower-case codes in the file work too.
    let (client, welcome) = router
        .connect("map-gb", &[("X-Forwarded-For", LONDON)])
        .await;
    assert_eq!(welcome.backend, "ap-1");
    close(client).await;
    // Unmapped countries still go by distance, unknown ones to the default.
    let (client, welcome) = router
        .connect("map-us", &[("X-Forwarded-For", MILTON_US)])
        .await;
    assert_eq!(welcome.backend, "us-1");
    close(client).await;
    let (client, welcome) = router
        .connect("map-none", &[("X-Forwarded-For", NOT_IN_DB)])
        .await;
    assert_eq!(welcome.backend, "ap-1");
    close(client).await;
}

#[tokio::test]
async fn a_mapped_region_without_a_healthy_backend_spills_to_the_next_choice() {
    let _trace = trace_init();
    let (eu, us, _ap) = three_regions().await;
    // ap is mapped first for GB but has no backend at all.
    let router = router()
        .country("GB", &["ap", "us"])
        .trust("127.0.0.0/8")
        .backend(&eu, "eu")
        .backend(&us, "us")
        .start()
        .await;
    let (client, welcome) = router
        .connect("spill-gb", &[("X-Forwarded-For", LONDON)])
        .await;
    assert_eq!(
        welcome.backend, "us-1",
        "the mapping's next region comes before distance"
    );
    close(client).await;
}
