//! A real hive over TLS: the queen and drone binaries with certificates generated at run
//! time (rcgen). The drone verifies the queen against its CA and presents its own
//! certificate (mutual TLS) and token; the API answers only over https with the client
//! token; a drone without a certificate from the CA never gets in.

use std::collections::BTreeMap;

use hive_tests::drone::DroneProc;
use hive_tests::queen::QueenProc;
use hive_tests::wait::{wait_until, DEADLINE};
use hive_tls::test_pki::{Pki, Usage as ExtendedKeyUsagePurpose};
use serde_json::{json, Value};

/// The API over https, trusting only `ca`.
struct Https {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl Https {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => Ok((r.status(), r.into_json().map_err(|e| e.to_string())?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_json().unwrap_or(Value::Null))),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[test]
fn a_hive_over_mutual_tls_runs_tasks_and_keeps_strangers_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "hive");
    let (queen_crt, queen_key) = pki.issue(
        "queen",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (drone_crt, drone_key) =
        pki.issue("drone-a", &["drone-a"], ExtendedKeyUsagePurpose::ClientAuth);
    let config = dir.path().join("hive.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\ndrone_token = \"drones-secret\"\nclient_token = \"clients-secret\"\n\n\
             [tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            queen_crt,
            queen_key,
            pki.ca()
        ),
    )
    .expect("write config");
    let mut queen = QueenProc::start(
        &dir.path().join("data"),
        &dir.path().join("queen.log"),
        BTreeMap::new(),
        Some(config),
    );
    let tls = hive_tls::client_config(&pki.ca(), None).expect("client config");
    let api = Https {
        agent: ureq::AgentBuilder::new().tls_config(tls).build(),
        base: format!("https://127.0.0.1:{}", queen.http_addr.port()),
        token: "clients-secret".into(),
    };

    // The drone: verifies the queen, presents its certificate and the drone token.
    let ca = pki.ca().display().to_string();
    let (crt, key) = (
        drone_crt.display().to_string(),
        drone_key.display().to_string(),
    );
    let mut good = DroneProc::start(
        queen.drones_addr,
        "drone-a",
        2,
        &[
            "--tls-ca",
            &ca,
            "--tls-cert",
            &crt,
            "--tls-key",
            &key,
            "--token",
            "drones-secret",
        ],
        &dir.path().join("drone-a.log"),
    );
    // A drone without a client certificate: the queen refuses it in the handshake.
    let mut stranger = DroneProc::start(
        queen.drones_addr,
        "stranger",
        2,
        &["--tls-ca", &ca, "--token", "drones-secret"],
        &dir.path().join("stranger.log"),
    );

    let (status, task) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"kind": "exec", "payload": {"cmd": ["sh", "-c", "echo over-tls"]}})),
        )
        .expect("submit over https");
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().expect("id").to_owned();
    let done = wait_until(DEADLINE, "the task to succeed over TLS", || {
        api.call("GET", &format!("/v1/tasks/{id}"), None)
            .ok()
            .filter(|(_, t)| t["state"] == "succeeded")
            .map(|(_, t)| t)
    });
    assert!(
        done["result"].to_string().contains("over-tls"),
        "{}",
        done["result"]
    );

    // Only the drone with a certificate is connected; the queen's log says why.
    let (_, drones) = api.call("GET", "/v1/drones", None).expect("drones");
    let names: Vec<&str> = drones["drones"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, vec!["drone-a"]);
    wait_until(
        DEADLINE,
        "the queen to refuse the stranger's handshake",
        || {
            std::fs::read_to_string(queen.log())
                .unwrap_or_default()
                .contains("peer sent no certificates")
        },
    );
    assert!(
        stranger.is_running(),
        "it keeps retrying, it does not crash"
    );

    // The API refuses plain http and the drone token.
    let plain = ureq::get(&format!(
        "http://127.0.0.1:{}/healthz",
        queen.http_addr.port()
    ))
    .call();
    assert!(plain.is_err(), "plain http must not be served");
    let wrong = Https {
        token: "drones-secret".into(),
        ..api
    };
    assert_eq!(wrong.call("GET", "/v1/stats", None).map(|r| r.0), Ok(401));

    stranger.kill9();
    good.kill9();
    queen.stop();
    // Secrets never reach a log.
    for log in [
        queen.log().to_path_buf(),
        dir.path().join("drone-a.log"),
        dir.path().join("stranger.log"),
    ] {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!text.is_empty(), "{} has lines", log.display());
        for secret in ["drones-secret", "clients-secret"] {
            assert!(!text.contains(secret), "{} logs {secret}", log.display());
        }
    }
}
