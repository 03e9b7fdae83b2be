//! The admin listener, separate from the public one and on loopback by
//! default. Endpoints:
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when at least one backend is healthy, else 503 |
//! | `GET /api/backends` | JSON: id, region, url, state, sessions, weight, last check |
//! | `POST /api/backends/{id}/drain` | stop new sessions there and move its sessions away, paced |
//! | `POST /api/backends/{id}/undrain` | take new sessions again |
//! | `POST /api/reload` | re-read the config file (as SIGHUP does) |
//! | `GET /api/attack-mode` | `{"under_attack": bool}` |
//! | `GET /api/memory` | JSON: bytes held for clients and backends now and at most, the budget, the pressure state |
//! | `POST /api/attack-mode/on`, `/off` | switch "under attack" mode |
//! | `POST /api/upgrade` | start the successor process and hand it the listeners (JSON: result, pid or error) |
//!
//! Mutating (POST) calls need `Authorization: Bearer <admin.token>` when a
//! token is configured, and get 401 without it. The token is never logged.
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

use crate::backend::Backend;
use crate::memory::MemoryBudget;
use crate::operator::{Operator, ReloadError};
use crate::shutdown::{Phase, Shutdown};
use crate::upgrade::{UpgradeError, Upgrader};

/// What the admin endpoints read and act on.
#[derive(Clone)]
pub struct AdminState {
    pub operator: Operator,
    pub metrics: PrometheusHandle,
    pub memory: MemoryBudget,
    /// The router's phase: `/readyz` fails from `Draining`, and the admin
    /// listener closes at `Closing`.
    pub shutdown: Shutdown,
    /// Starts a successor (`POST /api/upgrade`); the admin listener closes
    /// once one took over.
    pub upgrader: Upgrader,
}

/// Accept admin connections until the router is closing.
pub async fn serve(listener: TcpListener, state: AdminState) {
    let mut stop = state.shutdown.clone();
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
            _ = stop.closing() => return,
            // The successor accepts on this socket now.
            _ = state.upgrader.handed_over() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    if req.method() == Method::POST && req.uri().path() == "/api/upgrade" {
                        return Ok::<_, Infallible>(upgrade(&state, &req).await);
                    }
                    Ok::<_, Infallible>(route(&state, req))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == Method::POST {
        return mutate(state, &req);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET, or POST for actions\n",
        );
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
            if state.shutdown.phase() >= Phase::Draining {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if state.operator.backends().load().any_healthy() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n")
            }
        }
        "/api/attack-mode" => json(
            StatusCode::OK,
            &serde_json::json!({ "under_attack": state.operator.limits().is_under_attack() }),
        ),
        "/api/memory" => json(
            StatusCode::OK,
            &serde_json::json!({
                "held_bytes": state.memory.held(),
                "peak_bytes": state.memory.peak(),
                "limit_bytes": state.memory.limit(),
                "pressure": state.memory.pressure().as_str(),
            }),
        ),
        "/api/backends" => {
            let set = state.operator.backends().load();
            let list: Vec<BackendJson> = set.backends.iter().map(|b| backend_json(b)).collect();
            json(StatusCode::OK, &list)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `POST /api/upgrade`: start the successor and hand it the listeners;
/// answers once it serves, or with why it does not.
async fn upgrade(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(refused) = authorize(state, req) {
        return refused;
    }
    match state.upgrader.upgrade().await {
        Ok(pid) => json(
            StatusCode::OK,
            &serde_json::json!({ "result": "ok", "pid": pid }),
        ),
        Err(error) => {
            let status = match error {
                UpgradeError::Busy => StatusCode::CONFLICT,
                UpgradeError::Unavailable => StatusCode::NOT_IMPLEMENTED,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            json(
                status,
                &serde_json::json!({ "result": error.as_label(), "error": error.to_string() }),
            )
        }
    }
}

/// POST endpoints, behind the bearer token when one is configured.
fn mutate(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(refused) = authorize(state, req) {
        return refused;
    }
    let path = req.uri().path();
    if path == "/api/reload" {
        return match state.operator.reload() {
            Ok(summary) => json(StatusCode::OK, &summary),
            Err(ReloadError::NoFile) => {
                text(StatusCode::CONFLICT, format!("{}\n", ReloadError::NoFile))
            }
            Err(ReloadError::Invalid(e)) => {
                tracing::error!("reload refused, the running configuration stays: {e}");
                let problems: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
                json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({ "error": "invalid configuration; nothing changed", "problems": problems }),
                )
            }
        };
    }
    if let Some(switch) = path.strip_prefix("/api/attack-mode/") {
        let on = match switch {
            "on" => true,
            "off" => false,
            _ => return text(StatusCode::NOT_FOUND, "use /api/attack-mode/on or /off\n"),
        };
        state.operator.limits().set_under_attack(on);
        return json(StatusCode::OK, &serde_json::json!({ "under_attack": on }));
    }
    let action = path
        .strip_prefix("/api/backends/")
        .and_then(|rest| rest.rsplit_once('/'));
    let backend = match action {
        Some((id, "drain")) => state.operator.drain(id),
        Some((id, "undrain")) => state.operator.undrain(id),
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    match backend {
        Some(b) => json(StatusCode::OK, &backend_json(&b)),
        None => text(StatusCode::NOT_FOUND, "no such backend\n"),
    }
}

/// Mutating calls: fine without a configured token, or with it.
#[allow(clippy::result_large_err)]
fn authorize(state: &AdminState, req: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    if let Some(token) = &state.operator.config().admin.token {
        let presented = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .unwrap_or("");
        if !same_secret(presented.trim().as_bytes(), token.as_bytes()) {
            let mut response = text(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required\n",
            );
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer realm=\"wsrouter\""),
            );
            return Err(response);
        }
    }
    Ok(())
}

/// Compare secrets without stopping at the first difference.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

fn backend_json(b: &Backend) -> BackendJson {
    BackendJson {
        id: b.id.clone(),
        region: b.region_name.clone(),
        url: b.url.raw.clone(),
        state: b.state().as_str(),
        sessions: b.sessions(),
        max_sessions: b.max_sessions(),
        weight: b.weight(),
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
    }
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
