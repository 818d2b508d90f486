//! Helpers shared by the engine's integration tests: databases, runtimes, child engine
//! processes, and waiting for a condition (with a generous limit that only guards against a
//! hung test; no test asserts on speed).

#![allow(dead_code)]

pub mod awsproxy;
pub mod certs;
#[cfg(all(
    feature = "ec2",
    feature = "kubernetes",
    feature = "email",
    feature = "dns"
))]
pub mod peers;
#[cfg(all(feature = "ec2", feature = "kubernetes", feature = "email"))]
pub mod stack;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use setpoint::dev::testdb::{TestDb, test_db};
use setpoint::worker::builtin::Probe;
use setpoint::{Registry, Runtime, WorkerConfig};
use setpoint_adapter::typed;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any wait may take before the test is declared hung.
pub const HUNG: Duration = Duration::from_secs(120);

/// Runs the `setpoint` binary under test with `args`, as a user would, against `database`
/// (as `SETPOINT_DATABASE_URL`) when one is given: (success, stdout, stderr).
pub fn setpoint(database: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_setpoint"));
    cmd.args(args);
    if let Some(url) = database {
        cmd.env("SETPOINT_DATABASE_URL", url);
    }
    let out = cmd.output().expect("run setpoint");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh database with the `probe_runs` table the probe kind records into.
pub async fn db() -> TestDb {
    let db = test_db().await.expect("test database");
    sqlx::query(
        "CREATE TABLE probe_runs (work_id bigint, token text, attempt int, worker text,
                                  phase text, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .execute(&db.pool)
    .await
    .expect("probe_runs");
    db
}

/// Polls `f` until it returns `Some`, panicking after [`HUNG`].
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < HUNG, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the work table is empty.
pub async fn wait_drained(pool: &PgPool) {
    wait_for("the queue to drain", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work")
            .fetch_one(pool)
            .await
            .ok()?;
        (n == 0).then_some(())
    })
    .await
}

/// A worker config for tests: short intervals so tests run fast.
pub fn fast_config(worker_id: &str) -> WorkerConfig {
    WorkerConfig {
        concurrency: 16,
        claim_batch: 16,
        lease: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(500),
        poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(10),
        backoff: setpoint::worker::Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        },
        worker_id: Some(worker_id.to_owned()),
        ..WorkerConfig::default()
    }
}

/// A runtime running in this process; stop it with [`InProcess::stop`].
pub struct InProcess {
    pub stop: CancellationToken,
    pub handle: JoinHandle<()>,
}

impl InProcess {
    /// Cancels the runtime and waits for its graceful shutdown.
    pub async fn stop(self) {
        self.stop.cancel();
        self.handle.await.expect("runtime task");
    }
}

/// Starts a runtime with the probe kind and `extra` handlers.
pub fn start_runtime(pool: &PgPool, config: WorkerConfig, extra: Registry) -> InProcess {
    let mut registry = extra;
    let id = config.worker_id.clone().expect("worker id");
    registry
        .register(typed(Probe::new(pool.clone(), id)))
        .expect("register probe");
    registry
        .register(typed(setpoint::worker::builtin::Noop))
        .expect("register noop");
    let runtime = Runtime::new(pool.clone(), registry, config)
        .expect("runtime")
        .with_hooks(std::sync::Arc::new(setpoint::kinds::Chains::new(
            std::sync::Arc::new(setpoint::kinds::KindCatalog::new()),
            std::sync::Arc::new(setpoint::kinds::SecretBox::none()),
            pool.clone(),
        )));
    let stop = CancellationToken::new();
    let handle = tokio::spawn(runtime.run(stop.clone()));
    InProcess { stop, handle }
}

