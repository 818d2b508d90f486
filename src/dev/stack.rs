//! `setpoint dev`: the whole stack on one machine with no cloud account.
//!
//! It starts what is not given on the command line — a PostgreSQL kept under `--dir`, a moto
//! server (EC2 and Route 53), an aiosmtpd SMTP server writing a Maildir under `--dir`, the
//! Kubernetes [`TestApiServer`] — then an engine serving the KVX and DNS kinds, with
//! retention (its defaults), the gRPC API and the metrics endpoint; it creates an admin token
//! and a tenant token and prints how to connect. Missing
//! Python peers are installed with pip on first use. `Ctrl-C` (or SIGTERM) stops everything it
//! started; a child peer also stops by itself when this process dies (a watchdog in its shell),
//! so even SIGKILL leaves no stray server behind.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::Credentials;
use clap::Args;
use serde_json::json;
use setpoint_ec2::{Ec2Config, Ec2Regions, PlanConfig};
use setpoint_email::{Security, SmtpConfig};
use setpoint_kubernetes::{KubernetesConfig, TestApiServer};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig};
use crate::config::parse_duration;
use crate::dev::postgres::{ClusterOptions, TempCluster, free_port};
use crate::engine::EngineBuilder;
use crate::plugins::dns::DnsPlugin;
use crate::plugins::ec2::{Ec2Plugin, Ec2Settings};
use crate::plugins::email::{EmailPlugin, SmtpSettings};
use crate::plugins::kubernetes::{KubernetesPlugin, KubernetesSettings};
use crate::plugins::kvx::{KvxConfig, KvxPlugin};
use crate::{WorkerConfig, metrics, store};

/// The EC2 instance type of each plan on the dev stack (moto accepts any type).
pub const DEV_PLAN_SIZES: &[(&str, &str)] = &[
    ("kvx.small", "t3.small"),
    ("kvx.medium", "t3.medium"),
    ("kvx.large", "t3.large"),
];

/// The flags of `setpoint dev`.
#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Folder for the PostgreSQL data, the Maildir and peer logs (kept between runs).
    #[arg(long, env = "SETPOINT_DEV_DIR", default_value = ".setpoint/dev")]
    pub dir: PathBuf,
    /// Address of the gRPC API.
    #[arg(long, env = "SETPOINT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "SETPOINT_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,
    /// Address of the web console (`docs/console.md`).
    #[arg(
        long,
        env = "SETPOINT_CONSOLE_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub console_listen: SocketAddr,
    /// Also run units of kind `setpoint.probe` (behaves as its spec says: fail, park, sleep),
    /// for trying the console's work page and for tests.
    #[arg(long)]
    pub enable_probe: bool,
    /// Use this database instead of starting one.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Use this EC2 endpoint (a running moto server) instead of starting one.
    #[arg(long)]
    pub ec2_endpoint: Option<String>,
    /// Use this SMTP server (`host:port`, plain SMTP) instead of starting aiosmtpd.
    #[arg(long)]
    pub smtp: Option<String>,
    /// Use this Kubernetes API URL (no credentials) instead of the built-in test server.
    #[arg(long)]
    pub kubernetes_url: Option<String>,
    /// The tenant of the printed tokens.
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    /// Enqueue an observe unit per ready instance this often (drift detection); off when unset.
    #[arg(long, env = "SETPOINT_RESYNC_INTERVAL", value_parser = parse_duration)]
    pub resync_interval: Option<Duration>,
    /// What to do with a machine terminated behind setpoint's back: heal or mark.
    #[arg(long, env = "SETPOINT_DRIFT", default_value = "heal", value_parser = ["heal", "mark"])]
    pub drift: String,
    /// The regions the local engine serves (machines land in moto's region of that name).
    #[arg(long, value_delimiter = ',', default_value = "us-east-1,us-west-2")]
    pub regions: Vec<String>,
    /// Lease of a claimed unit.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Poll interval of the workers.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Units run at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Longest retry delay after transient failures (the chaos soak shortens it, so that its
    /// time to converge measures the engine rather than a long backoff).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub backoff_cap: Duration,
    /// Also write the connection details as JSON to this file (for scripts and tests).
    #[arg(long)]
    pub info_file: Option<PathBuf>,
    /// How often the orphan sweep runs (`[orphans] interval`; 10m when unset).
    #[arg(long, value_parser = parse_duration)]
    pub orphans_interval: Option<Duration>,
    /// Let the orphan sweep terminate `unknown-resource` and `extra` machines once older than
    /// `--orphans-min-age` (`[orphans] terminate`; docs/faults.md says what it risks).
    #[arg(long)]
    pub orphans_terminate: bool,
    /// The age a machine needs before the orphan sweep terminates it (`[orphans] min_age`).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub orphans_min_age: Duration,
    /// How long one EC2 call may take (`[ec2.timeouts] attempt_ms`). moto answers a filtered
    /// describe in time proportional to the machines of the region times every tag it holds,
    /// so tests with thousands of machines give it longer.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub ec2_attempt_timeout: Duration,
}

