//! Configuration as an operator meets it: a bad file is refused with every
//! problem named by its field, and `wsrouter --check-config` says so and
//! exits non-zero; a good file passes.

mod support;

use std::process::Command;

use support::{RouterBuilder, manifest_dir, router, temp_file};

/// A valid configuration with one backend per region (nothing listens on
/// these ports; validation does not dial).
fn valid() -> RouterBuilder {
    router()
        .trust("10.0.0.0/8")
        .backend_entry("eu-1", "ws://127.0.0.1:9001", "eu", None, None)
        .backend_entry(
            "us-1",
            "ws://127.0.0.1:9002/chat-prefix",
            "us",
            Some(50),
            Some(100),
        )
        .backend_entry("ap-1", "ws://[::1]:9003", "ap", None, None)
}

/// The problems of a configuration that must be refused, as (field, problem).
fn problems(text: &str) -> Vec<(String, String)> {
    match wsrouter::Config::from_toml(text, manifest_dir(), std::path::Path::new("bad.toml")) {
        Ok(config) => panic!("this configuration should be refused:\n{text}\nparsed as {config:?}"),
        Err(e) => e
            .problems()
            .into_iter()
            .map(|p| (p.field, p.problem))
            .collect(),
    }
}

/// Assert that `field` is among the problems, and return its message.
fn problem_for(text: &str, field: &str) -> String {
    let problems = problems(text);
    problems
        .iter()
        .find(|(f, _)| f == field)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| panic!("no problem reported for {field}; got {problems:?}"))
}

#[test]
fn a_valid_configuration_parses() {
    let config = valid().config().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.regions.len(), 3);
    assert_eq!(config.backends.len(), 3);
    assert_eq!(config.region_index("us"), Some(1));
    assert_eq!(config.steering.default_region, 0);
    let us = &config.backends[1];
    assert_eq!(
        (us.id.as_str(), us.weight, us.max_sessions),
        ("us-1", 50, 100)
    );
    assert_eq!(us.url.prefix, "/chat-prefix");
    assert_eq!(config.backends[2].url.host, "::1");
    assert_eq!(config.listener.paths, vec!["/chat".to_string()]);
    assert_eq!(config.trusted_proxies.len(), 1);
}

#[test]
fn a_backend_in_an_unknown_region_is_refused() {
    let text = valid()
        .backend_entry("mars-1", "ws://127.0.0.1:9004", "mars", None, None)
        .toml();
    let problem = problem_for(&text, "backends[3].region");
    assert!(problem.contains("mars"), "{problem}");
    // It lists the regions that do exist.
    assert!(problem.contains("\"eu\""), "{problem}");
}

#[test]
fn duplicate_backend_ids_are_refused() {
    let text = valid()
        .backend_entry("eu-1", "ws://127.0.0.1:9005", "eu", None, None)
        .toml();
    let problem = problem_for(&text, "backends[3].id");
    assert!(
        problem.contains("duplicate") && problem.contains("eu-1"),
        "{problem}"
    );
}

#[test]
fn bad_backend_urls_are_refused() {
    for url in [
        "http://127.0.0.1:9001",
        "ws://127.0.0.1:0",
        "ws://127.0.0.1:9001/chat?x=1",
        "127.0.0.1:9001",
    ] {
        let text = valid()
            .backend_entry("bad-url", url, "eu", None, None)
            .toml();
        let problem = problem_for(&text, "backends[3].url");
        assert!(!problem.is_empty(), "{url}");
    }
}

#[test]
fn a_missing_or_unreadable_geoip_database_is_refused() {
    let problem = problem_for(
        &valid().geoip("geoip/no-such-file.mmdb").toml(),
        "geoip.database",
    );
    assert!(problem.contains("no-such-file.mmdb"), "{problem}");
    // A file that is not a MaxMind database.
    problem_for(&valid().geoip("Cargo.toml").toml(), "geoip.database");
    // No [geoip] section at all.
    let text = valid().toml().replace(
        "[geoip]\ndatabase = \"geoip/GeoLite2-City-Test.mmdb\"\n",
        "",
    );
    problem_for(&text, "geoip.database");
}

#[test]
fn a_zero_weight_is_refused() {
    let text = valid()
        .backend_entry("eu-2", "ws://127.0.0.1:9006", "eu", Some(0), None)
        .toml();
    let problem = problem_for(&text, "backends[3].weight");
    assert!(problem.contains("at least 1"), "{problem}");
}

#[test]
fn a_bad_duration_is_refused() {
    let mut builder = valid();
    builder.health_interval = "fast".into();
    let problem = problem_for(&builder.toml(), "health_check.interval");
    assert!(problem.contains("fast"), "{problem}");
    let problem = problem_for(
        &valid().handshake_timeout("0s").toml(),
        "listener.handshake_timeout",
    );
    assert!(problem.contains("greater than zero"), "{problem}");
}

#[test]
fn a_health_timeout_longer_than_the_interval_is_refused() {
    let mut builder = valid();
    builder.health_interval = "1s".into();
    builder.health_timeout = "2s".into();
    problem_for(&builder.toml(), "health_check.timeout");
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let text = valid().toml().replace("interval = ", "intervall = ");
    let found = problems(&text);
    assert!(
        found.iter().any(|(_, p)| p.contains("intervall")),
        "the misspelt key should be named: {found:?}"
    );
    let text = valid().toml().replace("[admin]", "[admn]");
    let found = problems(&text);
    assert!(found.iter().any(|(_, p)| p.contains("admn")), "{found:?}");
}

