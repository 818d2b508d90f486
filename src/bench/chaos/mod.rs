//! The chaos soak (issue 16): several engines on one database run creates, updates and deletes
//! of KVX instances against moto, aiosmtpd and the Kubernetes test server while their world
//! fails under them — engines killed (SIGKILL) and paused past their lease (SIGSTOP, then
//! SIGCONT), PostgreSQL restarted, the SMTP server and the EC2 endpoint stopped for 10–30 s —
//! and then checks that nothing was lost and nothing duplicated.
//!
//! `setpoint bench chaos` runs it for minutes; `tests/chaos.rs` runs a short version. Both are
//! seeded: the seed decides the workload (which operation, on which instance, when) and the
//! fault schedule (which fault, on which engine, when, for how long). It is printed, and
//! `SETPOINT_CHAOS_SEED` (or `--seed`) replays it. A replay repeats the schedule, not the
//! interleaving: processes still race as they like, which is the point.
//!
//! # What is checked at the end
//! Once the faults are over, every engine runs and every request was answered, the soak waits
//! until no unit is left to run, then checks:
//! - exactly one live machine per live instance, the one its record names, running; none for a
//!   deleted instance; no managed machine of an instance the database does not know (the
//!   engines' orphan sweep runs every 10 s and terminates `extra` and `unknown-resource`
//!   machines, and the checks come after one sweep that followed convergence);
//! - no Kubernetes object of a deleted instance, none of an older generation than its
//!   instance's;
//! - no mail sent twice (each chain's mail has its own `Message-ID`, derived from the chain's
//!   token, so a second message with the same id is a duplicate);
//! - every instance READY or DELETED, its generation one more than its accepted updates;
//!   uncertain notifications only as a `Notified` condition and a parked notify unit; any
//!   other parked unit is listed with its reason;
//! - every API request answered (retried on another engine, with the same request id, while
//!   the one it went to was down).
//!
//! # Layout
//! - `world`: the processes (PostgreSQL, moto, aiosmtpd, the Kubernetes test server, engines)
//!   and the faults done to them.
//! - `faults`: the seeded fault schedule, and its executor.
//! - `workload`: the seeded API workload and its retries.
//! - `checks`: convergence and the final checks.

mod checks;
mod faults;
mod workload;
mod world;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

pub use checks::Findings;
pub use faults::FaultCounts;
pub use workload::OpCounts;

use crate::config::parse_duration;

/// The environment variable that sets the seed (a run prints the one it used).
pub const SEED_VAR: &str = "SETPOINT_CHAOS_SEED";

/// Why the soak could not run (a failed check is not an error: it is in the report).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// A peer or an engine could not be started.
    #[error("{0}")]
    Setup(String),
    /// PostgreSQL could not be started or restarted.
    #[error(transparent)]
    Cluster(#[from] crate::dev::postgres::ClusterError),
    /// A database statement of the checks failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A file of the run could not be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The soak ran, and a check failed.
    #[error("{0}")]
    Failed(String),
}

impl From<sqlx::Error> for ChaosError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(crate::store::StoreError::Database(e))
    }
}

