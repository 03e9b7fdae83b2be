//! TLS on the public listener: wss:// clients chat through the router, what
//! is not TLS 1.2 or 1.3 is refused and counted, SNI picks the certificate,
//! a reload swaps the certificate while established sessions keep relaying,
//! and bad certificate or key files are configuration errors naming the
//! field and the file.
//!
//! Certificates are made here with rcgen: a test CA and leaves signed by
//! it, written to temp files. Clients are tokio-rustls connectors trusting
//! only that CA, with tokio-tungstenite's `client_async` on top.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use support::{
    RouterBuilder, RouterHandle, TestBackend, Welcome, manifest_dir, router, temp_file, trace_init,
    within,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

// === certificates ===

/// A test certificate authority; leaves it signs are trusted by
/// [`Pki::roots`].
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and key, written to PEM files.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsrouter test CA");
        let key = KeyPair::generate().expect("CA key");
        Pki {
            ca: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// A leaf for `names` (DNS names or IP addresses), in fresh files.
    fn leaf(&self, names: &[&str]) -> Leaf {
        let leaf = Leaf {
            cert: temp_file("chain.pem"),
            key: temp_file("key.pem"),
            der: CertificateDer::from(Vec::new()),
        };
        self.write_leaf(names, leaf)
    }

    /// A new leaf for `names` written over `leaf`'s files (a renewal).
    fn write_leaf(&self, names: &[&str], leaf: Leaf) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let key = KeyPair::generate().expect("leaf key");
        let cert = CertificateParams::new(names)
            .expect("leaf params")
            .signed_by(&key, &self.ca)
            .expect("sign the leaf");
        std::fs::write(&leaf.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write the key");
        Leaf {
            der: cert.der().clone(),
            ..leaf
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("add the CA");
        Arc::new(roots)
    }
}

/// `[tls]` with the given `(leaf, server_names)` entries.
fn tls_section(certs: &[(&Leaf, &[&str])]) -> String {
    let entries: Vec<String> = certs
        .iter()
        .map(|(leaf, names)| {
            format!(
                "{{ cert = {:?}, key = {:?}, server_names = {:?} }}",
                leaf.cert.display().to_string(),
                leaf.key.display().to_string(),
                names
            )
        })
        .collect();
    format!("[tls]\ncertificates = [{}]\n", entries.join(", "))
}

// === clients ===

type WssClient = WebSocketStream<TlsStream<TcpStream>>;

const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A TLS connection to `addr` for `name` (SNI unless it is an address),
/// trusting only `roots`, offering `versions` and ALPN http/1.1.
async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    roots: Arc<RootCertStore>,
    versions: &[&'static SupportedProtocolVersion],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    within(
        "the TLS handshake",
        TlsConnector::from(Arc::new(config)).connect(server_name, tcp),
    )
    .await
}

/// The certificate the server presented on `stream`.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("the server presented certificates")[0]
        .clone()
        .into_owned()
}

