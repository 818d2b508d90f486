//! The custom engine binary as an operator runs it, against real peers: a throw-away
//! PostgreSQL and a webhook receiver (a real HTTP server in this test). It checks what the
//! plugin promises end to end: a signed POST with the unit's key, the same key on a retry after
//! a 503, a refusal parked with the endpoint's answer, the plugin's migration and table, its
//! gRPC service behind the API's authentication, its readiness check, a bad configuration key
//! refused by name, a graceful stop — and that the signing secret appears in no log line.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use custom_engine::proto::ListDeliveriesRequest;
use custom_engine::proto::delivery_service_client::DeliveryServiceClient;
use custom_engine::signing::idempotency_key;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use setpoint::queue::{self, NewWork};
use setpoint_adapter::IdempotencyToken;
use sha2::Sha256;
use sqlx::PgPool;
use tonic::Code;
use uuid::Uuid;

/// The engine binary under test, running; killed when dropped.
struct Engine {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Engine {
    /// Starts the binary with `config` (written to a file in `dir`) against `database_url`,
    /// logging at debug level (so that a leak anywhere in the engine's or the plugin's logs
    /// would show).
    fn start(dir: &Path, database_url: &str, config: &str, secret: Option<&str>) -> Self {
        let path = dir.join("engine.toml");
        std::fs::write(&path, config).expect("write the config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_custom-engine"));
        cmd.arg("--config")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "debug,sqlx=info")
            .env_remove("SETPOINT_WEBHOOK_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(s) = secret {
            cmd.env("SETPOINT_WEBHOOK_SECRET", s);
        }
        let mut child = cmd.spawn().expect("spawn custom-engine");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("stdout")),
        ] {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    sink.lock().expect("lines").push(line);
                }
            });
        }
        Self { child, lines }
    }

    fn log(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// The address the engine printed for `field` (`api`, `metrics`) once running.
    async fn addr(&mut self, field: &str) -> SocketAddr {
        let prefix = format!("{field}=");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("the engine exited with {status}:\n{}", self.log());
            }
            let found = {
                let lines = self.lines.lock().expect("lines");
                lines
                    .iter()
                    .filter(|l| l.contains("custom engine running"))
                    .flat_map(|l| l.split_whitespace())
                    .find_map(|w| w.strip_prefix(&prefix).and_then(|v| v.parse().ok()))
            };
            if let Some(addr) = found {
                return addr;
            }
            assert!(
                start.elapsed() < HUNG,
                "the engine did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit on its own: its status and everything it printed. Async,
    /// so that this test's clients keep answering the engine while it shuts down (a server's
    /// graceful stop waits for its connections to close).
    async fn exit(mut self) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // The reader threads finish with the pipes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return (status, self.log());
            }
            assert!(
                start.elapsed() < HUNG,
                "the engine did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(url: &str) -> String {
    format!(
        r#"
[worker]
poll_interval = "100ms"
backoff_base = "100ms"
backoff_cap = "1s"

[plugins.webhook]
url = "{url}"
timeout = "2s"
"#
    )
}

/// Enqueues a `webhook.notify` unit of `event` for a resource of `tenant`, as another plugin's
/// step would: beside its resource (a notification never holds it).
async fn notify(pool: &PgPool, tenant: &str, event: &str) -> (i64, IdempotencyToken) {
    let unit = NewWork::new(
        "webhook.notify",
        json!({"event": event, "data": {"instance": "web-1", "state": "ready"}}),
    )
    .for_resource(Uuid::new_v4(), tenant)
    .beside_resource();
    let token = unit.token.clone();
    let mut tx = pool.begin().await.expect("begin");
    let enqueued = queue::enqueue(&mut tx, unit).await.expect("enqueue");
    tx.commit().await.expect("commit");
    (enqueued.id, token)
}

/// The unit's state, or `None` once it finished (its row is gone), with its last error.
async fn unit(pool: &PgPool, id: i64) -> (Option<String>, Option<String>, Vec<String>) {
    let mut conn = pool.acquire().await.expect("conn");
    let report = queue::show(&mut conn, &id.to_string()).await.expect("unit");
    let events = report.events.iter().map(|e| e.event.clone()).collect();
    match report.row {
        Some(row) => (Some(row.state), row.last_error, events),
        None => (None, None, events),
    }
}

async fn wait_finished(pool: &PgPool, id: i64) -> Vec<String> {
    wait_for(&format!("unit {id} to finish"), || async {
        let (state, _, events) = unit(pool, id).await;
        state.is_none().then_some(events)
    })
    .await
}

fn assert_signed(r: &Received) {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&r.body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.signature.as_deref(), Some(want.as_str()), "signature");
    assert!(custom_engine::signing::verify(
        SECRET.as_bytes(),
        &r.body,
        &want
    ));
}

