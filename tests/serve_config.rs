//! `setpoint serve` with the KVX workflows: the `[ec2]`, `[kubernetes]`, `[smtp]` and
//! `[workflows]` configuration (file and environment, the SMTP URL and its password), a real
//! create through the gRPC API to READY against moto, aiosmtpd and the Kubernetes test server,
//! and the refusal to start with only some adapter sections.
//!
//! Nothing here asserts on speed: every wait polls for a condition (with a generous limit that
//! only guards against a hung test).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::proto::{
    CreateInstanceRequest, GetInstanceRequest, Instance, InstanceSpec, InstanceStatus,
};
use setpoint::config::{FileConfig, WorkflowsFile};
use setpoint::plugins::ec2::Ec2Settings;
use setpoint::plugins::email::{SmtpEndpoint, SmtpSettings};
use setpoint::plugins::kubernetes::KubernetesSettings;
use setpoint::plugins::kvx::{DriftAction, check_complete};
use setpoint_ec2::Ec2Regions;
use setpoint_email::Security;
use setpoint_email::SmtpConfig;
use setpoint_kubernetes::ClusterAccess;
use setpoint_kubernetes::KubernetesConfig;

use common::peers::{Bearer, Peers, subjects};
use common::{EngineProcess, logged_addr, logged_field, wait_for};

// ---------------------------------------------------------------------------------------------
// Configuration parsing.

const FULL: &str = r#"
[ec2]
region = "eu-west-1"
subnet_ids = ["subnet-file"]
default_image_id = "ami-1"

[kubernetes]
access = { mode = "url", url = "http://127.0.0.1:8001" }

[smtp]
host = "mail.internal"
security = "none"
username = "u"
password = "file-secret"
from = "setpoint <noreply@example.com>"

[workflows]
resync_interval = "5m"
drift = "mark"
machine_wait = "30s"
"#;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| map.get(k).cloned().filter(|v| !v.trim().is_empty())
}

/// The configuration as `serve` reads it: the file, then the environment, table by table
/// (each adapter's table is its plugin's).
#[derive(Debug)]
struct Parsed {
    ec2: Option<Ec2Regions>,
    kubernetes: Option<KubernetesConfig>,
    smtp: Option<SmtpConfig>,
    workflows: WorkflowsFile,
}

fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Parsed, String> {
    let file: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    let json = |v: &Option<toml::Value>| v.as_ref().map(|v| serde_json::to_value(v).expect("json"));
    let mut ec2 = Ec2Settings::from_table(json(&file.ec2).as_ref()).map_err(|e| e.to_string())?;
    ec2.apply_env(&env).map_err(|e| e.to_string())?;
    let mut kubernetes = KubernetesSettings::from_table(json(&file.kubernetes).as_ref())
        .map_err(|e| e.to_string())?;
    kubernetes.apply_env(&env).map_err(|e| e.to_string())?;
    let mut smtp =
        SmtpSettings::from_table(json(&file.smtp).as_ref()).map_err(|e| e.to_string())?;
    smtp.apply_env(&env).map_err(|e| e.to_string())?;
    Ok(Parsed {
        ec2: ec2.ec2,
        kubernetes: kubernetes.kubernetes,
        smtp: smtp.smtp,
        workflows: file.workflows,
    })
}

/// Whether the KVX kind is on (all three adapters), off (none), or refused (some), as the
/// KVX plugin decides.
fn complete(p: &Parsed) -> Result<bool, String> {
    check_complete(p.ec2.is_some(), p.kubernetes.is_some(), p.smtp.is_some())
        .map_err(|e| e.to_string())
}