impl DevArgs {
    /// The `[orphans]` table these flags make.
    fn orphans_table(&self) -> toml::Value {
        let mut t = toml::map::Map::new();
        if let Some(i) = self.orphans_interval {
            t.insert("interval".into(), format!("{}ms", i.as_millis()).into());
        }
        t.insert("terminate".into(), self.orphans_terminate.into());
        t.insert(
            "min_age".into(),
            format!("{}ms", self.orphans_min_age.as_millis()).into(),
        );
        toml::Value::Table(t)
    }
}

/// Why `setpoint dev` could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A peer could not be started.
    #[error("{0}")]
    Peer(String),
    /// PostgreSQL could not be started.
    #[error(transparent)]
    Postgres(#[from] crate::dev::postgres::ClusterError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The API could not start.
    #[error(transparent)]
    Api(#[from] api::ServeError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// Anything else at start-up (configuration, file I/O).
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> DevError {
    DevError::Other(e.to_string())
}

/// A child peer in its own process group; the group is terminated on drop.
struct Peer {
    name: &'static str,
    child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let pgid = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &pgid])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        tracing::info!(peer = self.name, "stopped");
    }
}

/// Makes sure `python3 -c "import {module}"` works, installing `package` with pip if not.
fn ensure_python_module(module: &str, package: &str) -> Result<(), DevError> {
    let ok = |m: &str| {
        Command::new("python3")
            .args(["-c", &format!("import {m}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ok(module) {
        return Ok(());
    }
    eprintln!(
        "setpoint dev: Python module {module} is missing; installing {package} with pip (first use only)…"
    );
    for extra in [&[][..], &["--break-system-packages"][..]] {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", package])
            .args(extra)
            .status()
            .map_err(|e| DevError::Peer(format!("cannot run python3 -m pip: {e}")))?;
        if status.success() && ok(module) {
            return Ok(());
        }
    }
    Err(DevError::Peer(format!(
        "could not install {package}; install it yourself (`python3 -m pip install '{package}'` \
         or your distribution's package), or pass the peer's address to `setpoint dev`"
    )))
}

/// Starts `script` (a shell command line) as a peer that stops when this process dies.
fn spawn_peer(name: &'static str, script: &str, log: &Path) -> Result<Peer, DevError> {
    use std::os::unix::process::CommandExt;
    let me = std::process::id();
    let watched = format!(
        "{script} & c=$!; trap 'kill $c 2>/dev/null; exit 0' TERM INT; \
         while kill -0 {me} 2>/dev/null && kill -0 $c 2>/dev/null; do sleep 0.5; done; \
         kill $c 2>/dev/null; wait $c"
    );
    let log = std::fs::File::create(log).map_err(other)?;
    let child = Command::new("sh")
        .args(["-c", &watched])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(other)?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| DevError::Peer(format!("cannot start {name}: {e}")))?;
    Ok(Peer { name, child })
}

async fn wait_port(name: &str, port: u16, peer: &mut Peer) -> Result<(), DevError> {
    let start = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = peer.child.try_wait() {
            return Err(DevError::Peer(format!(
                "{name} exited at start ({status}); see its log"
            )));
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(DevError::Peer(format!(
                "{name} did not listen on {addr} within 60s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the dev stack until SIGTERM or Ctrl-C.
///
/// # Errors
/// When a peer, the database, the API or the metrics endpoint cannot start.
pub async fn run(args: DevArgs) -> Result<(), DevError> {
    std::fs::create_dir_all(&args.dir).map_err(other)?;
    let dir = std::path::absolute(&args.dir).map_err(other)?;
    let mut peers: Vec<Peer> = Vec::new();

    // PostgreSQL, kept between runs.
    let mut _pg = None;
    let url = match args.database_url.clone() {
        Some(u) => u,
        None => {
            let pg_dir = dir.join("postgres");
            let cluster = tokio::task::spawn_blocking(move || {
                TempCluster::open_persistent(&pg_dir, ClusterOptions::default())
            })
            .await
            .map_err(other)??;
            let u = cluster.url("postgres");
            _pg = Some(cluster);
            u
        }
    };
    let pool = store::connect(&url, 24).await?;
    store::migrate(&pool).await?;

    // EC2: moto.
    let ec2_endpoint = match args.ec2_endpoint.clone() {
        Some(e) => e,
        None => {
            ensure_python_module("moto.server", "moto[server]")?;
            let port = free_port()?;
            let mut p = spawn_peer(
                "moto",
                &format!("exec python3 -m moto.server -H 127.0.0.1 -p {port}"),
                &dir.join("moto.log"),
            )?;
            wait_port("moto", port, &mut p).await?;
            peers.push(p);
            format!("http://127.0.0.1:{port}")
        }
    };
    // SMTP: aiosmtpd writing a Maildir.
    let maildir = dir.join("mail");
    let smtp = match args.smtp.clone() {
        Some(s) => s,
        None => {
            ensure_python_module("aiosmtpd", "aiosmtpd")?;
            let port = free_port()?;
            let mut p = spawn_peer(
                "aiosmtpd",
                &format!(
                    "exec python3 -m aiosmtpd -n -l 127.0.0.1:{port} -c aiosmtpd.handlers.Mailbox '{}'",
                    maildir.display()
                ),
                &dir.join("smtp.log"),
            )?;
            wait_port("aiosmtpd", port, &mut p).await?;
            peers.push(p);
            format!("127.0.0.1:{port}")
        }
    };
    // Kubernetes: the test API server, in this process.
    let mut _k8s = None;
    let k8s_config = match args.kubernetes_url.clone() {
        Some(u) => KubernetesConfig::for_url(u),
        None => {
            let server = TestApiServer::start().await.map_err(other)?;
            let c = server.config();
            _k8s = Some(server);
            c
        }
    };
    let k8s_url = match &k8s_config.access {
        setpoint_kubernetes::ClusterAccess::Url { url } => url.clone(),
        _ => "(kubeconfig)".into(),
    };

    // Plugins: the built-in adapters on the peers started above, one EC2 region per
    // `--regions` entry (moto answers every region), and the KVX kind over them.
    let mut regions = Vec::new();
    for region in &args.regions {
        let mut ec2 = Ec2Config::new(region.clone());
        ec2.endpoint_url = Some(ec2_endpoint.clone());
        ec2.default_image_id = Some("ami-12c6146b".into());
        ec2.timeouts.poll_initial_ms = 200;
        ec2.timeouts.poll_max_ms = 1_000;
        ec2.timeouts.attempt_ms = u64::try_from(args.ec2_attempt_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        ec2.timeouts.operation_ms = ec2.timeouts.operation_ms.max(ec2.timeouts.attempt_ms);
        // One size per plan, so a plan change resizes the machine (update chain) here too.
        for (plan, instance_type) in DEV_PLAN_SIZES {
            ec2.plans.insert(
                (*plan).to_owned(),
                PlanConfig {
                    image_id: None,
                    instance_type: Some((*instance_type).to_owned()),
                },
            );
        }
        regions.push(ec2);
    }
    let regions = Ec2Regions::from_configs(regions).map_err(other)?;
    let (smtp_host, smtp_port) = smtp
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_owned(), p)))
        .ok_or_else(|| other(format!("--smtp must be host:port, not {smtp:?}")))?;
    let mut smtp_config = SmtpConfig::new(smtp_host, "setpoint <noreply@setpoint.dev>");
    smtp_config.port = Some(smtp_port);
    smtp_config.security = Security::None;
    let credentials = Credentials::new("testing", "testing", None, None, "setpoint-dev");
    let secrets = crate::dev::local_secrets_key(&dir).map_err(other)?;
    let worker = WorkerConfig {
        concurrency: args.concurrency,
        claim_batch: args.concurrency,
        lease: args.lease,
        heartbeat_interval: args.lease / 3,
        poll_interval: args.poll_interval,
        shutdown_grace: Duration::from_secs(10),
        backoff: crate::worker::Backoff {
            cap: args.backoff_cap,
            ..crate::worker::Backoff::default()
        },
        ..WorkerConfig::default()
    };
    let kvx = KvxConfig {
        drift: args.drift.parse().map_err(other)?,
        ..KvxConfig::default()
    };
    let shutdown = CancellationToken::new();
    let file = crate::config::FileConfig {
        orphans: Some(args.orphans_table()),
        ..crate::config::FileConfig::default()
    };
    let engine = EngineBuilder::new(pool.clone())
        .env(|_| None)
        .file(file)
        .worker(worker)
        .secrets(secrets)
        .drift(args.resync_interval)
        .retention(crate::maintenance::retention::RetentionConfig::default())
        .api(args.listen, ApiConfig::default())
        .console(
            args.console_listen,
            crate::console::ConsoleConfig::default(),
        )
        .probe(args.enable_probe)
        .metrics(args.metrics_listen)
        .plugin(Ec2Plugin::with_settings(
            Ec2Settings { ec2: Some(regions) },
            Some(credentials.clone()),
        ))
        // moto serves Route 53 on the same endpoint as EC2.
        .plugin(DnsPlugin::with_config(
            setpoint_route53::Route53Config {
                endpoint_url: Some(ec2_endpoint.clone()),
                ..setpoint_route53::Route53Config::default()
            },
            Some(credentials),
        ))
        .plugin(KubernetesPlugin::with_settings(KubernetesSettings {
            kubernetes: Some(k8s_config),
            clusters: Default::default(),
        }))
        .plugin(EmailPlugin::with_settings(SmtpSettings {
            smtp: Some(smtp_config),
        }))
        .plugin(KvxPlugin::new(kvx))
        .start(shutdown.clone())
        .await
        .map_err(other)?;
    let api_addr = engine
        .api_addr
        .ok_or_else(|| other("the API did not start"))?;
    let metrics_addr = engine
        .metrics_addr
        .ok_or_else(|| other("the metrics endpoint did not start"))?;
    let console = engine
        .console_url
        .clone()
        .ok_or_else(|| other("the console did not start"))?;
    let admin = api::auth::create_token(&pool, &args.tenant, true, None)
        .await
        .map_err(other)?;
    let tenant = api::auth::create_token(&pool, &args.tenant, false, None)
        .await
        .map_err(other)?;

    let server = format!("http://{api_addr}");
    let info = json!({
        "server": server,
        "admin_token": admin.token,
        "tenant_token": tenant.token,
        "tenant": args.tenant,
        "metrics": format!("http://{metrics_addr}"),
        "console": console,
        "database_url": url,
        "ec2_endpoint": ec2_endpoint,
        "smtp": smtp,
        "maildir": maildir,
        "kubernetes_url": k8s_url,
    });
    if let Some(path) = &args.info_file {
        std::fs::write(path, serde_json::to_vec_pretty(&info).map_err(other)?).map_err(other)?;
    }
    let database = database_export(&url);
    println!(
        "\nsetpoint dev is running (Ctrl-C stops everything it started)\n\
         \n  gRPC API      {server}  (plaintext; grpcurl works via reflection)\
         \n  console       {console}  (sign in with a token below)\
         \n  admin token   {}  (tenant {}, admin: WorkService too)\
         \n  tenant token  {}  (tenant {})\
         \n  metrics       http://{metrics_addr}/metrics   (/healthz, /readyz)\
         \n  PostgreSQL    {}\
         \n  EC2 (moto)    {ec2_endpoint}\
         \n  Kubernetes    {k8s_url}\
         \n  mail          SMTP {smtp}; messages land in the Maildir {}\
         \n\nTry (in another terminal):\
         \n  export {path}SETPOINT_SERVER={server} SETPOINT_TOKEN={}{database}\
         \n  setpoint instances create db-1 --plan kvx.small --region us-east-1 --size-gb 10 \\\
         \n      --owner-email you@example.com --wait\
         \n  setpoint instances get db-1\
         \n  setpoint resources create --kind dns.zone shop --set name=shop.example.com \\\
         \n      --set 'records=[{{\"name\":\"www\",\"type\":\"A\",\"values\":[\"192.0.2.10\"]}}]' --wait\
         \n  setpoint resources list --kind dns.zone{operator}\n",
        admin.token,
        args.tenant,
        tenant.token,
        args.tenant,
        crate::config::redact_url(&url),
        maildir.join("new").display(),
        tenant.token,
        path = path_export(),
        operator = if database.is_empty() {
            ""
        } else {
            "\n  setpoint work list && setpoint work budgets   # operators: the queue and the \
             budgets, from PostgreSQL"
        },
    );

    wait_for_signal().await;
    eprintln!("setpoint dev: stopping");
    shutdown.cancel();
    let _ = engine.wait().await;
    pool.close().await;
    drop(peers);
    Ok(())
}

/// ` SETPOINT_DATABASE_URL=<url>` for the operators' `setpoint work` commands, which read the
/// database rather than the API; nothing when the URL holds a password, which is never
/// printed (the operator who gave it knows it).
fn database_export(url: &str) -> String {
    // A password in the user part or as a `password=` parameter (sqlx takes both).
    if crate::config::redact_url(url) != url || url.to_ascii_lowercase().contains("password=") {
        return String::new();
    }
    // Quoted for the shell where needed: a socket URL holds `?` and `&`.
    match shlex::try_quote(url) {
        Ok(quoted) => format!(" SETPOINT_DATABASE_URL={quoted}"),
        Err(_) => String::new(),
    }
}

/// `PATH="<this binary's folder>:$PATH" ` when `setpoint` is not on the PATH (a binary run
/// from cargo's target folder), so that the printed commands work as written; else nothing.
fn path_export() -> String {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    else {
        return String::new();
    };
    let on_path =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d == dir));
    if on_path {
        String::new()
    } else {
        format!("PATH=\"{}:$PATH\" ", dir.display())
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::database_export;

    #[test]
    fn the_database_export_quotes_for_the_shell_and_never_prints_a_password() {
        assert_eq!(
            database_export("postgres://postgres@127.0.0.1:5432/postgres"),
            " SETPOINT_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres"
        );
        assert_eq!(
            database_export("postgres:///setpoint?host=/run/postgresql&port=5433"),
            " SETPOINT_DATABASE_URL='postgres:///setpoint?host=/run/postgresql&port=5433'"
        );
        assert_eq!(
            database_export("postgres://app:s3cret@db:5432/setpoint"),
            ""
        );
    }
}
