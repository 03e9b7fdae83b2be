//! Configuration parsing and validation: any text gives a Config or a list
//! of problems, never a panic. Each problem names a field under a real
//! top-level section (or "(file)" for TOML errors) and says what is wrong;
//! the same text always gives the same answer; and a Config that is
//! accepted holds the invariants the rest of the router relies on
//! (indices in range, durations non-zero, at least one path, region and
//! backend).
//!
//! Relative paths resolve against the repository root, so seeds can name
//! geoip/GeoLite2-City-Test.mmdb and get past the database check.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wsrouter::Config;

const SECTIONS: &[&str] = &[
    "(file)",
    "listener",
    "admin",
    "client_address",
    "geoip",
    "session_key",
    "steering",
    "health_check",
    "relay",
    "migration",
    "passive_health",
    "shutdown",
    "tls",
    "upstream_tls",
    "limits",
    "regions",
    "backends",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let origin = Path::new("fuzz.toml");
    match Config::from_toml(text, &base, origin) {
        Err(e) => {
            let problems = e.problems();
            assert!(!problems.is_empty());
            for problem in &problems {
                let section = problem.field.split(['.', '[']).next().unwrap();
                assert!(
                    SECTIONS.contains(&section),
                    "field {:?} names no section",
                    problem.field
                );
                assert!(
                    !problem.problem.trim().is_empty(),
                    "{:?} has no message",
                    problem.field
                );
            }
            let again =
                Config::from_toml(text, &base, origin).expect_err("accepted the second time");
            assert_eq!(
                again.problems(),
                problems,
                "the same text gave other problems"
            );
        }
        Ok(config) => {
            let regions = config.regions.len();
            assert!(!config.listener.paths.is_empty());
            for path in &config.listener.paths {
                assert!(
                    path.starts_with('/') && !path.contains('?'),
                    "path {path:?}"
                );
            }
            assert!(!config.listener.handshake_timeout.is_zero());
            assert_ne!(config.admin.listen, config.listener.public);
            assert!(regions > 0 && !config.backends.is_empty());
            assert!(config.steering.default_region < regions);
            for list in config
                .steering
                .countries
                .values()
                .chain(config.steering.continents.values())
            {
                assert!(
                    !list.is_empty() && list.iter().all(|&r| r < regions),
                    "steering {list:?}"
                );
            }
            assert!((1..=16).contains(&config.steering.max_dial_attempts));
            let mut ids = std::collections::HashSet::new();
            for backend in &config.backends {
                assert!(backend.region < regions, "backend {:?}", backend.id);
                assert!(
                    ids.insert(backend.id.as_str()),
                    "duplicate backend {:?}",
                    backend.id
                );
                assert!(backend.url.port != 0 && !backend.url.host.is_empty());
            }
            let names: std::collections::HashSet<_> =
                config.regions.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names.len(), regions, "duplicate region names");
            for region in &config.regions {
                assert!(
                    (-90.0..=90.0).contains(&region.latitude)
                        && (-180.0..=180.0).contains(&region.longitude)
                );
            }
            let hc = &config.health_check;
            assert!(hc.path.starts_with('/') && (100..=599).contains(&hc.expected_status));
            assert!(!hc.interval.is_zero() && !hc.timeout.is_zero() && hc.timeout <= hc.interval);
            assert!(hc.rise >= 1 && hc.fall >= 1);
            assert!(
                !config.relay.ping_interval.is_zero()
                    && config.relay.idle_timeout > config.relay.ping_interval
            );
            assert!(config.relay.max_message_bytes >= 125);
            assert!(config.passive_health.max_failures >= 1);
            let again = Config::from_toml(text, &base, origin).expect("refused the second time");
            assert_eq!(format!("{again:?}"), format!("{config:?}"));
        }
    }
});
