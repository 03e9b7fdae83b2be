//! engine.io long-polling through the router: each HTTP request on a
//! Socket.IO path (`GET` to receive, `POST` to send, `OPTIONS` for a CORS
//! preflight) is proxied as HTTP/1.1 to the backend the request's session
//! key steers to, or, without a key, to the backend that holds the request's
//! engine.io `sid`. Both hops keep their connections alive; a long-poll is
//! held up to `socketio.poll_timeout`; request bodies are bounded
//! (`socketio.max_body_bytes`, 413 past it). The backend's headers (CORS,
//! cookies) come back as they are; nothing in a request chooses where the
//! router connects.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::answer::{Answer, http_response};
use crate::backend::{Backend, Backends};
use crate::config::{Config, SessionKeySource};
use crate::handshake::{self, HandshakeError, Request, UpgradeRequest};
use crate::limits::Limits;
use crate::metrics::PollResult;
use crate::shutdown::{Phase, Shutdown};
use crate::socketio::{SidTable, open_packet_sid};

/// Request headers never passed on: hop-by-hop ones, the ones the router
/// writes itself, and the length (the router sends the body it read).
const DROPPED_REQUEST_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

/// Response headers never passed back: hop-by-hop ones and the length.
const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// What the polling proxy needs from the router.
pub(crate) struct Polling<'a> {
    pub config: &'a Config,
    pub backends: &'a Backends,
    pub limits: &'a Limits,
    pub sids: &'a SidTable,
    /// The client's address (after the PROXY header, if any).
    pub peer: SocketAddr,
    /// The client came over TLS.
    pub tls: bool,
    /// The router's phase: once it drains (a shutdown, or an upgrade whose
    /// new process accepts now), a kept-alive connection is closed when
    /// idle, or after the answer in flight (`Connection: close`).
    pub shutdown: Shutdown,
}

/// The backend connection this client connection uses, kept alive.
struct BackendConnection {
    backend: Arc<Backend>,
    sender: SendRequest<Full<Bytes>>,
}

/// One proxied answer for the client.
struct Reply {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Bytes,
}