#[test]
fn file_sections_parse() {
    let f = parse(FULL, env(&[])).expect("parse");
    let ec2 = f.ec2.as_ref().and_then(|e| e.only()).expect("ec2");
    assert_eq!(ec2.region, "eu-west-1");
    assert_eq!(ec2.subnet_ids, ["subnet-file"]);
    let k8s = f.kubernetes.as_ref().expect("kubernetes");
    assert!(matches!(&k8s.access, ClusterAccess::Url { url } if url == "http://127.0.0.1:8001"));
    let smtp = f.smtp.as_ref().expect("smtp");
    assert_eq!(smtp.host, "mail.internal");
    assert_eq!(smtp.security, Security::None);
    assert_eq!(f.workflows.resync_interval, Some(Duration::from_secs(300)));
    assert_eq!(f.workflows.drift.as_deref(), Some("mark"));
    assert_eq!(f.workflows.machine_wait, Some(Duration::from_secs(30)));
    // The password never shows in Debug.
    let debug = format!("{f:?}");
    assert!(!debug.contains("file-secret"), "{debug}");
    assert!(complete(&f).expect("complete"));

    // Several regions: the engine serves each of them.
    let several = FULL.replace(
        "[ec2]\nregion = \"eu-west-1\"\nsubnet_ids = [\"subnet-file\"]\ndefault_image_id = \"ami-1\"",
        "[ec2.regions.us-east-1]\n[ec2.regions.eu-west-1]",
    );
    let f = parse(&several, env(&[])).expect("parse");
    assert_eq!(
        f.ec2.as_ref().map(|e| e.names()),
        Some(vec!["eu-west-1", "us-east-1"])
    );
    assert!(complete(&f).expect("complete"));

    // Unknown keys in a section are refused with the key's name.
    let bad = toml::from_str::<FileConfig>("[workflows]\ndrfit = \"heal\"\n").unwrap_err();
    assert!(bad.to_string().contains("drfit"), "{bad}");
    let bad = "ignore".parse::<DriftAction>().unwrap_err();
    assert!(bad.contains("ignore"), "{bad}");
    // No section: the KVX kind off, defaults for the rest.
    let empty = parse("", env(&[])).expect("empty");
    assert!(!complete(&empty).expect("none"));
}

#[test]
fn environment_overrides_and_creates_sections() {
    // Over a file: the environment wins field by field.
    let f = parse(
        FULL,
        env(&[
            ("SETPOINT_AWS_REGION", "us-west-2"),
            ("SETPOINT_EC2_SUBNET_ID", "subnet-a"),
            ("SETPOINT_EC2_SECURITY_GROUP_IDS", "sg-1, sg-2,,"),
            (
                "SETPOINT_SMTP_URL",
                "smtps://AKIA%2Fx:env%40secret@email-smtp.eu-west-1.amazonaws.com",
            ),
            ("SETPOINT_EMAIL_FROM", "ops@example.com"),
            (
                "SETPOINT_EC2_PLAN_INSTANCE_TYPES",
                "kvx.small=t3.small, kvx.large = m6i.large,",
            ),
        ]),
    )
    .expect("env");
    let ec2 = f.ec2.as_ref().and_then(|e| e.only()).expect("ec2");
    assert_eq!(ec2.region, "us-west-2");
    let types: Vec<(&str, Option<&str>)> = ec2
        .plans
        .iter()
        .map(|(plan, c)| (plan.as_str(), c.instance_type.as_deref()))
        .collect();
    assert_eq!(
        types,
        [
            ("kvx.large", Some("m6i.large")),
            ("kvx.small", Some("t3.small"))
        ]
    );
    assert_eq!(ec2.subnet_ids, ["subnet-a"]);
    assert_eq!(ec2.security_group_ids, ["sg-1", "sg-2"]);
    assert_eq!(
        ec2.default_image_id.as_deref(),
        Some("ami-1"),
        "file value kept"
    );
    let smtp = f.smtp.as_ref().expect("smtp");
    assert_eq!(smtp.host, "email-smtp.eu-west-1.amazonaws.com");
    assert_eq!(smtp.security, Security::Tls);
    assert_eq!(smtp.effective_port(), 465);
    assert_eq!(smtp.username.as_deref(), Some("AKIA/x"));
    assert_eq!(smtp.from, "ops@example.com");
    let debug = format!("{f:?}");
    assert!(
        !debug.contains("env@secret") && !debug.contains("env%40secret"),
        "{debug}"
    );

    // Without a file: the environment alone makes [ec2] and [smtp]; [kubernetes] is missing
    // and the check names it.
    let f = parse(
        "",
        env(&[
            ("SETPOINT_AWS_REGION", "us-east-1"),
            ("SETPOINT_SMTP_URL", "smtp://user:pw@relay:2525"),
            ("SETPOINT_EMAIL_FROM", "noreply@example.com"),
            ("SETPOINT_EC2_SUBNET_ID", ""),
        ]),
    )
    .expect("env");
    assert!(
        f.ec2
            .as_ref()
            .and_then(|e| e.only())
            .expect("ec2")
            .subnet_ids
            .is_empty()
    );
    let smtp = f.smtp.as_ref().expect("smtp");
    assert_eq!((smtp.host.as_str(), smtp.port), ("relay", Some(2525)));
    assert_eq!(smtp.security, Security::Starttls);
    let msg = complete(&f).unwrap_err();
    assert!(msg.contains("[kubernetes] missing"), "{msg}");
    assert!(msg.contains("[ec2], [smtp] given"), "{msg}");

    // Refining a section that does not exist is an error, not silently ignored.
    let err = parse("", env(&[("SETPOINT_EC2_SUBNET_ID", "subnet-a")])).unwrap_err();
    assert!(err.to_string().contains("SETPOINT_AWS_REGION"), "{err}");
    // A plan map that is not plan=type names the variable and shows the right form.
    let err = parse(
        "",
        env(&[
            ("SETPOINT_AWS_REGION", "us-east-1"),
            ("SETPOINT_EC2_PLAN_INSTANCE_TYPES", "kvx.small:t3.small"),
        ]),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("SETPOINT_EC2_PLAN_INSTANCE_TYPES")
            && err.to_string().contains("kvx.small=t3.small"),
        "{err}"
    );
    // A URL without a sender cannot make [smtp]; the error does not show the password.
    let err = parse("", env(&[("SETPOINT_SMTP_URL", "smtp://u:hunter2@relay")])).unwrap_err();
    assert!(err.to_string().contains("SETPOINT_EMAIL_FROM"), "{err}");
    assert!(!err.to_string().contains("hunter2"));
    // SETPOINT_EMAIL_FROM alone (no relay) leaves the workflows off.
    let f = parse("", env(&[("SETPOINT_EMAIL_FROM", "noreply@example.com")])).expect("env");
    assert!(f.smtp.is_none());
}