/// `setpoint bench chaos`.
#[derive(Debug, Clone, Args)]
pub struct BenchChaosArgs {
    /// How long faults are done (the checks come after).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub duration: Duration,
    /// The seed (default: random, printed); also `SETPOINT_CHAOS_SEED`.
    #[arg(long, env = SEED_VAR)]
    pub seed: Option<u64>,
    /// Engine processes on the one database.
    #[arg(long, default_value_t = 3)]
    pub engines: usize,
    /// Creates, updates and deletes to have accepted, at least.
    #[arg(long, default_value_t = 600)]
    pub ops: usize,
    /// SIGKILLs of engines.
    #[arg(long, default_value_t = 40)]
    pub kills: usize,
    /// SIGSTOPs of engines longer than their lease, then SIGCONT.
    #[arg(long, default_value_t = 12)]
    pub pauses: usize,
    /// PostgreSQL restarts.
    #[arg(long, default_value_t = 2)]
    pub pg_restarts: usize,
    /// Outages of the SMTP server (SIGSTOP, then SIGCONT).
    #[arg(long, default_value_t = 3)]
    pub smtp_outages: usize,
    /// Outages of the EC2 endpoint (moto: SIGSTOP, then SIGCONT).
    #[arg(long, default_value_t = 3)]
    pub ec2_outages: usize,
    /// The engines' lease.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub lease: Duration,
    /// The engine binary (default: this one).
    #[arg(long)]
    pub engine_binary: Option<PathBuf>,
    /// Where the run keeps its logs (default: a temporary folder, removed when the run
    /// passes).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a soak does.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// The seed of the workload and of the fault schedule.
    pub seed: u64,
    /// How long faults are done.
    pub duration: Duration,
    /// Engine processes.
    pub engines: usize,
    /// Accepted creates, updates and deletes to reach, at least.
    pub ops: usize,
    /// Most instances alive at once.
    pub max_live: usize,
    /// SIGKILLs of engines.
    pub kills: usize,
    /// SIGSTOPs longer than the lease.
    pub pauses: usize,
    /// PostgreSQL restarts.
    pub pg_restarts: usize,
    /// SMTP outages.
    pub smtp_outages: usize,
    /// EC2 outages.
    pub ec2_outages: usize,
    /// Shortest and longest outage.
    pub outage: (Duration, Duration),
    /// The engines' lease.
    pub lease: Duration,
    /// The engines' drift check interval (`None`: no drift checks).
    pub resync: Option<Duration>,
    /// The interval of the engines' orphan sweep, which then terminates `unknown-resource` and
    /// `extra` machines at any age (`None`: the engines' default, report only every 10
    /// minutes). The checks wait for one sweep after convergence: a stale attempt's launch
    /// that lands after its unit completed is the sweep's to remove.
    pub orphan_sweep: Option<Duration>,
    /// Longest retry delay of the engines (when the binary takes `--backoff-cap`): the time
    /// to converge then measures the engine, not a ten-minute backoff.
    pub backoff_cap: Duration,
    /// How long the soak waits for convergence after the faults.
    pub settle: Duration,
    /// The engine binary.
    pub engine_binary: PathBuf,
    /// Where the run keeps its logs and data.
    pub dir: PathBuf,
    /// Print progress to stderr.
    pub verbose: bool,
}

impl ChaosConfig {
    /// The seed from `SETPOINT_CHAOS_SEED`, else a random one (the bench: each run explores
    /// another schedule).
    pub fn seed_from_env() -> u64 {
        Self::seed_from_env_or(rand::random())
    }

    /// The seed from `SETPOINT_CHAOS_SEED`, else `default` (the test: every run replays the
    /// same workload and fault schedule, so a failure is reproduced by running it again).
    pub fn seed_from_env_or(default: u64) -> u64 {
        std::env::var(SEED_VAR)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(default)
    }

    /// The short soak of `cargo test`: a little over a minute of faults, fewer of each, a
    /// short lease.
    pub fn short(seed: u64, engine_binary: PathBuf, dir: PathBuf) -> Self {
        Self {
            seed,
            duration: Duration::from_secs(75),
            engines: 3,
            ops: 200,
            max_live: 30,
            kills: 3,
            pauses: 2,
            pg_restarts: 2,
            smtp_outages: 1,
            ec2_outages: 1,
            outage: (Duration::from_secs(10), Duration::from_secs(12)),
            lease: Duration::from_secs(3),
            resync: Some(Duration::from_secs(20)),
            orphan_sweep: Some(Duration::from_secs(10)),
            backoff_cap: Duration::from_secs(10),
            settle: Duration::from_secs(240),
            engine_binary,
            dir,
            verbose: true,
        }
    }

    /// The configuration of `setpoint bench chaos`.
    pub fn bench(args: &BenchChaosArgs, seed: u64, engine_binary: PathBuf, dir: PathBuf) -> Self {
        Self {
            seed,
            duration: args.duration,
            engines: args.engines.max(1),
            ops: args.ops,
            max_live: 40,
            kills: args.kills,
            pauses: args.pauses,
            pg_restarts: args.pg_restarts,
            smtp_outages: args.smtp_outages,
            ec2_outages: args.ec2_outages,
            outage: (Duration::from_secs(10), Duration::from_secs(30)),
            lease: args.lease,
            resync: Some(Duration::from_secs(30)),
            orphan_sweep: Some(Duration::from_secs(10)),
            backoff_cap: Duration::from_secs(15),
            settle: Duration::from_secs(300),
            engine_binary,
            dir,
            verbose: !args.json,
        }
    }
}

