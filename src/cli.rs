//! The command line of the `setpoint` binary. Every flag also reads an environment variable
//! (shown in `--help`); flags and environment override the configuration file.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};

use crate::config::parse_duration;

/// setpoint: a provisioning engine. Desired state and work in PostgreSQL; workers drive the
/// real world until it matches.
#[derive(Debug, Parser)]
#[command(name = "setpoint", version, about, propagate_version = true)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "SETPOINT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Where the database is.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/setpoint. Without it,
    /// SETPOINT_DATABASE_HOST/_PORT/_NAME/_USER/_PASSWORD are used, then the file's
    /// `database_url`.
    #[arg(long, env = "SETPOINT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// A TOML configuration file.
    #[arg(long, env = "SETPOINT_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The commands.
// Parsed once at start-up and never copied around: the size of `Serve`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine: apply migrations, then run workers until SIGTERM or Ctrl-C. Without a
    /// database URL it starts (and keeps) its own PostgreSQL under --data-dir.
    Serve(ServeArgs),
    /// The whole stack on this machine, no cloud account: PostgreSQL, moto, an SMTP server, a
    /// Kubernetes test server, the workers, the API and metrics. Ctrl-C stops it all.
    #[cfg(all(
        feature = "ec2",
        feature = "kubernetes",
        feature = "email",
        feature = "dns"
    ))]
    Dev(crate::dev::stack::DevArgs),
    /// Apply the database migrations and exit (the expand migrations; with --contract also
    /// the contract ones, once no engine of the previous release runs).
    Migrate(MigrateArgs),
    /// Print a new key for SETPOINT_SECRETS_KEY (what seals resources' secret outputs at rest).
    /// Keep it in a secrets store; to rotate, put the new key first and keep the old ones after
    /// it (`new:…,old:…`).
    SecretsKey(SecretsKeyArgs),
    /// Operate on units of work.
    #[command(subcommand)]
    Work(WorkCommand),
    /// Measure the engine.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Instances through the gRPC API (--server, --token).
    #[command(subcommand)]
    Instances(crate::client::InstancesCommand),
    /// Resources of any kind through the gRPC API (--server, --token).
    #[command(subcommand)]
    Resources(crate::client::resources::ResourcesCommand),
    /// API tokens.
    #[command(subcommand)]
    Tokens(crate::client::TokensCommand),
}

/// `setpoint secrets-key`.
#[derive(Debug, Clone, Args)]
pub struct SecretsKeyArgs {
    /// The key's id (1 to 32 letters, digits or `-`), stored with everything it seals so that a
    /// later key set can still open it.
    #[arg(long, default_value = "k1")]
    pub id: String,
}

/// `setpoint migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Database.
    #[command(flatten)]
    pub db: DbArgs,
    /// Also apply the contract migrations, which remove what only engines of the previous
    /// release need: run this once every engine runs this release (see docs/upgrades.md).
    #[arg(long)]
    pub contract: bool,
}

