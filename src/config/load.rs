//! The side effects of reading a configuration: opening the GeoIP database,
//! reading the admin token file, the certificates and keys of `[tls]` and
//! the CA roots of `[upstream_tls]`, and asking the system for the default
//! memory budget. Each failure is a problem naming its field and the file,
//! like validation's. Everything is loaded before the configuration is
//! accepted, so a reload that validates has loaded it all, and one that
//! does not changes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};

use super::GeoIpConfig;
use super::file::FileTls;
use super::tls::{self, CertificateFiles, TlsConfig};
use super::validate::{self, AdminToken, Problems, UpstreamRoots};
use crate::geo::GeoDb;

/// The admin token: inline, or the token file's text, trimmed. The file is
/// read relative to the config file's directory.
pub(super) fn admin_token(p: &mut Problems, token: AdminToken<'_>, base: &Path) -> Option<String> {
    match token {
        AdminToken::Unset => None,
        AdminToken::Inline(token) => Some(token.to_string()),
        AdminToken::File(path) => match std::fs::read_to_string(base.join(path)) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                p.add("admin.token_file", format!("cannot read {path:?}: {e}"));
                None
            }
        },
    }
}

/// Open and check the GeoIP database.
pub(super) fn geoip(p: &mut Problems, database: &str, base: &Path) -> Option<GeoIpConfig> {
    let path = resolve(base, database);
    match GeoDb::open(&path) {
        Ok(db) => Some(GeoIpConfig {
            database: path,
            db: Arc::new(db),
        }),
        Err(e) => {
            p.add("geoip.database", e.to_string());
            None
        }
    }
}

/// The default `limits.max_buffered_bytes`: half the memory the process
/// may use (its cgroup's limit, else the machine's).
pub(super) fn memory_budget() -> usize {
    crate::memory::default_budget()
}

/// `[tls]`: read every chain and key, check that each key matches its
/// certificate (and, with `validate`, the names), and build the server
/// config. Every problem names its field (`tls.certificates[1].key`) and
/// the file.
pub(super) fn tls(p: &mut Problems, file: &FileTls, base: &Path) -> Option<TlsConfig> {
    let before = p.count();
    let provider = tls::provider();
    let mut loaded = Vec::new();
    let mut seen = HashMap::new();
    for (i, c) in file.certificates.iter().enumerate() {
        let field = |name: &str| format!("tls.certificates[{i}].{name}");
        let cert_path = resolve(base, &c.cert);
        let key_path = resolve(base, &c.key);
        let chain = load_chain(&c.cert, &cert_path).map_err(|e| p.add(field("cert"), e));
        let key = load_key(&c.key, &key_path).map_err(|e| p.add(field("key"), e));
        let names = validate::certificate_names(p, i, c, &mut seen);
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
                Err(rustls::Error::InconsistentKeys(_)) => p.add(
                    field("key"),
                    format!("{:?} does not match the certificate in {:?}", c.key, c.cert),
                ),
                Err(e) => p.add(
                    field("key"),
                    format!(
                        "{:?} cannot be used with the certificate in {:?}: {e}",
                        c.key, c.cert
                    ),
                ),
            }
        }
    }
    if p.count() > before || loaded.is_empty() {
        return None;
    }
    tls::server_config(loaded)
        .map_err(|e| p.add("tls", format!("the TLS provider refused TLS 1.2/1.3: {e}")))
        .ok()
}

/// The rustls client for `wss://` backends and their health checks: the
/// CA file's certificates, or the platform's roots.
pub(super) fn upstream_tls(
    p: &mut Problems,
    roots: UpstreamRoots<'_>,
    base: &Path,
) -> Option<Arc<ClientConfig>> {
    upstream_client(roots, base)
        .map_err(|(field, problem)| p.add(field, problem))
        .ok()
}

fn upstream_client(
    roots: UpstreamRoots<'_>,
    base: &Path,
) -> Result<Arc<ClientConfig>, (&'static str, String)> {
    let mut store = RootCertStore::empty();
    match roots {
        UpstreamRoots::CaFile(ca_file) => {
            let path = resolve(base, ca_file);
            let certs = load_chain(ca_file, &path).map_err(|e| ("upstream_tls.ca_file", e))?;
            for cert in certs {
                store.add(cert).map_err(|e| {
                    (
                        "upstream_tls.ca_file",
                        format!(
                            "{ca_file:?} holds a certificate that cannot be a trust anchor: {e}"
                        ),
                    )
                })?;
            }
        }
        UpstreamRoots::Platform => {
            let native = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(native.certs);
            if store.is_empty() {
                let why = native
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err((
                    "upstream_tls.ca_file",
                    format!(
                        "wss:// backends need CA certificates, and none were found on this system{why}; set upstream_tls.ca_file"
                    ),
                ));
            }
        }
    }
    tls::client_config(store).map_err(|e| {
        (
            "upstream_tls",
            format!("the TLS provider refused TLS 1.2/1.3: {e}"),
        )
    })
}

/// Relative paths resolve against the config file's directory when the
/// file is there, else against the working directory.
fn resolve(base: &Path, path: &str) -> PathBuf {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::FileCertificate;

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
        let mut p = Problems::default();
        assert!(tls(&mut p, &file, &dir).is_none());
        let problems = p.finish().unwrap_err();
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