#[test]
fn smtp_url_parses_and_never_shows_the_password() {
    let e = SmtpEndpoint::parse("smtp://relay.internal").expect("plain");
    assert_eq!(e.host, "relay.internal");
    assert_eq!((e.port, e.security), (None, Security::Starttls));
    assert!(e.username.is_none() && e.password.is_none());

    let e = SmtpEndpoint::parse("smtp://127.0.0.1:1025?security=none").expect("none");
    assert_eq!((e.port, e.security), (Some(1025), Security::None));

    let e = SmtpEndpoint::parse("SMTPS://me:p%3Ass:w@[::1]:4650/").expect("v6");
    assert_eq!(e.host, "::1");
    assert_eq!((e.port, e.security), (Some(4650), Security::Tls));
    assert_eq!(e.username.as_deref(), Some("me"));
    assert!(e.password.is_some());
    let debug = format!("{e:?}");
    assert!(
        !debug.contains("p:ss") && !debug.contains("p%3Ass"),
        "{debug}"
    );
    assert!(debug.contains("***"), "{debug}");

    for bad in [
        "relay:25",
        "http://u:topsecret@relay",
        "smtp://u:topsecret@relay:port",
        "smtp://u:topsecret@",
        "smtp://u:top%zzsecret@relay",
        "smtp://u:topsecret@relay?security=maybe",
        "smtp://u:topsecret@relay?tls=1",
        "smtp://:topsecret@relay",
    ] {
        let err = SmtpEndpoint::parse(bad).expect_err(bad).to_string();
        assert!(err.contains("SETPOINT_SMTP_URL"), "{bad}: {err}");
        assert!(
            !err.contains("topsecret") && !err.contains("top%zz"),
            "{bad}: {err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `setpoint serve` as a process.

const LIMIT: Duration = Duration::from_secs(150);

/// A secrets key for the engines these tests start (32 zero bytes: a test key only).
const TEST_SECRETS_KEY: &str = "test:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("setpoint-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// `setpoint serve --config <file>` with JSON logs and none of the caller's SETPOINT_* or AWS
/// settings, so only the file (and `env`) configure it.
fn serve(config: &Path, env: &[(&str, &str)], args: &[&str]) -> EngineProcess {
    let mut cmd = serve_command(env);
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .args(args);
    EngineProcess::from_command(cmd)
}

/// `setpoint serve` with no flags: JSON logs, test AWS credentials, none of the caller's
/// SETPOINT_* settings, then `env`.
fn serve_command(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_setpoint"));
    cmd.arg("serve")
        .env("SETPOINT_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,sqlx=warn")
        .env("NO_COLOR", "1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // The KVX kind seals each instance's credentials: a key of the test's own.
        .env("SETPOINT_SECRETS_KEY", TEST_SECRETS_KEY)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("SETPOINT_") && k != "SETPOINT_LOG_FORMAT" {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Returns once the process printed a line containing `needle`.
async fn wait_printed(engine: &EngineProcess, needle: &str) {
    wait_for(needle, || async { engine.printed(needle).then_some(()) }).await
}

/// GET `path` over plain HTTP/1.0; the status line and body.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Creates instance `db-1` through the gRPC API at `api_addr` and waits until it is READY and
/// its "ready" mail is in `maildir`: every KVX step (EC2, Kubernetes, mail) ran.
async fn create_to_ready(
    engine: &EngineProcess,
    api_addr: &str,
    pool: &sqlx::PgPool,
    maildir: &Path,
) {
    let token = setpoint::api::auth::create_token(pool, "demo", false, None)
        .await
        .expect("token");
    let channel = tonic::transport::Channel::from_shared(format!("http://{api_addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let header = format!("Bearer {}", token.token).parse().expect("header");
    let mut api = InstanceServiceClient::with_interceptor(channel, Bearer(header));
    let created = api
        .create_instance(CreateInstanceRequest {
            parent: "tenants/demo".into(),
            instance_id: "db-1".into(),
            instance: Some(Instance {
                spec: Some(InstanceSpec {
                    plan: "kvx.small".into(),
                    region: "us-east-1".into(),
                    size_gb: 10,
                    owner_email: "owner@example.com".into(),
                }),
                ..Instance::default()
            }),
            request_id: "create-db-1".into(),
            bulk: false,
        })
        .await
        .expect("create")
        .into_inner();
    assert_ne!(created.status, InstanceStatus::Ready as i32);

    let start = std::time::Instant::now();
    loop {
        let got = api
            .get_instance(GetInstanceRequest {
                name: "tenants/demo/instances/db-1".into(),
            })
            .await
            .expect("get")
            .into_inner();
        if got.status == InstanceStatus::Ready as i32 {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "instance not ready: {got:?}\n{}",
            engine.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The "ready" mail arrived (setpoint.noop sends none): the KVX steps ran.
    wait_for("the ready mail", || {
        let s = subjects(maildir);
        async move { s.iter().any(|s| s.contains("db-1")).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_a_create_to_ready_against_real_peers() {
    let dir = tmp("create");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let (moto_port, smtp_port, maildir, k8s) = (
        peers.moto_port,
        peers.smtp_port,
        peers.maildir.clone(),
        &peers.k8s,
    );

    let config = dir.join("setpoint.toml");
    std::fs::write(
        &config,
        format!(
            r#"
database_url = "{db_url}"

[worker]
poll_interval = "100ms"
lease = "10s"
backoff_base = "200ms"
backoff_cap = "2s"

[ec2]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:{moto_port}"
default_image_id = "ami-12c6146b"

[ec2.timeouts]
poll_initial_ms = 200
poll_max_ms = 1000

[kubernetes]
access = {{ mode = "url", url = "http://{k8s_addr}" }}

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "setpoint <noreply@setpoint.test>"

[workflows]
drift = "mark"
"#,
            db_url = db.url,
            k8s_addr = k8s.addr(),
        ),
    )
    .expect("config");

    let engine = serve(&config, &[], &["--metrics-listen", "127.0.0.1:0"]);
    let api_addr = logged_addr(&engine, "gRPC API listening").await;
    let metrics_addr = logged_addr(&engine, "metrics, /healthz and /readyz listening").await;
    // Logged once the engine has started, which can be after the listeners are announced.
    wait_printed(&engine, "KVX workflows on").await;
    // The pods are not ready at first: the Kubernetes step waits for them (the owner is told
    // "ready" only after), then the rollout finishes and the chain goes on.
    k8s.hold_rollouts(true);
    let release = async {
        wait_for("the Kubernetes step to wait for its replicas", || {
            let pool = db.pool.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM work_events
                     WHERE event = 'failed' AND detail->>'code' = 'replicas-not-ready'",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                (n > 0).then_some(())
            }
        })
        .await;
        assert!(
            subjects(&maildir).is_empty(),
            "no mail before the replicas are ready"
        );
        k8s.hold_rollouts(false);
    };
    tokio::join!(
        create_to_ready(&engine, &api_addr, &db.pool, &maildir),
        release
    );

    // Metrics and health are served.
    let metrics_addr2 = metrics_addr.clone();
    let health = tokio::task::spawn_blocking(move || http_get(&metrics_addr2, "/healthz"))
        .await
        .expect("join")
        .expect("healthz");
    assert!(
        health.starts_with("HTTP/1.0 200") || health.starts_with("HTTP/1.1 200"),
        "{health}"
    );
    let metrics = tokio::task::spawn_blocking(move || http_get(&metrics_addr, "/metrics"))
        .await
        .expect("join")
        .expect("metrics");
    assert!(metrics.contains("setpoint_"), "{metrics}");
    assert!(
        metrics.contains("setpoint_api_requests_total")
            && metrics.contains("/setpoint.v1.InstanceService/CreateInstance"),
        "API calls are counted by method and code: {metrics}"
    );

    drop(engine);
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_with_only_some_adapters() {
    let dir = tmp("partial");
    let config = dir.join("setpoint.toml");
    // The check comes before the database: an unreachable one proves it.
    std::fs::write(
        &config,
        "database_url = \"postgres://setpoint:dbsecret@127.0.0.1:1/setpoint\"\n\
         [ec2]\nregion = \"us-east-1\"\n",
    )
    .expect("config");
    let mut engine = serve(&config, &[], &[]);
    assert!(!engine.wait_exit().await, "serve must fail");
    let out = engine.output();
    assert!(
        out.contains("[ec2] given but [kubernetes], [smtp] missing"),
        "{out}"
    );
    assert!(!out.contains("dbsecret"), "{out}");

    // The environment can make a section too; the message still names what is missing.
    std::fs::write(
        &config,
        "database_url = \"postgres://setpoint@127.0.0.1:1/setpoint\"\n\
         [kubernetes]\naccess = { mode = \"in-cluster\" }\n",
    )
    .expect("config");
    let mut engine = serve(
        &config,
        &[
            ("SETPOINT_AWS_REGION", "us-east-1"),
            (
                "SETPOINT_SMTP_URL",
                "smtp://u:smtpsecret@relay:587?security=maybe",
            ),
            ("SETPOINT_EMAIL_FROM", "noreply@example.com"),
        ],
        &[],
    );
    assert!(!engine.wait_exit().await, "serve must fail");
    let out = engine.output();
    assert!(out.contains("SETPOINT_SMTP_URL"), "{out}");
    assert!(!out.contains("smtpsecret"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_adapters_keeps_the_noop_kinds_and_says_so() {
    let dir = tmp("none");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let config = dir.join("setpoint.toml");
    std::fs::write(&config, format!("database_url = \"{}\"\n", db.url)).expect("config");
    let engine = serve(&config, &[], &[]);
    logged_addr(&engine, "gRPC API listening").await;
    // `serve` logs the notice once the engine has started, which can be after the API's
    // listener is announced: wait for it rather than read the log at one instant.
    let mut out = engine.output();
    for _ in 0..200 {
        if out.contains("KVX workflows off") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        out = engine.output();
    }
    let off: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("KVX workflows off"))
        .collect();
    assert_eq!(off.len(), 1, "{out}");
    assert!(off[0].contains("setpoint.noop"), "{out}");
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_or_environment_variable_overrides_the_file_either_way() {
    let dir = tmp("precedence");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let config = dir.join("setpoint.toml");
    std::fs::write(
        &config,
        format!("database_url = \"{}\"\nenable_probe = true\n", db.url),
    )
    .expect("config");
    for (env, args, probe) in [
        (vec![], vec![], true),
        (vec![("SETPOINT_ENABLE_PROBE", "false")], vec![], false),
        (vec![("SETPOINT_ENABLE_PROBE", "0")], vec![], false),
        (vec![], vec!["--enable-probe=false"], false),
        (
            vec![("SETPOINT_ENABLE_PROBE", "no")],
            vec!["--enable-probe"],
            true,
        ),
    ] {
        let engine = serve(&config, &env, &args);
        let kinds = logged_field(&engine, "worker started", "kinds").await;
        assert_eq!(
            kinds.contains("setpoint.probe"),
            probe,
            "{env:?} {args:?}: {kinds}"
        );
        drop(engine);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The environment the Terraform module gives the engine.

/// The default of string variable `name` in `terraform/modules/setpoint/variables.tf`.
fn module_variable_default(name: &str) -> String {
    let tf = std::fs::read_to_string(
        common::package_dir().join("terraform/modules/setpoint/variables.tf"),
    )
    .expect("variables.tf");
    let block = tf
        .split(&format!("variable \"{name}\" {{"))
        .nth(1)
        .unwrap_or_else(|| panic!("variable {name} in variables.tf"));
    block
        .lines()
        .find_map(|l| l.trim().strip_prefix("default"))
        .and_then(|rest| rest.split('"').nth(1))
        .unwrap_or_else(|| panic!("a string default of {name}"))
        .to_owned()
}

/// The environment variable names `terraform/modules/setpoint/ecs.tf` gives the engine
/// container: (always set, set only when an optional input is given). Secrets (ECS `secrets`)
/// count as always set.
fn module_environment_names() -> (Vec<String>, Vec<String>) {
    let ecs =
        std::fs::read_to_string(common::package_dir().join("terraform/modules/setpoint/ecs.tf"))
            .expect("ecs.tf");
    let start = ecs
        .find("module_environment = merge(")
        .expect("module_environment");
    let end = ecs[start..]
        .find("prometheus_config")
        .expect("end of the engine's settings")
        + start;
    let (mut always, mut optional) = (Vec::new(), Vec::new());
    for line in ecs[start..end].lines() {
        let line = line.trim();
        // `NAME = value` inside a map; an optional one reads `var.x == null ? {} : { NAME = … }`.
        let (conditional, entry) = match line.split_once("? {} : {") {
            Some((_, rest)) => (true, rest.trim()),
            None => (false, line),
        };
        let Some((name, _)) = entry.split_once('=') else {
            continue;
        };
        let name = name.trim();
        if (name.starts_with("SETPOINT_") || name == "RUST_LOG")
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            if conditional {
                &mut optional
            } else {
                &mut always
            }
            .push(name.to_owned());
        }
    }
    assert!(
        always.iter().any(|n| n == "SETPOINT_KUBERNETES_TOKEN"),
        "ecs.tf parsed: {always:?} {optional:?}"
    );
    (always, optional)
}

/// A subnet and a security group of moto's default VPC (the module passes ids that exist).
async fn moto_network(moto: &str) -> (String, String) {
    let mut config = setpoint_ec2::Ec2Config::new("us-east-1");
    config.endpoint_url = Some(moto.to_owned());
    let ec2 = config
        .client_with_credentials(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .await
        .expect("ec2 client");
    let subnets = ec2.describe_subnets().send().await.expect("subnets");
    let subnet = subnets.subnets()[0]
        .subnet_id()
        .expect("subnet id")
        .to_owned();
    let groups = ec2
        .describe_security_groups()
        .send()
        .await
        .expect("security groups");
    let group = groups.security_groups()[0]
        .group_id()
        .expect("group id")
        .to_owned();
    (subnet, group)
}

/// `setpoint serve` started the way the module's ECS task starts it (no config file, no flags,
/// exactly the environment names `ecs.tf` sets) becomes ready and runs a create to READY. The
/// values point at local peers; where they must differ from AWS, the comments say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_with_exactly_the_terraform_module_environment() {
    let dir = tmp("module-env");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    // The API server accepts only the service account's token (401 otherwise, a permanent
    // error that would leave the instance FAILED): READY proves the engine sent it.
    let k8s_token = "eyJhbGciOiJSUzI1NiJ9.service-account-token";
    peers.k8s.require_token(Some(k8s_token));
    let (subnet, group) = moto_network(&peers.moto).await;

    let (always, optional) = module_environment_names();
    let db_port = db
        .url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(port, _)| port.to_owned())
        .expect("port in the test database URL");
    let listen = format!("127.0.0.1:{}", common::peers::free_port());
    let metrics = format!("127.0.0.1:{}", common::peers::free_port());
    let k8s_url = peers.k8s.url();
    // As an ECS secret arrives: the value as stored, here with the newline `kubectl` prints.
    let k8s_token_secret = format!("{k8s_token}\n");
    let smtp_url = format!("smtp://{}?security=none", peers.smtp);
    let env: Vec<(&str, &str)> = vec![
        ("SETPOINT_DATABASE_HOST", "127.0.0.1"),
        ("SETPOINT_DATABASE_PORT", &db_port),
        ("SETPOINT_DATABASE_NAME", &db.name),
        ("SETPOINT_DATABASE_USER", "postgres"),
        // The test cluster trusts local connections, so any password is accepted; it has no TLS,
        // so `prefer` stands in for the module's `require` (RDS has TLS).
        ("SETPOINT_DATABASE_PASSWORD", "from-secrets-manager"),
        ("SETPOINT_DATABASE_SSLMODE", "prefer"),
        ("SETPOINT_SHUTDOWN_GRACE", "5s"),
        ("SETPOINT_LOG_FORMAT", "json"),
        ("SETPOINT_LISTEN", &listen),
        ("SETPOINT_METRICS_LISTEN", &metrics),
        ("SETPOINT_AWS_REGION", "us-east-1"),
        ("SETPOINT_EC2_SUBNET_ID", &subnet),
        ("SETPOINT_EC2_SECURITY_GROUP_IDS", &group),
        ("SETPOINT_EC2_IMAGE_ID", "ami-12c6146b"),
        (
            "SETPOINT_EC2_PLAN_INSTANCE_TYPES",
            "kvx.small=t3.small,kvx.medium=t3.medium,kvx.large=t3.large",
        ),
        // The test server speaks plain http on loopback, the one place a token may go without
        // TLS; so no CA bundle here (it is optional in the module, and only valid with https).
        ("SETPOINT_KUBERNETES_URL", &k8s_url),
        ("SETPOINT_KUBERNETES_TOKEN", &k8s_token_secret),
        (
            "SETPOINT_KUBERNETES_IMAGE",
            "registry.example.com/kvx-proxy:1.4",
        ),
        // aiosmtpd offers neither STARTTLS nor AUTH; SES SMTP gets smtp://USER:PASS@…:587.
        ("SETPOINT_SMTP_URL", &smtp_url),
        ("SETPOINT_EMAIL_FROM", "noreply@setpoint.test"),
        // From the Secrets Manager secret the module names (`secrets_key_secret_arn`).
        ("SETPOINT_SECRETS_KEY", TEST_SECRETS_KEY),
        ("RUST_LOG", "info,sqlx=warn"),
    ];
    let names: Vec<&str> = env.iter().map(|(k, _)| *k).collect();
    for name in &always {
        assert!(
            names.contains(&name.as_str()),
            "the module sets {name}; this test must too"
        );
    }
    for name in &names {
        assert!(
            always.iter().chain(&optional).any(|n| n == name),
            "{name} is not set by the module"
        );
    }

    // Not setpoint settings: in ECS the task role gives credentials and EC2 is AWS itself.
    let mut cmd = serve_command(&env);
    cmd.env("AWS_ENDPOINT_URL_EC2", &peers.moto);
    let engine = EngineProcess::from_command(cmd);
    let api_addr = logged_addr(&engine, "gRPC API listening").await;
    assert_eq!(api_addr, listen);
    // Logged once the engine has started, which can be after the listeners are announced.
    wait_printed(&engine, "KVX workflows on").await;

    // Ready, as a load balancer or ECS health check would ask.
    let ready = wait_for("/readyz to answer 200", || {
        let metrics = metrics.clone();
        async move {
            tokio::task::spawn_blocking(move || http_get(&metrics, "/readyz"))
                .await
                .ok()
                .flatten()
                .filter(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
        }
    })
    .await;
    assert!(!ready.is_empty());

    // The gauges the module's CloudWatch alarms read exist under the names it expects.
    for variable in ["queue_age_metric_name", "parked_units_metric_name"] {
        let name = module_variable_default(variable);
        wait_for(&format!("/metrics to show {name}"), || {
            let metrics = metrics.clone();
            let name = name.clone();
            async move {
                tokio::task::spawn_blocking(move || http_get(&metrics, "/metrics"))
                    .await
                    .ok()
                    .flatten()
                    .filter(|body| body.lines().any(|l| l.starts_with(&format!("{name} "))))
            }
        })
        .await;
    }

    create_to_ready(&engine, &api_addr, &db.pool, &peers.maildir).await;
    // The plan's instance type came from the module's plan map.
    let launched: Option<String> = sqlx::query_scalar(
        "SELECT observed->'machine'->>'instance_type' FROM instances WHERE name = 'db-1'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("instance");
    assert_eq!(launched.as_deref(), Some("t3.small"));
    let out = engine.output();
    assert!(
        !out.contains("service-account-token"),
        "the token was logged: {out}"
    );

    drop(engine);
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
}
