//! The per-session decision path: GeoIP lookup plus steering for one new
//! client, against baselines measured in the same run (the lookup alone,
//! and steering alone). Steering ranks what a new session tries: the first
//! `max_dial_attempts` (3 by default) candidates, as the router does. The
//! full ranking of every backend is measured too, for comparison. Target:
//! under 2 µs for lookup plus steering.
//!
//! ```text
//! cargo bench -p wsrouter-bench --bench decision
//! ```

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use wsrouter::geo::{GeoDb, Location};
use wsrouter::steer::{BackendView, Policy, id_hash};

/// Addresses the test database knows (London, Milton WA, Tokyo, Changchun)
/// and two it does not, cycled deterministically.
const CLIENTS: &[&str] = &[
    "81.2.69.142",
    "216.160.83.56",
    "2001:218::1",
    "175.16.199.1",
    "1.1.1.1",
    "89.160.20.112",
];

fn policy() -> Policy {
    Policy::new(
        vec![
            (50.11, 8.68),
            (38.9, -77.04),
            (1.35, 103.82),
            (35.68, 139.69),
            (-33.87, 151.21),
        ],
        0,
        HashMap::new(),
        HashMap::new(),
    )
}

/// `per_region` backends in each of the five regions.
fn backends(per_region: usize) -> Vec<BackendView> {
    (0..5)
        .flat_map(|region| {
            (0..per_region).map(move |i| BackendView {
                region,
                weight: 100,
                id_hash: id_hash(&format!("r{region}-b{i}")),
                available: true,
            })
        })
        .collect()
}

/// Candidates a new session tries (`steering.max_dial_attempts`, default).
const CANDIDATES: usize = 3;

fn decision(c: &mut Criterion) {
    let db = GeoDb::open(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../geoip/GeoLite2-City-Test.mmdb"),
    )
    .expect("the default GeoIP database");
    let clients: Vec<IpAddr> = CLIENTS.iter().map(|a| a.parse().unwrap()).collect();
    let keys: Vec<String> = (0..64).map(|i| format!("session-{i:08x}")).collect();
    let policy = policy();
    let small = backends(2);
    let large = backends(20);
    let london = db.lookup(clients[0]).0;

    let mut group = c.benchmark_group("decision");
    let mut n = 0usize;
    group.bench_function("baseline: geoip lookup", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(db.lookup(black_box(clients[n % clients.len()])))
        })
    });
    group.bench_function("baseline: steering, 10 backends", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(policy.rank_first(
                black_box(&london),
                &keys[n % keys.len()],
                &small,
                CANDIDATES,
            ))
        })
    });
    group.bench_function("lookup + steering, 10 backends", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let (location, _): (Location, _) = db.lookup(clients[n % clients.len()]);
            black_box(policy.rank_first(&location, &keys[n % keys.len()], &small, CANDIDATES))
        })
    });
    group.bench_function("lookup + steering, 100 backends", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let (location, _) = db.lookup(clients[n % clients.len()]);
            black_box(policy.rank_first(&location, &keys[n % keys.len()], &large, CANDIDATES))
        })
    });
    group.bench_function("lookup + full ranking, 100 backends", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let (location, _) = db.lookup(clients[n % clients.len()]);
            black_box(policy.rank(&location, &keys[n % keys.len()], &large))
        })
    });
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