#[test]
fn an_unknown_default_region_is_refused() {
    let problem = problem_for(
        &valid().default_region("mars").toml(),
        "steering.default_region",
    );
    assert!(problem.contains("mars"), "{problem}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut builder = valid()
        .backend_entry("mars-1", "ws://127.0.0.1:9004", "mars", None, None)
        .backend_entry("eu-2", "ws://127.0.0.1:9006", "eu", Some(0), None);
    builder.health_interval = "fast".into();
    let fields: Vec<String> = problems(&builder.toml())
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    for field in [
        "backends[3].region",
        "backends[4].weight",
        "health_check.interval",
    ] {
        assert!(
            fields.iter().any(|f| f == field),
            "{field} missing from {fields:?}"
        );
    }
}

/// Write a config file whose GeoIP path is absolute, so it checks from any
/// directory.
fn write_config(name: &str, builder: &RouterBuilder) -> std::path::PathBuf {
    let geoip = manifest_dir().join(&builder.geoip);
    let text = builder
        .clone()
        .geoip(geoip.to_str().expect("UTF-8 path"))
        .toml();
    let path = temp_file(name);
    std::fs::write(&path, text).expect("write config file");
    path
}

#[test]
fn check_config_accepts_a_good_file() {
    let path = write_config("good.toml", &valid());
    let output = Command::new(env!("CARGO_BIN_EXE_wsrouter"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .expect("run wsrouter");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}: {stderr}",
        output.status.code()
    );
    assert!(stderr.contains("ok"), "{stderr}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn check_config_lists_every_problem_of_a_bad_file_and_fails() {
    let mut builder = valid()
        .backend_entry("mars-1", "ws://127.0.0.1:9004", "mars", None, None)
        .backend_entry("eu-1", "http://127.0.0.1:9007", "eu", Some(0), None);
    builder.health_interval = "fast".into();
    let path = write_config("bad.toml", &builder);
    let output = Command::new(env!("CARGO_BIN_EXE_wsrouter"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .expect("run wsrouter");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a bad file must fail the check: {stderr}"
    );
    assert_ne!(output.status.code(), Some(0));
    for field in [
        "backends[3].region",
        "backends[4].id",
        "backends[4].url",
        "backends[4].weight",
        "health_check.interval",
    ] {
        assert!(stderr.contains(field), "{field} missing from:\n{stderr}");
    }
    assert!(
        stderr.contains(path.to_str().unwrap()),
        "the file is named:\n{stderr}"
    );
    let _ = std::fs::remove_file(&path);

    // A file that does not exist.
    let output = Command::new(env!("CARGO_BIN_EXE_wsrouter"))
        .arg("--check-config")
        .arg(temp_file("missing.toml"))
        .output()
        .expect("run wsrouter");
    assert!(!output.status.success());
}

#[test]
fn session_threads_default_to_one_per_core_and_are_bounded() {
    let config = valid().config().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.session_threads, 0, "0 means one per CPU core");
    let set = valid()
        .extra("[runtime]\nsession_threads = 4\n")
        .config()
        .unwrap();
    assert_eq!(set.session_threads, 4);
    let text = valid().extra("[runtime]\nsession_threads = 5000\n").toml();
    assert!(problem_for(&text, "runtime.session_threads").contains("at most 1024"));
}

#[test]
fn the_memory_budget_has_a_floor_and_a_default_from_the_machine() {
    let text = valid()
        .extra("[limits]\nmax_buffered_bytes = 1000\n")
        .toml();
    let problem = problem_for(&text, "limits.max_buffered_bytes");
    assert!(problem.contains("16 MiB"), "{problem}");
    // Unset: half of what the process may use, which on any machine that
    // runs these tests is more than the floor.
    let config = valid().config().unwrap_or_else(|e| panic!("{e}"));
    assert!(config.limits.max_buffered_bytes >= 16 << 20);
    assert_eq!(config.migration.replay_max_bytes, 128 << 10);
}

#[test]
fn move_limits_must_allow_a_move() {
    let text = valid()
        .extra("[migration]\nmax_moves = 0\nmax_redeliveries = 0\nmoves_window = \"soon\"\n")
        .toml();
    assert!(problem_for(&text, "migration.max_moves").contains("at least 1"));
    assert!(problem_for(&text, "migration.max_redeliveries").contains("at least 1"));
    assert!(!problem_for(&text, "migration.moves_window").is_empty());
}

#[test]
fn socketio_paths_must_be_prefixes_apart_from_the_websocket_paths() {
    let text = valid()
        .extra("[socketio]\npaths = [\"socket.io\", \"/chat/\", \"/io/\", \"/io/\"]\nmax_body_bytes = 10")
        .toml();
    let problems = problems(&text);
    let problem = |field: &str| {
        problems
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no problem reported for {field}; got {problems:?}"))
    };
    assert!(problem("socketio.paths[0]").contains("starts and ends with \"/\""));
    assert!(problem("socketio.paths[1]").contains("listener.paths"));
    assert!(problem("socketio.paths[3]").contains("listed twice"));
    assert!(problem("socketio.max_body_bytes").contains("10"));
    assert!(!problems.iter().any(|(f, _)| f == "socketio.paths[2]"));
    let good = valid()
        .extra("[socketio]\npaths = [\"/socket.io/\"]")
        .config()
        .expect("valid");
    assert!(good.socketio.matches("/socket.io/"));
    assert!(good.socketio.matches("/socket.io"));
    assert!(!good.socketio.matches("/chat"));
}

#[test]
fn the_example_configurations_pass_check_config() {
    for example in ["router.toml", "demo.toml", "demo-socketio.toml"] {
        let path = manifest_dir().join("examples").join(example);
        let output = Command::new(env!("CARGO_BIN_EXE_wsrouter"))
            .arg("--check-config")
            .arg(&path)
            .output()
            .expect("run wsrouter");
        assert!(
            output.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
