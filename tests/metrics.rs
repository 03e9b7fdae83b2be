//! `/metrics` as Prometheus scrapes it: the text parses, and it counts the
//! sessions this test made. The recorder is process-wide, so this test uses
//! region and backend names no other test uses, and only asserts lower
//! bounds on the metrics every router shares.

mod support;

use std::collections::BTreeMap;

use futures_util::SinkExt;
use support::{TestBackend, WAIT, close, eventually, key, recv_data, router, trace_init};
use tokio_tungstenite::tungstenite::Message;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: the samples and the declared type of each family.
#[derive(Debug, Default)]
struct Exposition {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
    help: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of the one sample with this name and exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut found = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted);
        let sample = found.next()?;
        assert!(found.next().is_none(), "{name}{labels:?} appears twice");
        Some(sample.value)
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if text
            .chars()
            .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
        {
            text.parse().map_err(|e| format!("{text:?}: {e}"))
        }
        _ => Err(format!("{text:?} is not a Prometheus float")),
    }
}

/// `{a="x",b="y\"z"}` -> labels, and what follows the closing brace.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').ok_or("labels must start with '{'")?;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest
            .split_once("=\"")
            .ok_or("a label needs name=\"value\"")?;
        let name = name.trim();
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        rest = after[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parse Prometheus text format 0.0.4, failing on any line that is not a
/// well-formed HELP, TYPE, comment or sample.
fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            if !is_metric_name(name) {
                return Err(at("bad metric name in HELP".into()));
            }
            if out.help.insert(name.into(), help.into()).is_some() {
                return Err(at("second HELP for a family".into()));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE needs a type".into()))?;
            if !is_metric_name(name) {
                return Err(at("bad metric name in TYPE".into()));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind:?}")));
            }
            if out.samples.iter().any(|s| family_of(&s.name, kind) == name) {
                return Err(at("TYPE after the family's samples".into()));
            }
            if out.types.insert(name.into(), kind.into()).is_some() {
                return Err(at("second TYPE for a family".into()));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| at("a sample needs a value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(timestamp) = fields.next() {
            timestamp
                .parse::<i64>()
                .map_err(|e| at(format!("bad timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        out.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The family a sample belongs to, given the family's type.
fn family_of<'a>(sample: &'a str, kind: &str) -> &'a str {
    if kind == "histogram" || kind == "summary" {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                return base;
            }
        }
    }
    sample
}

#[test]
fn the_parser_rejects_what_prometheus_would() {
    assert!(parse("# TYPE a counter\na 1\n").is_ok());
    assert!(parse("a{x=\"1\",y=\"q\\\"\"} 2.5e3 1700000000000\n").is_ok());
    for bad in [
        "a\n",
        "a one\n",
        "a{x=1} 1\n",
        "a{x=\"1\" 1\n",
        "1a 1\n",
        "# TYPE a countr\n",
        "a 1\n# TYPE a counter\n",
        "a 1 2 3\n",
    ] {
        assert!(parse(bad).is_err(), "{bad:?} should not parse");
    }
}

async fn scrape(router: &support::RouterHandle) -> Exposition {
    let (status, body) = router.admin_get("/metrics").await;
    assert_eq!(status, 200);
    parse(&body).unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{body}"))
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_this_tests_sessions() {
    let _trace = trace_init();
    let backend = TestBackend::start("metrics-only-1").await;
    let router = router()
        .regions(&[
            ("metrics-only-eu", 50.11, 8.68),
            ("metrics-only-us", 38.9, -77.0),
        ])
        .default_region("metrics-only-eu")
        .backend(&backend, "metrics-only-eu")
        .start()
        .await;
    let backend_labels = [("backend", "metrics-only-1"), ("region", "metrics-only-eu")];
    let r = &router;

    // Before any session: the backend is up, checked once, and idle.
    eventually("the first health check is counted", WAIT, async || {
        scrape(r)
            .await
            .value(
                "wsrouter_health_checks_total",
                &[("backend", "metrics-only-1"), ("result", "success")],
            )
            .is_some_and(|v| v >= 1.0)
    })
    .await;
    let before = scrape(&router).await;
    assert_eq!(
        before.value("wsrouter_backend_up", &backend_labels),
        Some(1.0)
    );
    assert_eq!(
        before.value("wsrouter_sessions_active", &backend_labels),
        Some(0.0)
    );
    let ok_before = before
        .value("wsrouter_upgrades_total", &[("result", "ok")])
        .unwrap_or(0.0);
    let up_before = before
        .value(
            "wsrouter_messages_total",
            &[("direction", "client_to_backend")],
        )
        .unwrap_or(0.0);

    // Three sessions, each sending one message.
    let n = 3;
    let mut clients = Vec::new();
    for i in 0..n {
        let (mut client, welcome) = router.connect(&key("metrics", i), &[]).await;
        assert_eq!(welcome.backend, "metrics-only-1");
        client.send(Message::text("counted")).await.unwrap();
        assert_eq!(recv_data(&mut client).await, Message::text("counted"));
        clients.push(client);
    }
    let during = scrape(&router).await;
    assert_eq!(
        during.value("wsrouter_sessions_active", &backend_labels),
        Some(n as f64),
        "every open session is active"
    );
    assert_eq!(
        during.value("wsrouter_sessions_total", &[("region", "metrics-only-eu")]),
        Some(n as f64)
    );
    let ok = during
        .value("wsrouter_upgrades_total", &[("result", "ok")])
        .unwrap();
    assert!(
        ok >= ok_before + n as f64,
        "upgrades ok {ok_before} -> {ok}"
    );
    let up = during
        .value(
            "wsrouter_messages_total",
            &[("direction", "client_to_backend")],
        )
        .unwrap();
    assert!(
        up >= up_before + n as f64,
        "messages up {up_before} -> {up}"
    );
    assert!(
        during
            .value(
                "wsrouter_messages_total",
                &[("direction", "backend_to_client")]
            )
            .is_some_and(|v| v >= 2.0 * n as f64),
        "welcome and echo of each session are counted"
    );
    // The dial latency histogram has this backend's dials.
    assert!(
        during
            .value(
                "wsrouter_upstream_connect_seconds_count",
                &[("backend", "metrics-only-1")]
            )
            .is_some_and(|v| v >= n as f64),
        "connect latency recorded for every dial"
    );
    assert_eq!(
        during
            .types
            .get("wsrouter_upstream_connect_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert_eq!(
        during
            .types
            .get("wsrouter_sessions_total")
            .map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        during
            .types
            .get("wsrouter_sessions_active")
            .map(String::as_str),
        Some("gauge")
    );
    for family in during.types.keys() {
        assert!(
            family.starts_with("wsrouter_"),
            "unexpected family {family}"
        );
        assert!(during.help.contains_key(family), "{family} has no HELP");
    }
    // No client address or session key in any label.
    let keys: Vec<String> = (0..n).map(|i| key("metrics", i)).collect();
    for sample in &during.samples {
        for value in sample.labels.values() {
            assert!(
                !value.contains("127.0.0.1") && !keys.contains(value),
                "a client address or session key in a label: {sample:?}"
            );
        }
    }

    // Closed sessions leave the gauge; the total stays.
    for client in clients {
        close(client).await;
    }
    eventually("wsrouter_sessions_active is back to 0", WAIT, async || {
        scrape(r)
            .await
            .value("wsrouter_sessions_active", &backend_labels)
            == Some(0.0)
    })
    .await;
    let after = scrape(&router).await;
    assert_eq!(
        after.value("wsrouter_sessions_total", &[("region", "metrics-only-eu")]),
        Some(n as f64)
    );
}