async fn client(api: SocketAddr) -> DeliveryServiceClient<tonic::transport::Channel> {
    DeliveryServiceClient::connect(format!("http://{api}"))
        .await
        .expect("connect to the API")
}

fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    req
}

#[tokio::test]
async fn the_engine_delivers_signed_notifications_and_serves_their_records() {
    let db = db().await;
    let receiver = Receiver::start().await;
    let dir = TempDir::new();
    let mut engine = Engine::start(&dir.0, &db.url, &config(&receiver.url()), Some(SECRET));
    let api = engine.addr("api").await;
    let metrics = engine.addr("metrics").await;

    // The plugin's migration ran, in its own migration table.
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _setpoint_plugin_webhook_migrations")
            .fetch_all(&db.pool)
            .await
            .expect("the plugin's migration table");
    assert_eq!(versions, vec![1]);
    let table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('webhook_deliveries')::text")
            .fetch_one(&db.pool)
            .await
            .expect("query");
    assert_eq!(table.as_deref(), Some("webhook_deliveries"));

    // One unit, one signed POST, keyed by the unit's token.
    let (ready_id, ready_token) = notify(&db.pool, "acme", "instance.ready").await;
    let events = wait_finished(&db.pool, ready_id).await;
    assert!(events.contains(&"succeeded".to_owned()), "{events:?}");
    let key = idempotency_key(&ready_token).to_string();
    let got = receiver.with_key(&key);
    assert_eq!(got.len(), 1, "exactly one POST: {got:?}");
    let post = &got[0];
    assert_eq!(
        (post.method.as_str(), post.path.as_str()),
        ("POST", "/hooks/setpoint")
    );
    assert_eq!(post.content_type.as_deref(), Some("application/json"));
    assert_signed(post);
    let body = post.json();
    assert_eq!(body["id"], key);
    assert_eq!(body["event"], "instance.ready");
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["work_id"], ready_id);
    assert_eq!(body["data"]["instance"], "web-1");

    // A 503 is retried, with the same key, the same body and a valid signature.
    let (flaky_id, flaky_token) = notify(&db.pool, "acme", "flaky").await;
    let events = wait_finished(&db.pool, flaky_id).await;
    assert!(
        events.contains(&"failed".to_owned()),
        "the 503 is in the history: {events:?}"
    );
    let got = receiver.with_key(&idempotency_key(&flaky_token).to_string());
    assert_eq!(got.len(), 2, "the 503, then the accepted retry: {got:?}");
    assert_eq!(got[0].body, got[1].body, "a retry sends the same bytes");
    got.iter().for_each(assert_signed);
    let answers: Vec<(i32, i32, bool)> = sqlx::query_as(
        "SELECT attempt, status_code, delivered_at IS NOT NULL FROM webhook_deliveries
          WHERE work_id = $1 ORDER BY id",
    )
    .bind(flaky_id)
    .fetch_all(&db.pool)
    .await
    .expect("deliveries");
    assert_eq!(answers, vec![(1, 503, false), (2, 200, true)]);

    // A POST whose answer is lost (the endpoint is slower than the 2 s timeout) is sent again
    // with the same key: the endpoint recognises it.
    let (slow_id, slow_token) = notify(&db.pool, "acme", "slow").await;
    wait_finished(&db.pool, slow_id).await;
    let got = receiver.with_key(&idempotency_key(&slow_token).to_string());
    assert_eq!(got.len(), 2, "the timed-out POST and its retry: {got:?}");
    assert_eq!(got[0].body, got[1].body);

    // A 400 is permanent: parked at once, with the endpoint's answer, after one POST.
    let (refused_id, refused_token) = notify(&db.pool, "acme", "refused").await;
    let (state, error) = wait_for("the refused unit to be parked", || async {
        match unit(&db.pool, refused_id).await {
            (Some(s), e, _) if s == "parked" => Some((s, e)),
            _ => None,
        }
    })
    .await;
    assert_eq!(state, "parked");
    let error = error.unwrap_or_default();
    assert!(
        error.contains("400 Bad Request") && error.contains("unknown event type: refused"),
        "{error}"
    );
    assert_eq!(
        receiver
            .with_key(&idempotency_key(&refused_token).to_string())
            .len(),
        1
    );

    // The gRPC service: a tenant sees its own deliveries, another tenant none, and a call
    // without a token is refused by the API's gate.
    let acme = setpoint::api::auth::create_token(&db.pool, "acme", false, None)
        .await
        .expect("token");
    let globex = setpoint::api::auth::create_token(&db.pool, "globex", false, None)
        .await
        .expect("token");
    let mut grpc = client(api).await;
    let listed = grpc
        .list_deliveries(authorized(ListDeliveriesRequest::default(), &acme.token))
        .await
        .expect("ListDeliveries")
        .into_inner()
        .deliveries;
    let mut seen: Vec<(i64, i32)> = listed.iter().map(|d| (d.work_id, d.status_code)).collect();
    seen.sort_unstable();
    let mut want = vec![
        (ready_id, 200),
        (flaky_id, 503),
        (flaky_id, 200),
        (slow_id, 200),
        (refused_id, 400),
    ];
    want.sort_unstable();
    assert_eq!(seen, want, "{listed:?}");
    let accepted = listed
        .iter()
        .find(|d| d.work_id == ready_id)
        .expect("the ready notification");
    assert_eq!(accepted.idempotency_key, key);
    assert_eq!(accepted.event, "instance.ready");
    assert!(accepted.delivered_at.is_some() && accepted.answered_at.is_some());
    let one = grpc
        .list_deliveries(authorized(
            ListDeliveriesRequest {
                work_id: flaky_id,
                limit: 1,
            },
            &acme.token,
        ))
        .await
        .expect("ListDeliveries of one unit")
        .into_inner()
        .deliveries;
    assert_eq!(
        one.iter()
            .map(|d| (d.work_id, d.attempt, d.status_code))
            .collect::<Vec<_>>(),
        vec![(flaky_id, 2, 200)],
        "newest first"
    );
    let other = grpc
        .list_deliveries(authorized(ListDeliveriesRequest::default(), &globex.token))
        .await
        .expect("ListDeliveries as globex")
        .into_inner()
        .deliveries;
    assert!(other.is_empty(), "another tenant's deliveries: {other:?}");
    let refused = grpc
        .list_deliveries(ListDeliveriesRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let bad = grpc
        .list_deliveries(authorized(
            ListDeliveriesRequest {
                limit: 100_000,
                work_id: 0,
            },
            &acme.token,
        ))
        .await
        .expect_err("limit out of range");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");

    // The readiness check follows the endpoint: ready while it listens, not ready (naming it)
    // once it is gone.
    let http = reqwest::Client::new();
    let readyz = format!("http://{metrics}/readyz");
    let ready = http.get(&readyz).send().await.expect("/readyz");
    assert_eq!(
        ready.status(),
        200,
        "{}",
        ready.text().await.unwrap_or_default()
    );
    receiver.stop();
    let why = wait_for("/readyz to fail without the endpoint", || async {
        let r = http.get(&readyz).send().await.ok()?;
        (r.status() == 503).then_some(())?;
        r.text().await.ok()
    })
    .await;
    assert!(why.contains("webhook endpoint"), "{why}");

    // SIGTERM stops the engine gracefully.
    let pid = engine.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let (status, log) = engine.exit().await;
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(log.contains("custom engine stopped"), "{log}");

    // The secret appears nowhere in what the engine printed, at debug level, over all of it.
    assert!(log.lines().count() > 20, "the log was captured:\n{log}");
    assert!(
        !log.contains(SECRET),
        "the signing secret leaked into the log"
    );
}