/// A `setpoint serve` child process; killed (SIGKILL) when dropped.
pub struct EngineProcess {
    pub child: Child,
    pub worker_id: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl EngineProcess {
    /// Starts `setpoint serve` against `url` with the probe kind, extra env and args.
    pub fn start(url: &str, worker_id: &str, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_setpoint"));
        cmd.args([
            "serve",
            "--enable-probe",
            "--poll-interval",
            "100ms",
            "--lease",
            "2s",
        ])
        .args(["--worker-id", worker_id, "--backoff-base", "100ms"])
        // Several engines run at once: each API on a port of its own.
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("SETPOINT_DATABASE_URL", url)
        .env("RUST_LOG", "info,sqlx=warn")
        .env_remove("SETPOINT_FAILPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut this = Self::from_command(cmd);
        this.worker_id = worker_id.to_owned();
        this
    }

    /// Runs `cmd` (whose stderr must be piped) as an engine process.
    pub fn from_command(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("spawn setpoint");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Self {
            child,
            worker_id: String::new(),
            lines,
        }
    }

    /// True once the process printed a line containing `needle`.
    pub fn printed(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT", "TERM").
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// Waits for the process to exit and returns whether it exited successfully.
    pub async fn wait_exit(&mut self) -> bool {
        wait_for("the engine process to exit", || {
            let r = self.child.try_wait().expect("try_wait");
            async move { r }
        })
        .await
        .success()
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The secrets key the engines under test encrypt with (`SETPOINT_SECRETS_KEY`).
pub const TEST_SECRETS_KEY: &str = "test:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// `setpoint serve --config CONFIG` as worker `id`, with JSON logs, ports of its own and
/// dummy AWS credentials; none of the caller's `SETPOINT_*` or `AWS_*` variables leak in.
pub fn serve(config: &std::path::Path, id: &str) -> EngineProcess {
    serve_with(config, id, &[])
}

/// [`serve`] with more arguments (`--kinds dns.*`).
pub fn serve_with(config: &std::path::Path, id: &str, args: &[&str]) -> EngineProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_setpoint"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SETPOINT_") || k.starts_with("AWS_") {
            cmd.env_remove(&k);
        }
    }
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--worker-id", id])
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("SETPOINT_LOG_FORMAT", "json")
        .env(
            "RUST_LOG",
            "info,sqlx=warn,aws_smithy_runtime=warn,setpoint::worker=warn",
        )
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("SETPOINT_SECRETS_KEY", TEST_SECRETS_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut engine = EngineProcess::from_command(cmd);
    engine.worker_id = id.to_owned();
    engine
}

/// The gRPC API address an engine started by [`serve`] printed (`host:port`), once it did.
pub async fn api_addr_of(engine: &EngineProcess) -> String {
    logged_addr(engine, "gRPC API listening").await
}

/// The `addr` field of the engine's first JSON log line with message `message`, once there.
pub async fn logged_addr(engine: &EngineProcess, message: &str) -> String {
    logged_field(engine, message, "addr").await
}

/// String field `field` of the engine's first JSON log line with message `message`, once
/// there is one.
pub async fn logged_field(engine: &EngineProcess, message: &str, field: &str) -> String {
    wait_for(message, || {
        let out = engine.output();
        async move {
            out.lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["fields"]["message"] == message)
                    .then(|| v["fields"][field].as_str().map(str::to_owned))
                    .flatten()
            })
        }
    })
    .await
}

/// Units parked plus `parked` events: what tests that promise "no unit parks" keep at 0.
pub async fn parked(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM work WHERE state = 'parked')
              + (SELECT count(*) FROM work_events WHERE event = 'parked')",
    )
    .fetch_one(pool)
    .await
    .expect("parked")
}

/// Events of `event` kind per unit: (work_id, count).
pub async fn event_counts(pool: &PgPool, event: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT work_id, count(*) FROM work_events WHERE event = $1 GROUP BY work_id ORDER BY work_id",
    )
    .bind(event)
    .fetch_all(pool)
    .await
    .expect("event counts")
}

/// The events of one unit as (event, attempt, worker).
pub async fn history(pool: &PgPool, work_id: i64) -> Vec<(String, Option<i32>, Option<String>)> {
    sqlx::query_as("SELECT event, attempt, worker FROM work_events WHERE work_id = $1 ORDER BY id")
        .bind(work_id)
        .fetch_all(pool)
        .await
        .expect("history")
}

/// The package's directory, as cargo gives it to the running test: `env!` alone would keep
/// the directory of the checkout the binary was built in, and cargo reuses a test binary that
/// another checkout of the same sources built into a shared `CARGO_TARGET_DIR`.
pub fn package_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    )
}
