//! The admin listener, separate from the public one and on loopback by
//! default. Endpoints:
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when at least one backend is healthy, else 503 |
//! | `GET /api/backends` | JSON: id, region, url, state, sessions, weight, last check |
//!
//! Served with hyper (HTTP/1.1), one task per connection.

use std::convert::Infallible;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::Backends;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub backends: Backends,
    pub metrics: PrometheusHandle,
}

/// Accept admin connections until `stop` becomes true.
pub async fn serve(listener: TcpListener, state: AdminState, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::app::stopped(&mut stop) => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics.render());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.backends.load().any_healthy() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n")
            }
        }
        "/api/backends" => json(StatusCode::OK, &backends_json(&state.backends)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[derive(Serialize)]
struct BackendJson {
    id: String,
    region: String,
    url: String,
    state: &'static str,
    sessions: u32,
    max_sessions: u32,
    weight: u32,
    last_check: Option<LastCheckJson>,
}

#[derive(Serialize)]
struct LastCheckJson {
    /// Seconds since the Unix epoch.
    at: f64,
    /// RFC 3339, for people.
    time: String,
    ok: bool,
    detail: String,
}

fn backends_json(backends: &Backends) -> Vec<BackendJson> {
    backends
        .load()
        .backends
        .iter()
        .map(|b| BackendJson {
            id: b.id.clone(),
            region: b.region_name.clone(),
            url: b.url.raw.clone(),
            state: b.state().as_str(),
            sessions: b.sessions(),
            max_sessions: b.max_sessions,
            weight: b.weight,
            last_check: b.last_check().map(|c| LastCheckJson {
                at: c
                    .at
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
                time: humantime::format_rfc3339_millis(c.at).to_string(),
                ok: c.ok,
                detail: c.detail,
            }),
        })
        .collect()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).expect("admin JSON serializes");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
