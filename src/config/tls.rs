//! The `[tls]` and `[upstream_tls]` sections: what the file says, and its
//! validation into the certificates and rustls configs the running router
//! uses (the `tls` module). Every certificate and key is read and checked
//! here, at validation time, so a reload that validates has loaded them
//! all, and one that does not changes nothing. Problems name their field
//! and file.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;

use crate::config::ConfigProblem;

/// The only application protocol offered: the upgrade is HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The crypto provider for both hops: ring (no C build beyond ring's own).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === file structs: what the TOML looks like ===

/// `[tls]`: present means the public listener speaks TLS only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileTls {
    #[serde(default)]
    certificates: Vec<FileCertificate>,
}

/// `[[tls.certificates]]` (or an inline table in `certificates = [...]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCertificate {
    cert: String,
    key: String,
    #[serde(default)]
    server_names: Vec<String>,
}

/// `[upstream_tls]`: how `wss://` backends are verified.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileUpstreamTls {
    /// PEM CA certificates to trust instead of the platform's roots.
    ca_file: Option<String>,
}

// === validated ===

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

/// Validate `[tls]`: read every chain and key, check that each key matches
/// its certificate, check the names, and build the server config. Every
/// problem names its field (`tls.certificates[1].key`) and the file.
pub(crate) fn validate(file: &FileTls, base: &Path) -> Result<TlsConfig, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    let mut add = |field: String, problem: String| problems.push(ConfigProblem { field, problem });
    if file.certificates.is_empty() {
        add(
            "tls.certificates".into(),
            "must list at least one { cert = \"chain.pem\", key = \"key.pem\" } (leave [tls] out for a plain listener)".into(),
        );
    }
    let provider = provider();
    let mut loaded = Vec::new();
    let mut seen = HashMap::new();
    for (i, c) in file.certificates.iter().enumerate() {
        let field = |name: &str| format!("tls.certificates[{i}].{name}");
        let cert_path = resolve(base, &c.cert);
        let key_path = resolve(base, &c.key);
        let chain = load_chain(&c.cert, &cert_path).map_err(|e| add(field("cert"), e));
        let key = load_key(&c.key, &key_path).map_err(|e| add(field("key"), e));
        let mut names = Vec::new();
        for (j, name) in c.server_names.iter().enumerate() {
            let name = name.trim().to_ascii_lowercase();
            let bare = name.strip_prefix("*.").unwrap_or(&name);
            if DnsName::try_from(bare).is_err() || bare.contains('*') {
                add(
                    format!("tls.certificates[{i}].server_names[{j}]"),
                    format!(
                        "{name:?} is not a DNS name (\"chat.example.com\" or \"*.example.com\")"
                    ),
                );
            } else if let Some(other) = seen.insert(name.clone(), i) {
                add(
                    format!("tls.certificates[{i}].server_names[{j}]"),
                    format!("{name:?} is already served by tls.certificates[{other}]"),
                );
            }
            names.push(name);
        }
        if i > 0 && c.server_names.is_empty() {
            add(
                field("server_names"),
                "must list the names this certificate serves (only the first certificate is used without a matching name)".into(),
            );
        }
        if let (Ok(chain), Ok(key)) = (chain, key) {
            match CertifiedKey::from_der(chain, key, &provider) {
                Ok(certified) => loaded.push((
                    CertificateFiles {
                        cert: cert_path,
                        key: key_path,
                        server_names: names,
                    },
                    Arc::new(certified),
                )),
                Err(rustls::Error::InconsistentKeys(_)) => add(
                    field("key"),
                    format!("{:?} does not match the certificate in {:?}", c.key, c.cert),
                ),
                Err(e) => add(
                    field("key"),
                    format!(
                        "{:?} cannot be used with the certificate in {:?}: {e}",
                        c.key, c.cert
                    ),
                ),
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let certificates = loaded.iter().map(|(files, _)| files.clone()).collect();
    let resolver = SniResolver::new(loaded);
    let mut server_config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| {
            vec![ConfigProblem {
                field: "tls".into(),
                problem: format!("the TLS provider refused TLS 1.2/1.3: {e}"),
            }]
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server_config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(TlsConfig {
        certificates,
        server_config: Arc::new(server_config),
    })
}

/// The rustls client for `wss://` backends and their health checks: the
/// CA file's certificates when `[upstream_tls] ca_file` is set, else the
/// platform's roots; TLS 1.2 and 1.3, ALPN http/1.1.
pub(crate) fn upstream_client_config(
    file: Option<&FileUpstreamTls>,
    base: &Path,
) -> Result<Arc<ClientConfig>, Vec<ConfigProblem>> {
    let problem = |field: &str, problem: String| {
        vec![ConfigProblem {
            field: field.into(),
            problem,
        }]
    };
    let mut roots = RootCertStore::empty();
    match file.and_then(|f| f.ca_file.as_ref()) {
        Some(ca_file) => {
            let path = resolve(base, ca_file);
            let certs =
                load_chain(ca_file, &path).map_err(|e| problem("upstream_tls.ca_file", e))?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    problem(
                        "upstream_tls.ca_file",
                        format!(
                            "{ca_file:?} holds a certificate that cannot be a trust anchor: {e}"
                        ),
                    )
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                let why = native
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(problem(
                    "upstream_tls.ca_file",
                    format!(
                        "wss:// backends need CA certificates, and none were found on this system{why}; set upstream_tls.ca_file"
                    ),
                ));
            }
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| {
            problem(
                "upstream_tls",
                format!("the TLS provider refused TLS 1.2/1.3: {e}"),
            )
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// Relative paths resolve against the config file's directory when the
/// file is there, else against the working directory (as the GeoIP path).
pub(crate) fn resolve(base: &Path, path: &str) -> PathBuf {
    let path = PathBuf::from(path);
    if path.is_relative() && base.join(&path).exists() {
        base.join(path)
    } else {
        path
    }
}

fn read(shown: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {shown:?} ({}): {e}", path.display()))
}

/// The certificate chain, leaf first.
fn load_chain(shown: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(shown, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown:?} is not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "{shown:?} holds no certificate (expected \"-----BEGIN CERTIFICATE-----\" blocks, leaf first)"
        ));
    }
    Ok(chain)
}

/// The first private key in the file (PKCS#8, PKCS#1 or SEC1).
fn load_key(shown: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(shown, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("{shown:?} is not a private key (expected a PKCS#8, PKCS#1 or SEC1 PEM block)")
        }
        e => format!("{shown:?} is not a private key: {e}"),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_non_pem_files_name_the_field_and_file() {
        let dir = std::env::temp_dir().join(format!("wsrouter-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk.pem"), "not pem at all\n").unwrap();
        let file = FileTls {
            certificates: vec![FileCertificate {
                cert: "missing.pem".into(),
                key: "junk.pem".into(),
                server_names: vec!["bad name".into()],
            }],
        };
        let problems = validate(&file, &dir).unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("tls.certificates[0].cert: cannot read \"missing.pem\"")),
            "{text:?}"
        );
        assert!(
            text.iter().any(
                |t| t.starts_with("tls.certificates[0].key: \"junk.pem\" is not a private key")
            ),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("tls.certificates[0].server_names[0]:")),
            "{text:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