#[tokio::test]
async fn a_bad_configuration_is_refused_by_name_without_the_secret() {
    let db = db().await;
    let dir = TempDir::new();
    let dir = &dir.0;
    let misspelt = r#"
[plugins.webhook]
url = "http://127.0.0.1:9/hooks"
timeot = "2s"
"#;
    let (status, log) = Engine::start(dir, &db.url, misspelt, Some(SECRET))
        .exit()
        .await;
    assert!(!status.success());
    assert!(
        log.contains("plugin webhook") && log.contains("unknown field `timeot`"),
        "{log}"
    );
    assert!(!log.contains(SECRET), "{log}");

    let no_secret = "[plugins.webhook]\nurl = \"http://127.0.0.1:9/hooks\"\n";
    let (status, log) = Engine::start(dir, &db.url, no_secret, None).exit().await;
    assert!(!status.success());
    assert!(log.contains("SETPOINT_WEBHOOK_SECRET is not set"), "{log}");

    let credentials = "[plugins.webhook]\nurl = \"http://hook:pa55word@127.0.0.1:9/\"\n";
    let (status, log) = Engine::start(dir, &db.url, credentials, Some(SECRET))
        .exit()
        .await;
    assert!(!status.success());
    assert!(log.contains("must not carry credentials"), "{log}");
    assert!(!log.contains("pa55word") && !log.contains(SECRET), "{log}");
}

/// A folder for this test's files, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("custom-engine-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
