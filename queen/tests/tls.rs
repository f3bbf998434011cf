//! TLS on both listeners, with certificates generated at run time (rcgen): the API over
//! https, a drone over TLS through a whole task, plain text refused, mutual TLS refusing
//! drones without a certificate from the configured CA. Plus separate drone and client
//! tokens.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{fast_config, hello, FakeDrone, TestQueen};
use hive_testkit::Incoming;
use hive_tls::test_pki::Usage as ExtendedKeyUsagePurpose;
use serde_json::json;
use shared::protocol::{AckStatus, DroneMessage, QueenMessage, TaskComplete};
use shared::DroneId;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A throwaway CA with its own temp dir.
struct Pki {
    inner: hive_tls::test_pki::Pki,
    _dir: tempfile::TempDir,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        Pki {
            inner: hive_tls::test_pki::Pki::new(dir.path(), name),
            _dir: dir,
        }
    }
}

impl std::ops::Deref for Pki {
    type Target = hive_tls::test_pki::Pki;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

fn tls_config(data: &Path, pki: &Pki, mutual: bool) -> queen::config::Config {
    let mut cfg = fast_config(data);
    let (cert, key) = pki.issue(
        "queen",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    cfg.tls.cert = Some(cert);
    cfg.tls.key = Some(key);
    if mutual {
        cfg.tls.client_ca = Some(pki.path("ca.crt"));
    }
    cfg
}

fn https_agent(ca: &Path) -> ureq::Agent {
    let config = hive_tls::client_config(ca, None).expect("client config");
    ureq::AgentBuilder::new().tls_config(config).build()
}

async fn https_get(agent: ureq::Agent, url: String) -> Result<serde_json::Value, String> {
    tokio::task::spawn_blocking(move || {
        agent
            .get(&url)
            .call()
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_json().map_err(|e| e.to_string()))
    })
    .await
    .expect("join")
}

/// A drone's TLS connection, or the handshake error.
async fn connect_tls(
    q: &TestQueen,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<FakeDrone, std::io::Error> {
    let config = hive_tls::client_config(ca, identity).expect("client config");
    let tcp = TcpStream::connect(q.drones).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = TlsConnector::from(Arc::clone(&config))
        .connect(name, tcp)
        .await?;
    Ok(FakeDrone::over(stream))
}

/// Sends a hello; the queen's first answer, or `None` if it closed the connection (a
/// TLS 1.3 server refuses a client certificate after the client's handshake completes, so
/// a refusal may surface here rather than in the handshake).
async fn say_hello(io: &mut FakeDrone, token: Option<&str>) -> Option<QueenMessage> {
    let mut h = hello(DroneId::generate(), 1, vec![]);
    h.token = token.map(|t| shared::ids::Secret(t.into()));
    io.say_hello(h).await
}

async fn next_message(io: &mut FakeDrone) -> QueenMessage {
    io.recv().await.expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hive_over_tls_runs_a_task_and_refuses_plain_text() {
    let pki = Pki::new("queen");
    let data = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(tls_config(data.path(), &pki, false)).await;
    let https = format!("https://localhost:{}", q.http.port());

    // The API over https, verified against the CA.
    let agent = https_agent(&pki.path("ca.crt"));
    let health = https_get(agent.clone(), format!("{https}/healthz")).await;
    assert_eq!(health, Ok(json!({"status": "ok"})));
    let url = format!("{https}/v1/tasks");
    let a = agent.clone();
    let task: shared::api::TaskView = tokio::task::spawn_blocking(move || {
        a.post(&url)
            .send_json(json!({"kind": "echo", "payload": {"over": "tls"}}))
            .expect("submit over https")
            .into_json()
            .expect("task view")
    })
    .await
    .expect("join");

    // Plain http to the TLS port gets no API answer.
    let plain = tokio::task::spawn_blocking({
        let url = format!("http://127.0.0.1:{}/healthz", q.http.port());
        move || {
            ureq::get(&url)
                .call()
                .map(|r| r.status())
                .map_err(|e| e.to_string())
        }
    })
    .await
    .expect("join");
    assert!(plain.is_err(), "plain http must not be served: {plain:?}");

    // A client that does not trust the queen's CA refuses it.
    let stranger = Pki::new("stranger");
    let refused = https_get(
        https_agent(&stranger.path("ca.crt")),
        format!("{https}/healthz"),
    )
    .await;
    assert!(
        refused.is_err(),
        "an untrusted certificate must fail: {refused:?}"
    );

    // A drone over TLS runs the task through to a recorded outcome.
    let mut d = connect_tls(&q, &pki.path("ca.crt"), None)
        .await
        .expect("tls handshake");
    assert!(matches!(
        say_hello(&mut d, None).await,
        Some(QueenMessage::Welcome(_))
    ));
    let assign = loop {
        if let QueenMessage::Assign(a) = next_message(&mut d).await {
            break a;
        }
    };
    assert_eq!(assign.task_id, task.id);
    d.try_send(&DroneMessage::TaskComplete(TaskComplete {
        task_id: assign.task_id,
        fence: assign.fence,
        result: assign.payload.clone(),
    }))
    .await
    .expect("send");
    let status = loop {
        if let QueenMessage::Ack(a) = next_message(&mut d).await {
            break a.status;
        }
    };
    assert_eq!(status, AckStatus::Recorded);
    let view = https_get(agent, format!("{https}/v1/tasks/{}", task.id))
        .await
        .expect("get over https");
    assert_eq!(view["state"], "succeeded");
    assert_eq!(view["result"], json!({"over": "tls"}));

    // A plain-text drone gets nothing: the queen waits for a TLS handshake, not a hello.
    let mut plain = FakeDrone::open(q.drones).await;
    let _ = plain
        .try_send(&DroneMessage::Hello(hello(DroneId::generate(), 1, vec![])))
        .await;
    let answer = plain
        .next_within(common::PATIENCE)
        .await
        .expect("closed in time");
    let welcomed = matches!(&answer, Incoming::Msg(QueenMessage::Welcome(_)));
    assert!(!welcomed, "a plain-text hello must not be welcomed");
    q.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_drones_with_a_certificate_from_the_ca() {
    let pki = Pki::new("hive");
    let data = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(tls_config(data.path(), &pki, true)).await;
    let ca = pki.path("ca.crt");

    // No client certificate: refused in the handshake or right after it.
    match connect_tls(&q, &ca, None).await {
        Err(_) => {}
        Ok(mut io) => assert!(
            say_hello(&mut io, None).await.is_none(),
            "no cert, no welcome"
        ),
    }
    // A certificate from another CA: refused too.
    let other = Pki::new("other");
    let (crt, key) = other.issue("rogue", &["rogue"], ExtendedKeyUsagePurpose::ClientAuth);
    match connect_tls(&q, &ca, Some((&crt, &key))).await {
        Err(_) => {}
        Ok(mut io) => assert!(
            say_hello(&mut io, None).await.is_none(),
            "foreign cert, no welcome"
        ),
    }
    // Signed by the configured CA: welcome.
    let (crt, key) = pki.issue("drone-1", &["drone-1"], ExtendedKeyUsagePurpose::ClientAuth);
    let mut io = connect_tls(&q, &ca, Some((&crt, &key)))
        .await
        .expect("handshake with a good certificate");
    assert!(matches!(
        say_hello(&mut io, None).await,
        Some(QueenMessage::Welcome(_))
    ));
    // The API does not ask browsers for certificates.
    let health = https_get(
        https_agent(&ca),
        format!("https://localhost:{}/healthz", q.http.port()),
    )
    .await;
    assert_eq!(health, Ok(json!({"status": "ok"})));
    q.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_file_stops_the_queen_with_its_name() {
    let pki = Pki::new("queen");
    let data = tempfile::tempdir().expect("tempdir");
    let mut cfg = tls_config(data.path(), &pki, false);
    let broken = pki.path("broken.crt");
    std::fs::write(&broken, "not a certificate").expect("write");
    cfg.tls.cert = Some(broken.clone());
    let err = queen::Queen::open(cfg).expect_err("refused").to_string();
    assert!(err.contains("broken.crt"), "{err}");
    assert!(
        !data.path().join("db").exists(),
        "nothing is created before the certificates load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drone_and_client_tokens_are_separate() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(data.path());
    cfg.auth.drone_token = Some(shared::ids::Secret("for-drones".into()));
    cfg.auth.client_token = Some(shared::ids::Secret("for-clients".into()));
    let q = TestQueen::start(cfg).await;
    let (status, _) = q
        .call_with("GET", "/v1/stats", None, Some("for-drones"))
        .await;
    assert_eq!(status, 401, "a drone token does not open the API");
    let (status, _) = q
        .call_with("GET", "/v1/stats", None, Some("for-clients"))
        .await;
    assert_eq!(status, 200);

    for (token, welcomed) in [
        (Some("for-clients"), false),
        (None, false),
        (Some("for-drones"), true),
    ] {
        let mut h = hello(DroneId::generate(), 1, vec![]);
        h.token = token.map(|t| shared::ids::Secret(t.into()));
        let mut io = FakeDrone::open(q.drones).await;
        let msg = io.say_hello(h).await.expect("answer");
        assert_eq!(
            matches!(msg, QueenMessage::Welcome(_)),
            welcomed,
            "token {token:?}: {msg:?}"
        );
    }
    q.stop().await;
}

/// The CLI verifies a TLS queen against `--ca` (or `HIVE_CA`); without the CA it refuses
/// the queen's certificate and says the queen is unreachable (exit 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_talks_https_with_a_ca_and_refuses_an_unverified_queen() {
    let pki = Pki::new("queen");
    let data = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(tls_config(data.path(), &pki, false)).await;
    let addr = format!("https://localhost:{}", q.http.port());
    let ca = pki.path("ca.crt");
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_queen"))
                .args(&args)
                .env_remove("HIVE_CA")
                .env_remove("HIVE_ADDR")
                .env_remove("HIVE_TOKEN")
                .output()
                .expect("run the cli")
        })
    };
    let ok = run(vec![
        "--addr".into(),
        addr.clone(),
        "--ca".into(),
        ca.display().to_string(),
        "submit".into(),
        "echo".into(),
        "--json".into(),
    ])
    .await
    .expect("join");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(view["kind"], "echo");

    let unverified = run(vec!["--addr".into(), addr, "stats".into()])
        .await
        .expect("join");
    assert_eq!(unverified.status.code(), Some(5));
    let stderr = String::from_utf8_lossy(&unverified.stderr);
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    q.stop().await;
}
