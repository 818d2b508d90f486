//! TLS from configuration: a server certificate, and mutual TLS with a client CA, from files
//! and from PEM environment variables. The certificates are made with the `openssl` command in
//! a temp folder during the test.

mod api_support;
mod common;

use std::path::Path;

use api_support::*;
use common::EngineProcess;
use common::certs::make_certs;
use setpoint::api::proto::GetInstanceRequest;
use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::tls::{CERT_PEM_VAR, CLIENT_CA_PEM_VAR, KEY_PEM_VAR};
use setpoint::api::{ApiConfig, TlsConfig};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

async fn tls_client(
    env: &Env,
    certs: &Path,
    with_client_cert: bool,
) -> Result<InstanceServiceClient<Channel>, tonic::transport::Error> {
    tls_client_at(&env.addr.to_string(), certs, with_client_cert).await
}

/// A client of the API at `addr` that trusts the test CA, with the client certificate if asked.
async fn tls_client_at(
    addr: &str,
    certs: &Path,
    with_client_cert: bool,
) -> Result<InstanceServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(certs.join("ca.pem")).unwrap(),
        ))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(certs.join("client.pem")).unwrap(),
            std::fs::read(certs.join("client.key")).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(InstanceServiceClient::new(channel))
}

#[tokio::test]
async fn server_tls_and_mutual_tls_from_configuration() {
    let certs = make_certs();
    let get = || GetInstanceRequest {
        name: "tenants/acme/instances/none".into(),
    };

    // Server certificate only.
    let env = Env::start(ApiConfig {
        tls: Some(TlsConfig::from_files(
            certs.join("server.pem"),
            certs.join("server.key"),
            None,
        )),
        ..ApiConfig::default()
    })
    .await;
    let mut c = tls_client(&env, &certs, false).await.expect("TLS connects");
    let e = c.get_instance(authed(&env.acme, get())).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "an authenticated call over TLS: {e:?}"
    );
    // Plaintext is not served.
    let plain = match Channel::from_shared(env.url()).unwrap().connect().await {
        Err(_) => true,
        Ok(ch) => InstanceServiceClient::new(ch)
            .get_instance(authed(&env.acme, get()))
            .await
            .is_err_and(|e| e.code() != Code::NotFound),
    };
    assert!(plain, "plaintext must not be served");
    drop(c);
    env.stop().await;

    // Mutual TLS: a client without a certificate signed by the client CA is refused.
    let env = Env::start(ApiConfig {
        tls: Some(TlsConfig::from_files(
            certs.join("server.pem"),
            certs.join("server.key"),
            Some(certs.join("ca.pem")),
        )),
        ..ApiConfig::default()
    })
    .await;
    let mut c = tls_client(&env, &certs, true).await.expect("mTLS connects");
    let e = c.get_instance(authed(&env.acme, get())).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let refused = match tls_client(&env, &certs, false).await {
        Err(_) => true,
        Ok(mut c) => c
            .get_instance(authed(&env.acme, get()))
            .await
            .is_err_and(|e| e.code() != Code::NotFound),
    };
    assert!(refused, "a client without a certificate must be refused");
    drop(c);
    env.stop().await;
    let _ = std::fs::remove_dir_all(&certs);
}

/// The gauge of the seconds left until the API's certificate expires.
const EXPIRY_GAUGE: &str = "setpoint_api_tls_certificate_expiry_seconds";

/// The `addr` field of the engine's JSON log line "gRPC API listening".
async fn listening_addr(engine: &EngineProcess) -> String {
    logged_field(engine, "gRPC API listening", "addr").await
}

/// Field `field` of the engine's first JSON log line whose message is `message`.
async fn logged_field(engine: &EngineProcess, message: &str, field: &str) -> String {
    common::wait_for(&format!("the log line \"{message}\""), || async {
        engine.output().lines().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["fields"]["message"] == message)
                .then(|| v["fields"][field].as_str().map(str::to_owned))
                .flatten()
        })
    })
    .await
}

/// The `notAfter` of a PEM certificate file, as `openssl x509 -enddate` reads it.
fn openssl_not_after(cert: &Path) -> chrono::DateTime<chrono::Utc> {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(cert)
        .output()
        .expect("openssl");
    let text = String::from_utf8(out.stdout).unwrap();
    let date = text.trim().strip_prefix("notAfter=").expect("notAfter=");
    chrono::NaiveDateTime::parse_from_str(date, "%b %e %H:%M:%S %Y GMT")
        .unwrap_or_else(|e| panic!("{date}: {e}"))
        .and_utc()
}