/// What a soak did and found.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// The seed (replay with `SETPOINT_CHAOS_SEED`).
    pub seed: u64,
    /// Engine processes.
    pub engines: usize,
    /// Seconds of faults.
    pub fault_secs: f64,
    /// Seconds of the whole run, checks included.
    pub total_secs: f64,
    /// The API workload.
    pub ops: OpCounts,
    /// The faults done.
    pub faults: FaultCounts,
    /// Seconds from the end of the last fault until no unit was left to run; `None` when it
    /// never came within the settle time.
    pub converge_secs: Option<f64>,
    /// What the final checks found.
    pub findings: Findings,
}

impl ChaosReport {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.findings.violations.is_empty() && self.converge_secs.is_some()
    }

    /// The figures, one per line, as the bench prints them.
    pub fn render(&self) -> String {
        let o = &self.ops;
        let f = &self.faults;
        let d = &self.findings;
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("  {k:<34} {v}\n"));
        line(
            "seed",
            format!("{} (replay: {SEED_VAR}={})", self.seed, self.seed),
        );
        line("engines", self.engines.to_string());
        line("faults for", format!("{:.0} s", self.fault_secs));
        line(
            "operations accepted",
            format!(
                "{} (creates {}, updates {}, deletes {})",
                o.creates + o.updates + o.deletes,
                o.creates,
                o.updates,
                o.deletes
            ),
        );
        line(
            "updates refused (busy)",
            format!("{} (each answered FAILED_PRECONDITION)", o.refused_busy),
        );
        line(
            "calls retried (same request id)",
            format!("{} over {} requests", o.retried_calls, o.retried_requests),
        );
        line("requests unanswered", o.unanswered.to_string());
        line("SIGKILLs", f.kills.to_string());
        line(
            "SIGSTOPs past the lease",
            format!("{} (longest {:.1} s)", f.pauses, f.longest_pause_secs),
        );
        line("PostgreSQL restarts", f.pg_restarts.to_string());
        line(
            "SMTP outages",
            format!("{} ({:.0} s in all)", f.smtp_outages, f.smtp_outage_secs),
        );
        line(
            "EC2 outages",
            format!("{} ({:.0} s in all)", f.ec2_outages, f.ec2_outage_secs),
        );
        line(
            "engine restarts after a failed start",
            f.failed_starts.to_string(),
        );
        line(
            "time to converge after the last fault",
            match self.converge_secs {
                Some(c) => format!("{c:.1} s"),
                None => "did not converge".into(),
            },
        );
        line(
            "instances",
            format!(
                "{} ready, {} deleted, {} parked on a step",
                d.ready,
                d.deleted,
                d.parked.len()
            ),
        );
        line(
            "uncertain notifications",
            format!(
                "{} (Notified=Unknown, unit parked)",
                d.uncertain_notifications
            ),
        );
        line("mails", d.mails.to_string());
        line(
            "machines the orphan sweep terminated",
            format!(
                "{} (extra {}, unknown-resource {})",
                d.swept_extra + d.swept_unknown,
                d.swept_extra,
                d.swept_unknown
            ),
        );
        line(
            "duplicates found",
            format!(
                "{} (machines {}, Kubernetes objects {}, mails {})",
                d.duplicates(),
                d.extra_machines,
                d.stale_objects,
                d.duplicate_mails
            ),
        );
        line("violations", d.violations.len().to_string());
        line("total run time", format!("{:.0} s", self.total_secs));
        for v in &d.violations {
            s.push_str(&format!("  VIOLATION: {v}\n"));
        }
        for (name, reason) in &d.parked {
            s.push_str(&format!("  parked: {name}: {reason}\n"));
        }
        s
    }
}