impl Polling<'_> {
    /// Serve `first` and every request after it on this connection until the
    /// client closes it, asks to, or sends something that is not for
    /// engine.io.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        first: (String, UpgradeRequest),
    ) {
        let mut backend: Option<BackendConnection> = None;
        let mut next = Some(first);
        loop {
            let (method, mut request) = match next.take() {
                Some(request) => request,
                None => match self.read_next(stream).await {
                    Some(request) => request,
                    None => return,
                },
            };
            let keep_alive = !request
                .header_values("connection")
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
                && self.shutdown.phase() == Phase::Running;
            let reply = match self
                .proxy(stream, &method, &mut request, &mut backend)
                .await
            {
                Ok(reply) => reply,
                Err((result, answer)) => {
                    result.count();
                    answer.write_to(stream).await;
                    return;
                }
            };
            PollResult::Ok.count();
            if stream.write_all(&reply.to_bytes(keep_alive)).await.is_err() || !keep_alive {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }

    /// The next request on a kept-alive connection: `None` when the client
    /// closed it, went quiet for the poll timeout, or sent something that
    /// is not an engine.io request (answered, then closed).
    async fn read_next<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
    ) -> Option<(String, UpgradeRequest)> {
        let listener = &self.config.listener;
        let mut draining = self.shutdown.clone();
        let read = tokio::select! {
            read = tokio::time::timeout(
                self.config.socketio.poll_timeout,
                handshake::read_request(stream, listener.max_request_header_bytes),
            ) => read.ok()?,
            // An idle kept-alive connection closes; the client's next
            // request opens one (to the new process, after an upgrade).
            _ = draining.reached(Phase::Draining) => return None,
        };
        let classified = read.and_then(|(head, leftover)| {
            handshake::classify(head, leftover, &listener.paths, &self.config.socketio)
        });
        let error = match classified {
            Ok(Request::Http { method, request }) => return Some((method, request)),
            Ok(Request::Upgrade(_)) => HandshakeError::Malformed(
                "an upgrade must open its own connection, not follow a long-poll".into(),
            ),
            Err(HandshakeError::ClientGone) => return None,
            Err(error) => error,
        };
        PollResult::Rejected.count();
        Answer::bad_request(&error).write_to(stream).await;
        None
    }

    /// One request to its backend and the backend's answer back.
    async fn proxy<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        method: &str,
        request: &mut UpgradeRequest,
        backend: &mut Option<BackendConnection>,
    ) -> Result<Reply, (PollResult, Answer)> {
        let config = self.config;
        self.limits
            .check_origin(request.header("origin"))
            .map_err(|refused| (PollResult::Rejected, Answer::refused(refused)))?;
        let body = self.read_body(stream, request).await?;
        let client_ip = handshake::client_ip(self.peer.ip(), request, &config.trusted_proxies);
        let client_key = request
            .session_key(&config.session_key)
            .map_err(|e| (PollResult::Rejected, Answer::bad_request(&e)))?;
        let sid = request.query_param("sid");
        // The backend that holds the sid, when this router saw its
        // handshake; else the one the key steers to.
        let pinned = sid.as_deref().and_then(|sid| self.sids.backend_of(sid));
        let (key, made_key) = match &client_key {
            Some(key) => (key.clone(), false),
            None => (handshake::generate_session_key(), true),
        };
        let chosen = match (&pinned, &sid, made_key) {
            (Some(id), _, _) => self
                .backends
                .load()
                .get(id)
                .filter(|b| !b.is_removed())
                .cloned(),
            (None, Some(_), true) => {
                return Err((PollResult::UnknownSid, Answer::unknown_sid()));
            }
            _ => {
                let (location, _) = config.geoip.db.lookup(client_ip);
                self.backends
                    .load()
                    .rank(&location, &key, &[], 1, false)
                    .into_iter()
                    .next()
            }
        };
        let Some(chosen) = chosen else {
            return Err((
                PollResult::NoBackend,
                Answer::dial_failed(crate::upstream::dialer::DialFailure::NoBackend),
            ));
        };
        if method == "POST"
            && let Some(sid) = &sid
        {
            // What a move of the session, once upgraded, sends again.
            self.sids.note_connects(sid, &body);
        }
        let sender = self.backend_for(backend, &chosen).await?;
        let outgoing = self.outgoing(method, request, &chosen, client_ip, &key, body)?;
        let started = Instant::now();
        let exchange = async {
            let response = sender.send_request(outgoing).await?;
            let (parts, body) = response.into_parts();
            let limit = config.socketio.max_body_bytes.saturating_mul(2);
            let body = Limited::new(body, limit).collect().await;
            Ok::<_, hyper::Error>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(config.socketio.poll_timeout, exchange).await
        {
            Ok(Ok((parts, Ok(body)))) => (parts, body.to_bytes()),
            Ok(Ok((_, Err(_)))) | Ok(Err(_)) => {
                *backend = None;
                tracing::debug!(backend = %chosen.id, "long-polling request failed at the backend");
                return Err((
                    PollResult::BackendError,
                    Answer::dial_failed(crate::upstream::dialer::DialFailure::Failed),
                ));
            }
            Err(_) => {
                *backend = None;
                tracing::debug!(backend = %chosen.id, held = ?started.elapsed(), "long-poll held past the poll timeout");
                return Err((
                    PollResult::Timeout,
                    Answer::dial_failed(crate::upstream::dialer::DialFailure::Timeout),
                ));
            }
        };
        // A handshake: remember where its sid lives, for requests that
        // bring no key.
        if sid.is_none()
            && parts.status == hyper::StatusCode::OK
            && let Some(sid) = open_packet_sid(&body)
            && !self.sids.insert(&sid, &chosen.id)
            && made_key
        {
            tracing::warn!(
                "the engine.io session table is full; clients without a session key may land on the wrong backend"
            );
        }
        let mut headers: Vec<(String, Vec<u8>)> = parts
            .headers
            .iter()
            .filter(|(name, _)| !DROPPED_RESPONSE_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
            .collect();
        if made_key && let SessionKeySource::Cookie(name) = &config.session_key {
            // Later requests (and the upgrade) then steer by this key, on
            // every router instance.
            headers.push((
                "set-cookie".into(),
                format!("{name}={key}; Path=/; HttpOnly; SameSite=Lax").into_bytes(),
            ));
        }
        Ok(Reply {
            status: parts.status.as_u16(),
            headers,
            body,
        })
    }

    /// The request's body: `Content-Length` bytes, at most
    /// `socketio.max_body_bytes`, read within the handshake timeout.
    async fn read_body<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        request: &mut UpgradeRequest,
    ) -> Result<Bytes, (PollResult, Answer)> {
        if request.header("transfer-encoding").is_some() {
            return Err((PollResult::Rejected, Answer::length_required()));
        }
        let length = match request.header("content-length") {
            None => 0,
            Some(value) => value.trim().parse::<usize>().map_err(|_| {
                let error = HandshakeError::Malformed("invalid Content-Length".into());
                (PollResult::Rejected, Answer::bad_request(&error))
            })?,
        };
        let limit = self.config.socketio.max_body_bytes;
        if length > limit {
            return Err((PollResult::TooLarge, Answer::too_large(limit)));
        }
        let mut body = std::mem::take(&mut request.leftover);
        if body.len() > length {
            // Pipelining is not supported: what follows the body is dropped
            // with the connection after this answer.
            body.truncate(length);
        }
        let deadline = Instant::now() + self.config.listener.handshake_timeout;
        while body.len() < length {
            let mut chunk = vec![0u8; (length - body.len()).min(16 * 1024)];
            let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    let error = HandshakeError::ClientGone;
                    return Err((PollResult::Rejected, Answer::bad_request(&error)));
                }
                Ok(Ok(n)) => body.extend_from_slice(&chunk[..n]),
                Err(_) => {
                    let error = HandshakeError::Timeout;
                    return Err((PollResult::Rejected, Answer::bad_request(&error)));
                }
            }
        }
        Ok(Bytes::from(body))
    }

    /// A ready connection to `chosen`: the kept one if it goes there and is
    /// still open, else a new one (within the dial timeout).
    async fn backend_for<'c>(
        &self,
        kept: &'c mut Option<BackendConnection>,
        chosen: &Arc<Backend>,
    ) -> Result<&'c mut SendRequest<Full<Bytes>>, (PollResult, Answer)> {
        let reusable = kept.as_mut().is_some_and(|c| {
            Arc::ptr_eq(&c.backend, chosen) && !c.sender.is_closed() && c.sender.is_ready()
        });
        if !reusable {
            *kept = None;
            let config = self.config;
            let dial = async {
                let stream = crate::tls::connect_backend(&chosen.url, config.upstream_tls.as_ref())
                    .await
                    .map_err(|e| e.to_string())?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Ok::<_, String>(sender)
            };
            match tokio::time::timeout(config.steering.dial_timeout, dial).await {
                Ok(Ok(sender)) => {
                    *kept = Some(BackendConnection {
                        backend: Arc::clone(chosen),
                        sender,
                    });
                }
                Ok(Err(error)) => {
                    tracing::debug!(backend = %chosen.id, %error, "long-polling connect failed");
                    chosen.report_failure(&config.passive_health);
                    return Err((
                        PollResult::BackendError,
                        Answer::dial_failed(crate::upstream::dialer::DialFailure::Failed),
                    ));
                }
                Err(_) => {
                    chosen.report_failure(&config.passive_health);
                    return Err((
                        PollResult::Timeout,
                        Answer::dial_failed(crate::upstream::dialer::DialFailure::Timeout),
                    ));
                }
            }
        }
        Ok(&mut kept.as_mut().expect("set above").sender)
    }

    /// The request for the backend: the client's method, path and query
    /// under the backend's prefix, its end-to-end headers, and the router's
    /// forwarding headers.
    fn outgoing(
        &self,
        method: &str,
        request: &UpgradeRequest,
        backend: &Backend,
        client_ip: std::net::IpAddr,
        key: &str,
        body: Bytes,
    ) -> Result<hyper::Request<Full<Bytes>>, (PollResult, Answer)> {
        let uri = format!("{}{}", backend.url.prefix, request.target);
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, backend.url.authority());
        for (name, value) in &request.headers {
            if DROPPED_REQUEST_HEADERS.contains(&name.as_str()) || name.starts_with("x-wsrouter-") {
                continue;
            }
            builder = builder.header(name.as_str(), value.as_slice());
        }
        let client_ip = client_ip.to_string();
        builder = builder
            .header("x-forwarded-for", client_ip.as_str())
            .header("x-real-ip", client_ip.as_str())
            .header("x-forwarded-proto", if self.tls { "https" } else { "http" })
            .header("x-wsrouter-session", key)
            .header("x-wsrouter-region", backend.region_name.as_str());
        builder.body(Full::new(body)).map_err(|_| {
            let error = HandshakeError::Malformed("a header the router cannot forward".into());
            (PollResult::Rejected, Answer::bad_request(&error))
        })
    }
}

impl Reply {
    fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let reason = hyper::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown");
        let headers = self.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
        http_response(self.status, reason, headers, &self.body, keep_alive)
    }
}