/// A wss:// session for `key` over an established TLS stream, and the
/// backend's welcome.
async fn wss_session(stream: TlsStream<TcpStream>, host: &str, key: &str) -> (WssClient, Welcome) {
    let url = format!("wss://{host}/chat?session={key}");
    let (mut client, response) = within(
        "the WebSocket handshake over TLS",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("upgrade over TLS");
    assert_eq!(response.status().as_u16(), 101);
    let welcome = match next_data(&mut client).await {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("welcome JSON"),
        other => panic!("expected the welcome, got {other:?}"),
    };
    (client, welcome)
}

async fn next_data(client: &mut WssClient) -> Message {
    loop {
        match within("a message over TLS", client.next())
            .await
            .expect("the session ended")
            .expect("the session failed")
        {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Send `text` and expect the backend's echo.
async fn echo(client: &mut WssClient, text: &str) {
    client
        .send(Message::text(text))
        .await
        .expect("send over TLS");
    match next_data(client).await {
        Message::Text(echoed) => assert_eq!(echoed.as_str(), text),
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

/// `wsrouter_rejected_connections_total{reason}` from the admin listener
/// (process-wide: other tests in this binary add to it too).
async fn rejected(admin: SocketAddr, reason: &str) -> f64 {
    let (status, body) = support::http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let series = format!("wsrouter_rejected_connections_total{{reason=\"{reason}\"}}");
    body.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

fn tls_router(backend: &TestBackend, section: &str) -> RouterBuilder {
    router().backend(backend, "eu").extra(section)
}

/// A TLS router with one certificate, for `chat.test`, in front of one
/// backend; the PKI comes back so that clients can trust it.
async fn chat_test_router() -> (Pki, TestBackend, RouterHandle) {
    let pki = Pki::new();
    let leaf = pki.leaf(&["chat.test"]);
    let backend = TestBackend::start("eu-1").await;
    let router = tls_router(&backend, &tls_section(&[(&leaf, &["chat.test"])]))
        .start()
        .await;
    (pki, backend, router)
}

// === sessions ===

#[tokio::test]
async fn a_wss_client_chats_through_the_router_and_the_backend_sees_https() {
    let _trace = trace_init();
    let (pki, _backend, router) = chat_test_router().await;

    let stream = tls_connect(router.public, "chat.test", pki.roots(), BOTH)
        .await
        .expect("TLS handshake with the router");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN is http/1.1"
    );
    let (mut client, welcome) = wss_session(stream, "chat.test", "tls-chat").await;
    assert_eq!(welcome.backend, "eu-1");
    assert_eq!(welcome.header("x-forwarded-proto"), Some("https"));
    for i in 0..20 {
        echo(&mut client, &format!("over tls {i}")).await;
    }
    client.close(None).await.expect("close");
}

#[tokio::test]
async fn at_an_upgrade_a_tls_session_stays_in_the_old_process_until_its_timeout() {
    let pki = Pki::new();
    let leaf = pki.leaf(&["chat.test"]);
    let backend = TestBackend::start("eu-1").await;
    let builder = tls_router(&backend, &tls_section(&[(&leaf, &["chat.test"])]))
        .extra("[upgrade]\nold_process_timeout = \"2s\"\n");
    let mut router = support::RouterProcess::start(&builder, "tls-upgrade").await;
    let stream = tls_connect(router.public, "chat.test", pki.roots(), BOTH)
        .await
        .expect("TLS handshake");
    let (mut client, _) = wss_session(stream, "chat.test", "tls-upgrade").await;
    echo(&mut client, "before the upgrade").await;

    router.upgrade().await;
    // Its TLS state cannot move: the old process relays it on...
    echo(&mut client, "after the upgrade").await;
    // ...until `upgrade.old_process_timeout`, then closes it with 1001.
    match next_data(&mut client).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    router.wait_for_exit().await;
    // New TLS sessions are the new process's.
    let stream = tls_connect(router.public, "chat.test", pki.roots(), BOTH)
        .await
        .expect("TLS handshake with the new process");
    let (mut client, _) = wss_session(stream, "chat.test", "tls-after").await;
    echo(&mut client, "on the new process").await;
}

#[tokio::test]
async fn tls_1_2_only_and_tls_1_3_only_clients_both_connect() {
    // rustls implements nothing below TLS 1.2, so no rustls client can
    // offer 1.1; the refusal of 1.1 is tested with a hand-made ClientHello.
    let _trace = trace_init();
    let (pki, _backend, router) = chat_test_router().await;
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let stream = tls_connect(router.public, "chat.test", pki.roots(), &[version])
            .await
            .unwrap_or_else(|e| panic!("{expected:?} handshake: {e}"));
        assert_eq!(stream.get_ref().1.protocol_version(), Some(expected));
        let (mut client, welcome) =
            wss_session(stream, "chat.test", &format!("{expected:?}")).await;
        assert_eq!(welcome.header("x-forwarded-proto"), Some("https"));
        echo(&mut client, "hello").await;
        client.close(None).await.expect("close");
    }
}

#[tokio::test]
async fn a_plaintext_request_to_the_tls_port_is_refused_and_counted() {
    let _trace = trace_init();
    let (_pki, backend, router) = chat_test_router().await;
    let before = rejected(router.admin, "tls_handshake").await;
    let request = "GET /chat?session=plain HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let answer = support::raw_exchange(router.public, request.as_bytes()).await;
    assert_eq!(
        answer.status, None,
        "no HTTP answer on the TLS port: {answer:?}"
    );
    assert_eq!(backend.sessions(), 0, "nothing reached the backend");
    support::eventually("the refusal to be counted", support::WAIT, || async {
        rejected(router.admin, "tls_handshake").await > before
    })
    .await;
}

/// A TLS 1.1 ClientHello: legacy version 3.2, no supported_versions
/// extension, TLS 1.0-1.2 era cipher suites, null compression. A client
/// that only speaks 1.1 sends no signature_algorithms (a 1.2 extension);
/// `with_1_2_extensions` adds it, with supported_groups and point formats,
/// as a client capped at 1.1 by configuration may, so the only thing wrong
/// is the version.
fn tls_1_1_client_hello(with_1_2_extensions: bool) -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    let suites: &[u16] = &[0xc013, 0xc014, 0x002f, 0x0035]; // ECDHE/RSA with AES-CBC-SHA
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    if with_1_2_extensions {
        let extensions: &[u8] = &[
            0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04,
            0x01, // signature_algorithms
            0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d, // supported_groups: x25519
            0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
        ];
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(extensions);
    }
    let mut handshake = vec![0x01]; // client_hello
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record, TLS 1.0 framing
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn a_tls_1_1_client_is_refused_with_a_protocol_version_alert() {
    let _trace = trace_init();
    let (_pki, backend, router) = chat_test_router().await;
    let before = rejected(router.admin, "tls_handshake").await;
    // An alert record: type 21, then version (2), length (2), level 2
    // (fatal), and the description: 40 handshake_failure for the hello
    // without signature algorithms, 70 protocol_version for the other.
    for (with_1_2_extensions, description) in [(false, 40), (true, 70)] {
        let mut stream = TcpStream::connect(router.public).await.expect("connect");
        stream
            .write_all(&tls_1_1_client_hello(with_1_2_extensions))
            .await
            .expect("send the ClientHello");
        let mut answer = Vec::new();
        within("the router to answer and close", async {
            let mut chunk = [0u8; 1024];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(answer.len() >= 7, "expected an alert, got {answer:?}");
        assert_eq!(answer[0], 21, "an alert record: {answer:?}");
        assert_eq!(&answer[5..7], &[2, description], "fatal alert: {answer:?}");
    }
    assert_eq!(backend.sessions(), 0);
    support::eventually("the refusal to be counted", support::WAIT, || async {
        rejected(router.admin, "tls_handshake").await > before
    })
    .await;
}

#[tokio::test]
async fn sni_picks_the_certificate_and_the_first_is_the_default() {
    let _trace = trace_init();
    let pki = Pki::new();
    // The default certificate also covers other.test and 127.0.0.1 so a
    // client can verify it when the router falls back to it.
    let a = pki.leaf(&["a.test", "other.test", "127.0.0.1"]);
    let b = pki.leaf(&["b.test", "*.wild.test"]);
    let backend = TestBackend::start("eu-1").await;
    let router = tls_router(
        &backend,
        &tls_section(&[(&a, &["a.test"]), (&b, &["b.test", "*.wild.test"])]),
    )
    .start()
    .await;
    for (name, expected, which) in [
        ("b.test", &b, "b by exact name"),
        ("x.wild.test", &b, "b by wildcard"),
        ("a.test", &a, "a by exact name"),
        ("other.test", &a, "a as the default for an unknown name"),
        ("127.0.0.1", &a, "a as the default without SNI"),
    ] {
        let stream = tls_connect(router.public, name, pki.roots(), BOTH)
            .await
            .unwrap_or_else(|e| panic!("{which}: {e}"));
        assert!(presented(&stream) == expected.der, "{which}");
        let (client, welcome) = wss_session(stream, name, "sni").await;
        assert_eq!(welcome.header("x-forwarded-proto"), Some("https"));
        drop(client);
    }
}

#[tokio::test]
async fn reload_swaps_the_certificate_while_an_established_session_keeps_relaying() {
    let _trace = trace_init();
    let pki = Pki::new();
    let leaf = pki.leaf(&["chat.test"]);
    let first = leaf.der.clone();
    let backend = TestBackend::start("eu-1").await;
    let path = temp_file("router-tls.toml");
    let router = tls_router(&backend, &tls_section(&[(&leaf, &["chat.test"])]))
        .start_from_file(&path)
        .await;

    let stream = tls_connect(router.public, "chat.test", pki.roots(), BOTH)
        .await
        .expect("first handshake");
    assert!(presented(&stream) == first);
    let (mut old, _) = wss_session(stream, "chat.test", "before-reload").await;
    echo(&mut old, "before").await;

    // Renew: a new key and certificate in the same files, then reload.
    let leaf = pki.write_leaf(&["chat.test"], leaf);
    let renewed = leaf.der.clone();
    assert!(renewed != first);
    let (status, body) = router.admin_post("/api/reload", None).await;
    assert_eq!(status, 200, "reload: {body}");

    let stream = tls_connect(router.public, "chat.test", pki.roots(), BOTH)
        .await
        .expect("handshake after the reload");
    assert!(
        presented(&stream) == renewed,
        "new connections get the renewed certificate"
    );
    let (mut new, _) = wss_session(stream, "chat.test", "after-reload").await;
    echo(&mut new, "new").await;
    echo(&mut old, "the old session still relays").await;

    // A broken key is refused by the reload; the running certificate stays.
    std::fs::write(
        &leaf.key,
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    )
    .expect("break the key");
    let (status, body) = router.admin_post("/api/reload", None).await;
    assert_eq!(status, 422, "a bad key refuses the reload: {body}");
    assert!(body.contains("tls.certificates[0].key"), "{body}");
    let stream = tls_connect(router.public, "chat.test", pki.roots(), BOTH)
        .await
        .expect("handshake after the refused reload");
    assert!(presented(&stream) == renewed);
    echo(&mut old, "still").await;
    echo(&mut new, "still").await;
    let _ = std::fs::remove_file(path);
}

// === configuration ===

/// The problem reported for `field`, or a panic listing what was reported.
fn problem_for(builder: &RouterBuilder, field: &str) -> String {
    let error = builder
        .config()
        .expect_err("the configuration must be refused");
    let problems = error.problems();
    problems
        .iter()
        .find(|p| p.field == field)
        .map(|p| p.problem.clone())
        .unwrap_or_else(|| panic!("no problem for {field}; got {problems:?}"))
}

fn valid_router() -> RouterBuilder {
    router().backend_entry("eu-1", "ws://127.0.0.1:9001", "eu", None, None)
}

#[test]
fn a_missing_certificate_file_is_refused_naming_the_field_and_the_file() {
    let pki = Pki::new();
    let leaf = pki.leaf(&["chat.test"]);
    let missing = temp_file("missing-chain.pem");
    let builder = valid_router().extra(&format!(
        "[tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
        missing.display().to_string(),
        leaf.key.display().to_string()
    ));
    let problem = problem_for(&builder, "tls.certificates[0].cert");
    assert!(problem.starts_with("cannot read"), "{problem}");
    assert!(problem.contains("missing-chain.pem"), "{problem}");
}

#[test]
fn key_problems_are_refused_naming_the_field_and_the_file() {
    let pki = Pki::new();
    let leaf = pki.leaf(&["chat.test"]);
    let other = pki.leaf(&["other.test"]);
    let section = |cert: &Path, key: &Path| {
        format!(
            "[tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
            cert.display().to_string(),
            key.display().to_string()
        )
    };

    // Not a key at all (a certificate where the key should be).
    let problem = problem_for(
        &valid_router().extra(&section(&leaf.cert, &leaf.cert)),
        "tls.certificates[0].key",
    );
    assert!(problem.contains("is not a private key"), "{problem}");
    assert!(
        problem.contains(&*leaf.cert.display().to_string()),
        "{problem}"
    );

    // Garbage inside a key block.
    let garbage = temp_file("garbage-key.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\n%%%%\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let problem = problem_for(
        &valid_router().extra(&section(&leaf.cert, &garbage)),
        "tls.certificates[0].key",
    );
    assert!(problem.contains("garbage-key.pem"), "{problem}");

    // A real key that belongs to another certificate.
    let problem = problem_for(
        &valid_router().extra(&section(&leaf.cert, &other.key)),
        "tls.certificates[0].key",
    );
    assert!(
        problem.contains("does not match the certificate"),
        "{problem}"
    );
}

#[test]
fn tls_section_shape_problems_are_refused() {
    let pki = Pki::new();
    let a = pki.leaf(&["a.test"]);
    let b = pki.leaf(&["b.test"]);
    let problem = problem_for(
        &valid_router().extra("[tls]\ncertificates = []\n"),
        "tls.certificates",
    );
    assert!(problem.contains("at least one"), "{problem}");
    // A second certificate without names could never be chosen.
    let problem = problem_for(
        &valid_router().extra(&tls_section(&[(&a, &["a.test"]), (&b, &[])])),
        "tls.certificates[1].server_names",
    );
    assert!(problem.contains("must list"), "{problem}");
    let problem = problem_for(
        &valid_router().extra(&tls_section(&[(&a, &["a.test"]), (&b, &["A.test"])])),
        "tls.certificates[1].server_names[0]",
    );
    assert!(problem.contains("already served"), "{problem}");
}

#[test]
fn check_config_names_the_certificate_field_and_file() {
    let missing = temp_file("nowhere-chain.pem");
    let builder = valid_router().extra(&format!(
        "[tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
        missing.display().to_string(),
        missing.display().to_string()
    ));
    let geoip = manifest_dir().join(&builder.geoip);
    let text = builder.geoip(geoip.to_str().expect("UTF-8 path")).toml();
    let path = temp_file("tls-check.toml");
    std::fs::write(&path, text).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_wsrouter"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .expect("run wsrouter");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("tls.certificates[0].cert: cannot read"),
        "{stderr}"
    );
    assert!(stderr.contains("nowhere-chain.pem"), "{stderr}");
    let _ = std::fs::remove_file(path);
}

// === wss:// backends ===

/// A TLS front for a plain [`TestBackend`] with `leaf`'s certificate, so it
/// is a `wss://` backend (and an https one for health checks). Returns its
/// port.
async fn tls_front(target: SocketAddr, leaf: &Leaf) -> u16 {
    let chain = CertificateDer::pem_file_iter(&leaf.cert)
        .expect("read the chain")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse the chain");
    let key = PrivateKeyDer::from_pem_file(&leaf.key).expect("read the key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("certificate and key");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the TLS front");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

impl Pki {
    /// The CA certificate in a PEM file, for `[upstream_tls] ca_file`.
    fn ca_file(&self) -> PathBuf {
        let path = temp_file("ca.pem");
        std::fs::write(&path, self.ca.pem()).expect("write the CA");
        path
    }
}

fn upstream_tls_section(ca_file: &Path) -> String {
    format!(
        "[upstream_tls]\nca_file = {:?}\n",
        ca_file.display().to_string()
    )
}

#[tokio::test]
async fn a_wss_backend_is_dialed_over_tls_and_health_checked_over_https() {
    let _trace = trace_init();
    let pki = Pki::new();
    let leaf = pki.leaf(&["localhost"]);
    let backend = TestBackend::start("eu-wss").await;
    let port = tls_front(backend.addr, &leaf).await;
    let router = router()
        .backend_entry(
            "eu-wss",
            &format!("wss://localhost:{port}/"),
            "eu",
            None,
            None,
        )
        .fast_health_checks()
        .extra(&upstream_tls_section(&pki.ca_file()))
        .start()
        .await;
    let (mut client, welcome) = router.connect("wss-backend", &[]).await;
    assert_eq!(welcome.backend, "eu-wss");
    assert_eq!(welcome.header("x-forwarded-proto"), Some("http"));
    client
        .send(Message::text("through two hops"))
        .await
        .expect("send");
    match support::recv_data(&mut client).await {
        Message::Text(text) => assert_eq!(text.as_str(), "through two hops"),
        other => panic!("expected the echo, got {other:?}"),
    }
    support::close(client).await;
    // The checks reach the backend through TLS, so they pass and count.
    support::eventually("health checks over https", support::WAIT, || async {
        backend.health_checks() >= 2
    })
    .await;
    assert_eq!(router.backend_state("eu-wss").await, "healthy");
}

#[tokio::test]
async fn a_wss_backend_whose_certificate_names_another_host_is_not_used() {
    let _trace = trace_init();
    let pki = Pki::new();
    let leaf = pki.leaf(&["elsewhere.test"]);
    let backend = TestBackend::start("eu-wrong-name").await;
    let port = tls_front(backend.addr, &leaf).await;
    let router = router()
        .backend_entry(
            "eu-wrong-name",
            &format!("wss://localhost:{port}"),
            "eu",
            None,
            None,
        )
        .extra(&upstream_tls_section(&pki.ca_file()))
        .start()
        .await;
    match support::try_connect(&router.url("wrong-name"), &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 502)
        }
        Err(e) => panic!("expected 502, got {e}"),
        Ok(_) => panic!("a session through a backend with the wrong certificate"),
    }
    assert_eq!(backend.sessions(), 0);
}

#[test]
fn an_unreadable_upstream_ca_file_is_refused_naming_the_field() {
    let missing = temp_file("missing-ca.pem");
    let builder = router()
        .backend_entry("eu-1", "wss://backend.test:9001", "eu", None, None)
        .extra(&upstream_tls_section(&missing));
    let problem = problem_for(&builder, "upstream_tls.ca_file");
    assert!(problem.starts_with("cannot read"), "{problem}");
    assert!(problem.contains("missing-ca.pem"), "{problem}");
}