/// `setpoint serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Database.
    #[command(flatten)]
    pub db: DbArgs,
    /// Do not apply migrations on start (`--no-migrate`, or `=true`/`=false`; the environment
    /// takes true/false, 1/0, yes/no, on/off). Unset: the config file decides.
    #[arg(long, env = "SETPOINT_NO_MIGRATE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub no_migrate: Option<bool>,
    /// Where the embedded PostgreSQL keeps its data when no database URL is given.
    #[arg(long, env = "SETPOINT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Units run at once by this process.
    #[arg(long, env = "SETPOINT_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Lease length of a claimed unit (e.g. 30s).
    #[arg(long, env = "SETPOINT_LEASE", value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// How often to look for due units without a notification (e.g. 1s).
    #[arg(long, env = "SETPOINT_POLL_INTERVAL", value_parser = parse_duration)]
    pub poll_interval: Option<Duration>,
    /// On SIGTERM, how long running units may take to finish (e.g. 30s).
    #[arg(long, env = "SETPOINT_SHUTDOWN_GRACE", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Scale of the first retry delay after a transient failure (e.g. 1s).
    #[arg(long, env = "SETPOINT_BACKOFF_BASE", value_parser = parse_duration)]
    pub backoff_base: Option<Duration>,
    /// Longest retry delay (e.g. 10m).
    #[arg(long, env = "SETPOINT_BACKOFF_CAP", value_parser = parse_duration)]
    pub backoff_cap: Option<Duration>,
    /// Longest single attempt (e.g. 10m).
    #[arg(long, env = "SETPOINT_MAX_RUNTIME", value_parser = parse_duration)]
    pub max_runtime: Option<Duration>,
    /// Register the `setpoint.probe` kind (for tests and deployment checks); values as for
    /// `--no-migrate`. Unset: the config file decides.
    #[arg(long, env = "SETPOINT_ENABLE_PROBE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub enable_probe: Option<bool>,
    /// This worker's name in leases and events (default: host-pid-random).
    #[arg(long, env = "SETPOINT_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Which registered kinds this engine claims, as comma-separated glob patterns (e.g.
    /// `kvx.*` or `dns.*,setpoint.noop`); overrides `worker.kinds`. Default: all. Units of
    /// other kinds wait for an engine that serves them.
    #[arg(long, env = "SETPOINT_KINDS", value_delimiter = ',')]
    pub kinds: Option<Vec<String>>,
    /// Address of /metrics, /healthz and /readyz (e.g. 0.0.0.0:9090); off when unset.
    #[arg(long, env = "SETPOINT_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Enqueue an observe unit per ready instance this often (drift detection; needs the KVX
    /// workflows); overrides `workflows.resync_interval`.
    #[arg(long, env = "SETPOINT_RESYNC_INTERVAL", value_parser = parse_duration)]
    pub resync_interval: Option<Duration>,
    /// What to do with a machine terminated behind setpoint's back: heal or mark; overrides
    /// `workflows.drift`.
    #[arg(long, env = "SETPOINT_DRIFT", value_parser = ["heal", "mark"])]
    pub drift: Option<String>,
    /// The gRPC API.
    #[command(flatten)]
    pub api: crate::api::ApiArgs,
    /// Address of the web console (e.g. 127.0.0.1:8080); off when unset. It serves HTTPS with
    /// the API's certificate when the API serves TLS. Overrides `console.listen`.
    #[arg(long, env = "SETPOINT_CONSOLE_LISTEN")]
    pub console_listen: Option<std::net::SocketAddr>,
    /// Serve the console over plain HTTP even when the API serves TLS (behind a load balancer
    /// that ends TLS; its session cookie is then still `Secure`). Overrides
    /// `console.plaintext`.
    #[arg(long, env = "SETPOINT_CONSOLE_PLAINTEXT", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub console_plaintext: Option<bool>,
}

