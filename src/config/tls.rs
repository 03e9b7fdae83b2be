//! The TLS configuration the running router uses (the `tls` module): the
//! validated `[tls]` section ([`TlsConfig`], [`CertificateFiles`]), the
//! SNI resolver that picks a certificate, and the builders of the rustls
//! server and client configs, all on one crypto provider. The file schema
//! is in `file`; reading certificates, keys and CA roots is in `load`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The only application protocol offered: the upgrade is HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The crypto provider for both hops: ring (no C build beyond ring's own).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The validated `[tls]` section: the files it came from and the server
/// config built from them (so a reload that validates has already loaded
/// every certificate, and one that does not changes nothing).
#[derive(Clone)]
pub struct TlsConfig {
    /// One entry per configured certificate, in file order; the first is
    /// the default for clients without SNI or with an unknown name.
    pub certificates: Vec<CertificateFiles>,
    /// Ready to hand to the `tls` module's `Terminator`.
    pub server_config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

/// Where one certificate came from, and the names it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Lower-case DNS names; `*.example.com` matches one label.
    pub server_names: Vec<String>,
}

/// The public listener's server config from the loaded certificates, in
/// file order (not empty: the first is the default): TLS 1.2 and 1.3, ALPN
/// http/1.1, the certificate picked by SNI.
pub(super) fn server_config(
    loaded: Vec<(CertificateFiles, Arc<CertifiedKey>)>,
) -> Result<TlsConfig, rustls::Error> {
    let certificates = loaded.iter().map(|(files, _)| files.clone()).collect();
    let resolver = SniResolver::new(loaded);
    let mut server_config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server_config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(TlsConfig {
        certificates,
        server_config: Arc::new(server_config),
    })
}

/// The rustls client for `wss://` backends and their health checks,
/// trusting `roots`: TLS 1.2 and 1.3, ALPN http/1.1.
pub(super) fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// Picks the certificate by the client's SNI: an exact name, then a
/// `*.` wildcard one label up, then the first certificate.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    fn new(loaded: Vec<(CertificateFiles, Arc<CertifiedKey>)>) -> SniResolver {
        let default = Arc::clone(&loaded[0].1);
        let mut by_name = HashMap::new();
        for (files, key) in loaded {
            for name in files.server_names {
                by_name.insert(name, Arc::clone(&key));
            }
        }
        SniResolver { default, by_name }
    }

    fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name.map(str::to_ascii_lowercase) else {
            return &self.default;
        };
        if let Some(key) = self.by_name.get(&name) {
            return key;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.by_name.get(&format!("*.{parent}")))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.pick(client_hello.server_name())))
    }
}
