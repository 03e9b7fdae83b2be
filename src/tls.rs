//! TLS on both hops, running. Termination on the public listener: the
//! `rustls::ServerConfig` (built from `[tls]` at validation, see
//! [`crate::config::tls`]) in an [`ArcSwap`] that a reload swaps, and
//! [`ClientStream`], the client socket either plain or TLS. Origination to
//! `wss://` backends: [`connect_backend`], used by the dial and the health
//! checks, which checks the backend's certificate against the host in its
//! URL.//!
//! It leaves the accept loop to `app` and the handshake deadline and what
//! follows it to `session`: [`Terminator::accept`] is called inside the
//! per-connection task, never in the accept loop. Only TLS 1.2 and 1.3 are
//! offered (rustls implements nothing older) and ALPN is `http/1.1`, the
//! only protocol that carries a WebSocket upgrade here.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::BackendUrl;
pub use crate::config::tls::TlsConfig;
use crate::wire::peer::ReadHint;

// === running ===

/// Terminates TLS for the public listener; a cheap-clone handle. The server
/// config sits in an [`ArcSwap`]: a reload stores a new one, handshakes
/// already under way finish with the one they started with, and established
/// sessions are not touched (their keys are negotiated already).
#[derive(Clone)]
pub struct Terminator {
    config: Arc<ArcSwap<ServerConfig>>,
}

impl Terminator {
    pub fn new(tls: &TlsConfig) -> Terminator {
        Terminator {
            config: Arc::new(ArcSwap::new(Arc::clone(&tls.server_config))),
        }
    }

    /// Use these certificates for new connections from now on.
    pub fn store(&self, tls: &TlsConfig) {
        self.config.store(Arc::clone(&tls.server_config));
    }

    /// The TLS handshake on an accepted socket. The caller bounds it with
    /// the handshake deadline.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<ClientStream> {
        let acceptor = TlsAcceptor::from(self.config.load_full());
        let tls = acceptor.accept(stream).await?;
        Ok(ClientStream::Tls(Box::new(tls)))
    }
}

/// Connect to a backend: TCP, then TLS for `wss://` with the backend's
/// host as the name its certificate must carry. `tls` is the
/// `[upstream_tls]` client, present whenever a `wss://` backend is.
pub async fn connect_backend(
    url: &BackendUrl,
    tls: Option<&Arc<ClientConfig>>,
) -> io::Result<BackendStream> {
    let stream = TcpStream::connect((url.host.as_str(), url.port)).await?;
    let _ = stream.set_nodelay(true);
    if !url.tls {
        return Ok(BackendStream::Plain(stream));
    }
    let tls =
        tls.ok_or_else(|| io::Error::other("no TLS client configured for wss:// backends"))?;
    let name = ServerName::try_from(url.host.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let stream = TlsConnector::from(Arc::clone(tls))
        .connect(name, stream)
        .await?;
    Ok(BackendStream::Tls(Box::new(stream)))
}

/// The client's socket: plain TCP, or TLS terminated here.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// For X-Forwarded-Proto.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

/// A backend's socket: plain TCP for `ws://`, TLS for `wss://`.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// AsyncRead and AsyncWrite for a two-variant stream enum by delegation.
macro_rules! delegate_io {
    ($ty:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
                }
            }
        }

        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::Plain(s) => s.is_write_vectored(),
                    $ty::Tls(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_io!(ClientStream);
delegate_io!(BackendStream);

/// A plain socket can tell cheaply when it has nothing to read; a TLS one
/// may hold decrypted bytes, so it always might.
macro_rules! read_hint {
    ($ty:ident) => {
        impl ReadHint for $ty {
            fn may_have_data(&self) -> bool {
                match self {
                    $ty::Plain(s) => tcp_may_have_data(s),
                    $ty::Tls(_) => true,
                }
            }
        }
    };
}

read_hint!(ClientStream);
read_hint!(BackendStream);

/// Whether tokio has seen the socket become readable since it last found
/// it empty. A look at its readiness: no system call, no waker.
fn tcp_may_have_data(stream: &TcpStream) -> bool {
    stream.try_io(Interest::READABLE, || Ok(())).is_ok()
}