/// `setpoint work …`.
#[derive(Debug, Subcommand)]
pub enum WorkCommand {
    /// List unfinished units, oldest first.
    List {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// Only units in this state.
        #[arg(long, value_parser = ["pending", "running", "parked"])]
        state: Option<String>,
        /// Only units of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only units that wait because no live engine claims their kind (a kind whose
        /// engines are stopped, or that no engine's `--kinds` / `worker.kinds` names), with
        /// the count per kind.
        #[arg(long, conflicts_with = "state")]
        unserved: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one unit (by id or token) and its history.
    Show {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// Unit id or idempotency token.
        unit: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a parked unit pending again (after the cause was fixed).
    Retry {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// Unit id.
        id: i64,
        /// At least this many further attempts (a unit parked early keeps the ones it had
        /// left, if they are more).
        #[arg(long, default_value_t = 5)]
        attempts: i32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a parked unit for good.
    Cancel {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// Unit id.
        id: i64,
        /// Why (kept in the unit's history).
        #[arg(long, default_value = "cancelled by an operator")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Machines tagged as managed by setpoint that belong to no live resource, or are extra
    /// machines of one (not the machine its record names), as the last orphan sweep found
    /// them (an engine with EC2 configured sweeps every `[orphans] interval`, 10m by default;
    /// docs/faults.md says when it terminates them).
    Orphans {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// Print JSON: `{"sweeps": [...], "orphans": [...]}`.
        #[arg(long)]
        json: bool,
    },
    /// The shared request budgets (docs/budgets.md): per key its rate against the configured
    /// one, tokens, units waiting, waits and throttles, counted over every engine.
    Budgets {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// Print JSON: a list of keys.
        #[arg(long)]
        json: bool,
    },
    /// Tenants' weights in the fair claim (docs/operations.md "Lanes and fairness"): a tenant
    /// of weight 4 gets four turns for each turn of a tenant of weight 1. Lists them; with
    /// `--set` or `--reset`, changes them first (for units enqueued from then on).
    Weights {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// `TENANT=WEIGHT`, from 0.01 to 1000 (repeatable).
        #[arg(long, value_name = "TENANT=WEIGHT")]
        set: Vec<String>,
        /// Give TENANT the default weight, 1, again (repeatable).
        #[arg(long, value_name = "TENANT")]
        reset: Vec<String>,
        /// Print JSON: a list of `{"tenant", "weight"}`.
        #[arg(long)]
        json: bool,
    },
    /// Enqueue a unit by hand (for smoke tests: `--kind setpoint.noop`).
    Enqueue {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// Work kind.
        #[arg(long)]
        kind: String,
        /// JSON spec.
        #[arg(long, default_value = "{}")]
        spec: String,
        /// How many identical units (each with its own token).
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Attempt limit.
        #[arg(long)]
        max_attempts: Option<i32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `setpoint bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Queue throughput and pickup latency on a durable PostgreSQL, with a naive baseline.
    Queue(BenchQueueArgs),
    /// API Create calls/s next to PostgreSQL's single-insert commit rate (durable cluster).
    Api(crate::bench::api::BenchApiArgs),
    /// An engine watching N READY resources with drift running: Create latency, drift rate,
    /// table sizes (durable cluster, adapters that answer in a set time).
    Scale(crate::bench::scale::BenchScaleArgs),
    /// The chaos soak: engines killed and paused, PostgreSQL restarted, SMTP and EC2 stopped,
    /// while instances are created, updated and deleted; then nothing lost or duplicated.
    #[cfg(all(
        feature = "ec2",
        feature = "kubernetes",
        feature = "email",
        feature = "dns"
    ))]
    Chaos(crate::bench::chaos::BenchChaosArgs),
}

/// `setpoint bench queue`.
#[derive(Debug, Args)]
pub struct BenchQueueArgs {
    /// PostgreSQL URL of a scratch database (its work tables are truncated!). Without it, a
    /// throw-away durable cluster is started.
    #[arg(long, env = "SETPOINT_BENCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Backlog sizes to drain, comma-separated (one run each).
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    pub jobs: Vec<usize>,
    /// Units run at once.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Units per claim statement.
    #[arg(long, default_value_t = 1000)]
    pub claim_batch: usize,
    /// Units per enqueue statement.
    #[arg(long, default_value_t = 5000)]
    pub enqueue_batch: usize,
    /// Steady arrival rate of the pickup-latency run (units/s; 0 skips it).
    #[arg(long, default_value_t = 500)]
    pub latency_rate: u32,
    /// Length of the pickup-latency run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub latency_duration: Duration,
    /// Cycles of the naive one-row baseline (0 skips it).
    #[arg(long, default_value_t = 20000)]
    pub baseline_cycles: usize,
    /// Connections of the naive baseline.
    #[arg(long, default_value_t = 8)]
    pub baseline_clients: usize,
    /// Drain each backlog a second time with this many units of a kind no engine serves at
    /// the head of the queue (0: no second drain).
    #[arg(long, default_value_t = 0)]
    pub unserved: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