/// Runs the soak `config` describes: starts its world, runs the workload under the fault
/// schedule, waits for convergence, checks, and stops everything it started.
///
/// # Errors
/// When the world cannot be set up; failed checks are in the report.
pub async fn run(config: ChaosConfig) -> Result<ChaosReport, ChaosError> {
    let started = Instant::now();
    let say = |m: String| {
        if config.verbose {
            eprintln!("chaos: {m}");
        }
    };
    say(format!(
        "seed {} (replay: {SEED_VAR}={}); {} engines, {:?} of faults, logs in {}",
        config.seed,
        config.seed,
        config.engines,
        config.duration,
        config.dir.display()
    ));
    let mut world = world::World::start(&config).await?;
    say("world up: PostgreSQL, moto, aiosmtpd, the Kubernetes test server, engines".into());
    let plan = faults::plan(&config);
    say(format!("{} fault events planned", plan.events.len()));

    let workload = workload::Workload::new(&config, world.endpoints(), world.token().to_owned())?;
    let fault_start = tokio::time::Instant::now();
    let load = tokio::spawn(workload.clone().run(fault_start + config.duration));
    let counts = faults::execute(&plan, &mut world, fault_start, config.verbose).await;
    let last_fault_end = tokio::time::Instant::now();
    say("faults over; every engine and peer runs again".into());
    world.ensure_all_up().await;
    let ops = match load.await {
        Ok(ops) => ops,
        Err(e) => {
            return Err(ChaosError::Setup(format!("the workload task failed: {e}")));
        }
    };
    say(format!(
        "workload done: {} creates, {} updates, {} deletes accepted; {} unanswered",
        ops.creates, ops.updates, ops.deletes, ops.unanswered
    ));
    let converged = {
        let pool = world.pool().clone();
        checks::wait_converged(&pool, last_fault_end, config.settle, &mut world).await?
    };
    let converge_secs = converged.map(|d| d.as_secs_f64());
    say(match converge_secs {
        Some(s) => format!("converged {s:.1} s after the last fault"),
        None => "did not converge within the settle time".into(),
    });
    if let Some(interval) = world.orphan_sweep() {
        let swept = checks::wait_swept(world.pool(), interval * 3).await;
        say(if swept {
            "an orphan sweep ran after convergence".into()
        } else {
            "no orphan sweep ran after convergence".into()
        });
    }
    let mut findings = checks::check(&world, &workload.model()).await?;
    if ops.unanswered > 0 {
        findings
            .violations
            .push(format!("{} requests were never answered", ops.unanswered));
    }
    for a in &ops.unexpected {
        findings.violations.push(format!("unexpected answer: {a}"));
    }
    if converge_secs.is_none() {
        findings.violations.push(format!(
            "units still open {:?} after the last fault: {}",
            config.settle,
            checks::open_units(world.pool()).await?.join("; ")
        ));
    }
    world.stop().await;
    let report = ChaosReport {
        seed: config.seed,
        engines: config.engines,
        fault_secs: config.duration.as_secs_f64(),
        total_secs: started.elapsed().as_secs_f64(),
        ops,
        faults: counts,
        converge_secs,
        findings,
    };
    Ok(report)
}

/// `setpoint bench chaos`: runs the soak and prints its figures; fails when a check failed.
///
/// # Errors
/// When the world cannot be set up, or a check failed.
pub async fn bench(args: BenchChaosArgs) -> Result<ChaosReport, ChaosError> {
    let seed = args.seed.unwrap_or_else(ChaosConfig::seed_from_env);
    let binary = match &args.engine_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| ChaosError::Io("the path of this binary".into(), e))?,
    };
    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("setpoint-chaos-{seed}")),
            true,
        ),
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| ChaosError::Io(dir.display().to_string(), e))?;
    let config = ChaosConfig::bench(&args, seed, binary, dir.clone());
    let report = run(config).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!("setpoint bench chaos\n{}", report.render());
    }
    if report.passed() {
        if temporary {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(report)
    } else {
        Err(ChaosError::Failed(format!(
            "the soak found {} violation(s); logs are in {}",
            report.findings.violations.len().max(1),
            dir.display()
        )))
    }
}