/// The body of `GET path` from the HTTP server at `addr`.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// `setpoint serve` takes its TLS material from PEM environment variables, the way ECS hands
/// it Secrets Manager values (the Terraform module's `grpc_tls`): the API then speaks TLS only,
/// the client CA makes it mutual, the log names the variables and never shows the key, and
/// material that is given twice or does not parse stops the process with a message that names
/// the variable. The configuration file's `[api]` table can name the files instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_tls_from_pem_variables_or_the_config_file() {
    let certs = make_certs();
    let db = common::db().await;
    let pem = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
    let key = pem("server.key");
    // A line from the middle of the key: it must never appear in the output.
    let key_line = key.lines().nth(3).unwrap().to_owned();
    let token = setpoint::api::auth::create_token(&db.pool, "acme", false, None)
        .await
        .unwrap()
        .token;
    let get = || {
        authed(
            &token,
            GetInstanceRequest {
                name: "tenants/acme/instances/none".into(),
            },
        )
    };

    // The module's task definition sets exactly these names (as ECS secrets).
    let ecs =
        std::fs::read_to_string(common::package_dir().join("terraform/modules/setpoint/ecs.tf"))
            .unwrap();
    for var in [CERT_PEM_VAR, KEY_PEM_VAR, CLIENT_CA_PEM_VAR] {
        assert!(ecs.contains(var), "ecs.tf passes {var}");
    }
    // The module's alarm and the ops alert read the gauge this test finds on /metrics.
    for file in [
        "terraform/modules/setpoint/monitoring.tf",
        "ops/prometheus-alerts.yml",
    ] {
        let text = std::fs::read_to_string(common::package_dir().join(file)).unwrap();
        assert!(text.contains(EXPIRY_GAUGE), "{file} reads {EXPIRY_GAUGE}");
    }

    let ca_one_line = pem("ca.pem").replace('\n', "\\n");
    let engine = EngineProcess::start(
        &db.url,
        "tls-env",
        &[
            ("SETPOINT_LOG_FORMAT", "json"),
            (CERT_PEM_VAR, &pem("server.pem")),
            (KEY_PEM_VAR, &key),
            // Stored on one line with escaped newlines, as some secret stores keep it.
            (CLIENT_CA_PEM_VAR, &ca_one_line),
        ],
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let addr = listening_addr(&engine).await;
    // When the certificate expires: in the start-up log and, counting down, on /metrics.
    let not_after = openssl_not_after(&certs.join("server.pem"));
    let logged = logged_field(&engine, "gRPC API serves TLS", "certificate_expires_at").await;
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(&logged).unwrap(),
        not_after
    );
    let metrics = logged_field(&engine, "metrics, /healthz and /readyz listening", "addr").await;
    let gauge = common::wait_for("the expiry gauge", || {
        let metrics = metrics.clone();
        async move {
            let body = tokio::task::spawn_blocking(move || http_get(&metrics, "/metrics"))
                .await
                .unwrap();
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{EXPIRY_GAUGE} ")))
                .and_then(|v| v.trim().parse::<f64>().ok())
        }
    })
    .await;
    // The gauge was set when the API started (and every minute since): it may be older than
    // this reading, never newer.
    let expected = (not_after - chrono::Utc::now()).num_seconds() as f64;
    assert!(
        gauge >= expected - 2.0 && gauge <= expected + 65.0,
        "gauge {gauge}, expected about {expected}"
    );
    let mut c = tls_client_at(&addr, &certs, true)
        .await
        .expect("mutual TLS connects");
    let e = c.get_instance(get()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "an authenticated call: {e:?}");
    let refused = match tls_client_at(&addr, &certs, false).await {
        Err(_) => true,
        Ok(mut c) => c
            .get_instance(get())
            .await
            .is_err_and(|e| e.code() != Code::NotFound),
    };
    assert!(refused, "a client without a certificate must be refused");
    let out = engine.output();
    assert!(
        out.contains("gRPC API serves TLS") && out.contains("$SETPOINT_TLS_KEY_PEM"),
        "{out}"
    );
    assert!(!out.contains(&key_line), "the key reached the log: {out}");
    drop(c);
    drop(engine);

    // The same from the configuration file's [api] table (files named there).
    let config = certs.join("setpoint.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display()
        ),
    )
    .unwrap();
    let engine = EngineProcess::start(
        &db.url,
        "tls-file",
        &[("SETPOINT_LOG_FORMAT", "json")],
        &["--config", config.to_str().unwrap()],
    );
    let addr = listening_addr(&engine).await;
    let mut c = tls_client_at(&addr, &certs, false)
        .await
        .expect("TLS from the file connects");
    let e = c.get_instance(get()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    drop(c);
    drop(engine);

    // Material that is no key, or an item given both ways: the process stops and says why.
    let not_a_key = pem("ca.pem");
    let key_file = certs.join("server.key");
    let key_file = key_file.to_str().unwrap();
    for (env, args, says) in [
        (
            vec![(CERT_PEM_VAR, pem("server.pem")), (KEY_PEM_VAR, not_a_key)],
            vec![],
            ["holds no private key", KEY_PEM_VAR],
        ),
        (
            vec![
                (CERT_PEM_VAR, pem("server.pem")),
                (KEY_PEM_VAR, key.clone()),
            ],
            vec!["--tls-key", key_file],
            ["both set", KEY_PEM_VAR],
        ),
        (
            vec![(KEY_PEM_VAR, key.clone())],
            vec![],
            ["without its certificate", CERT_PEM_VAR],
        ),
    ] {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut engine = EngineProcess::start(&db.url, "tls-bad", &env, &args);
        let names: Vec<&str> = env.iter().map(|(k, _)| *k).collect();
        assert!(
            !engine.wait_exit().await,
            "must not start: {names:?} {args:?}"
        );
        let out = engine.output();
        assert!(
            says.iter().all(|s| out.contains(s)),
            "{names:?}: {says:?}: {out}"
        );
        assert!(
            !out.contains(&key_line),
            "the key reached the output: {out}"
        );
        assert!(!out.contains("gRPC API listening"), "{out}");
    }
    let _ = std::fs::remove_dir_all(&certs);
}
