//! The `setpoint` binary: the engine (`serve`), migrations, operator commands and benchmarks.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use setpoint::cli::{BenchCommand, Cli, Command, DbArgs, ServeArgs, WorkCommand};
use setpoint::config::{FileConfig, database_url_from_parts, redact_url};
use setpoint::dev::postgres::{ClusterOptions, Durability, TempCluster};
use setpoint::engine::EngineBuilder;
use setpoint::kinds::SecretBox;
use setpoint::plugins::kvx::KvxConfig;
use setpoint::queue::{self, NewWork, WorkFilter, WorkRow};
use setpoint::store;
use tokio_util::sync::CancellationToken;

// The engine allocates small objects per unit of work (rows, specs, events, tasks) on every
// runtime thread; under glibc malloc that was about a quarter of the engine's CPU in
// `bench queue`, and mimalloc's thread-local free lists make it cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    end_quietly_when_the_reader_goes(&cli.command);
    init_tracing(&cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Exit status of a command whose reader went away: what a shell reports for a process ended
/// by SIGPIPE (128 + 13).
const READER_GONE: i32 = 141;

/// The commands that print for people and pipes end quietly when their reader goes away
/// (`setpoint work list | head`), with the status Unix tools end with. SIGPIPE stays ignored
/// (as Rust starts programs): a gRPC or PostgreSQL connection the peer reset must be an error
/// the command reports, not a signal that ends it. So the one thing caught is the panic of a
/// print to a closed stdout. The engine, `dev` and the benchmarks keep the default: they must
/// clean up what they started.
fn end_quietly_when_the_reader_goes(command: &Command) {
    let prints = matches!(
        command,
        Command::Work(_)
            | Command::Instances(_)
            | Command::Resources(_)
            | Command::Tokens(_)
            | Command::SecretsKey(_)
            | Command::Migrate(_)
    );
    if !prints {
        return;
    }
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // std's text when `println!` finds stdout closed: "failed printing to stdout: Broken
        // pipe (os error 32)".
        if message.starts_with("failed printing to stdout")
            && message.to_ascii_lowercase().contains("broken pipe")
        {
            std::process::exit(READER_GONE);
        }
        default(info);
    }));
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    // Colours only on a terminal: escape codes garble log files and collectors, and styling
    // every unit's span fields was a sixth of the engine's CPU in `bench queue`.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        #[cfg(all(
            feature = "ec2",
            feature = "kubernetes",
            feature = "email",
            feature = "dns"
        ))]
        Command::Dev(args) => Ok(setpoint::dev::stack::run(args).await?),
        Command::SecretsKey(args) => {
            let key = setpoint::kinds::SecretBox::generate_key(&args.id)?;
            // Checked the way the engine reads it, so that a bad id fails here, not at start-up.
            setpoint::kinds::SecretBox::from_keys(&key)?;
            println!("{key}");
            Ok(())
        }
        Command::Migrate(args) => {
            let (file, url) = resolve_db(&args.db)?;
            let url = url.context(NO_DB)?;
            let pool = connect(&url, &file, 2).await?;
            let which = if args.contract {
                store::Migrations::Contract
            } else {
                store::Migrations::ExpandOrFresh
            };
            if store::migrate_with(&pool, which).await? {
                println!("migrations applied (expand and contract)");
            } else {
                println!(
                    "migrations applied (expand; once every engine runs this release, run \
                     `setpoint migrate --contract`)"
                );
            }
            Ok(())
        }
        Command::Work(cmd) => work(cmd).await,
        Command::Bench(cmd) => {
            // A benchmark's throw-away PostgreSQL, peers and engines stop and their folders go
            // when its future is dropped; without this, Ctrl-C or SIGTERM would leave a
            // running cluster and gigabytes of data in /tmp.
            tokio::select! {
                r = bench(cmd) => r,
                () = wait_for_signal() => {
                    bail!("interrupted: the benchmark stopped; what it started (a throw-away PostgreSQL, peers, engines) is stopped and removed")
                }
            }
        }
        Command::Instances(cmd) => Ok(setpoint::client::run_instances(cmd).await?),
        Command::Resources(cmd) => Ok(setpoint::client::resources::run(cmd).await?),
        Command::Tokens(cmd) => {
            let (file, url) = resolve_db(cmd.db())?;
            let pool = connect(&url.context(NO_DB)?, &file, 2).await?;
            Ok(setpoint::client::run_tokens(&pool, cmd).await?)
        }
    }
}

const NO_DB: &str = "no database given: pass --database-url or set SETPOINT_DATABASE_URL \
                     (or SETPOINT_DATABASE_HOST and friends, or database_url in the config file)";

fn resolve_db(db: &DbArgs) -> Result<(FileConfig, Option<String>)> {
    let file = match &db.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let url = db
        .database_url
        .clone()
        .or_else(|| database_url_from_parts(|k| std::env::var(k).ok()))
        .or_else(|| file.database_url.clone());
    Ok((file, url))
}

async fn connect(url: &str, file: &FileConfig, max: u32) -> Result<sqlx::PgPool> {
    let max = file.database_max_connections.unwrap_or(max);
    store::connect(url, max)
        .await
        .with_context(|| format!("cannot connect to {}", redact_url(url)))
}

/// The built-in adapters' configuration, checked before anything starts (the database
/// included): their tables and variables parse, and the KVX kind has all three or none.
fn preflight_adapters(file: &FileConfig) -> Result<()> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let json = |v: &Option<toml::Value>| v.as_ref().and_then(|v| serde_json::to_value(v).ok());
    #[cfg(feature = "ec2")]
    let ec2 = {
        let mut s = setpoint::plugins::ec2::Ec2Settings::from_table(json(&file.ec2).as_ref())?;
        s.apply_env(&env)?;
        s.ec2.is_some()
    };
    #[cfg(not(feature = "ec2"))]
    let ec2 = false;
    #[cfg(feature = "kubernetes")]
    let kubernetes = {
        let mut s = setpoint::plugins::kubernetes::KubernetesSettings::from_table(
            json(&file.kubernetes).as_ref(),
        )?;
        s.apply_env(&env)?;
        s.is_configured()
    };
    #[cfg(not(feature = "kubernetes"))]
    let kubernetes = false;
    #[cfg(feature = "email")]
    let smtp = {
        let mut s = setpoint::plugins::email::SmtpSettings::from_table(json(&file.smtp).as_ref())?;
        s.apply_env(&env)?;
        s.smtp.is_some()
    };
    #[cfg(not(feature = "email"))]
    let smtp = false;
    let _ = (&env, &json, file);
    setpoint::plugins::kvx::check_complete(ec2, kubernetes, smtp)?;
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let (file, url) = resolve_db(&args.db)?;
    preflight_adapters(&file)?;
    // The API's TLS material is checked before anything starts: settings, files, the
    // certificate and key themselves.
    let api_config = args.api.config(&file.api)?;
    let api_tls = api_config.tls.is_some();
    if let Some(tls) = &api_config.tls {
        tls.check()?;
    }
    let mut kvx = KvxConfig::default();
    if let Some(d) = args.drift.as_deref().or(file.workflows.drift.as_deref()) {
        kvx.drift = d.parse().map_err(anyhow::Error::msg)?;
    }
    if let Some(w) = file.workflows.machine_wait {
        kvx.machine_wait = w;
    }
    let resync_interval = args.resync_interval.or(file.workflows.resync_interval);
    let mut worker = file.worker_config();
    if let Some(v) = args.concurrency {
        worker.concurrency = v;
    }
    if let Some(v) = args.lease {
        worker.lease = v;
        if file.worker.heartbeat_interval.is_none() {
            worker.heartbeat_interval = v / 3;
        }
    }
    if let Some(v) = args.poll_interval {
        worker.poll_interval = v;
    }
    if let Some(v) = args.shutdown_grace {
        worker.shutdown_grace = v;
    }
    if let Some(v) = args.backoff_base {
        worker.backoff.base = v;
    }
    if let Some(v) = args.backoff_cap {
        worker.backoff.cap = v;
    }
    if let Some(v) = args.max_runtime {
        worker.max_runtime = v;
    }
    worker.worker_id = args.worker_id.clone();
    if let Some(kinds) = &args.kinds {
        worker.kinds = kinds.clone();
    }
    worker.validate()?;
    let mut secrets = match std::env::var("SETPOINT_SECRETS_KEY") {
        Ok(keys) if !keys.trim().is_empty() => Some(SecretBox::from_keys(&keys)?),
        _ => None,
    };

    // Without a database, run our own and keep it between runs (and a secrets key with it).
    let mut _embedded = None;
    let url = match url {
        Some(url) => url,
        None => {
            let dir = args
                .data_dir
                .clone()
                .or(file.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from(".setpoint/postgres"));
            tracing::info!(dir = %dir.display(), "no database URL given: starting an embedded PostgreSQL");
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            if secrets.is_none() {
                secrets = Some(setpoint::dev::local_secrets_key(&dir)?);
            }
            let cluster = tokio::task::spawn_blocking(move || {
                TempCluster::open_persistent(&dir, ClusterOptions::default())
            })
            .await??;
            let url = cluster.url("postgres");
            tracing::info!(url = %url, "embedded PostgreSQL is running");
            _embedded = Some(cluster);
            url
        }
    };
    let pool_size = (worker.concurrency as u32 / 4).clamp(8, 64);
    let retention = file.retention.retention_config()?;
    let pool = connect(&url, &file, pool_size).await?;
    // A flag or environment variable, when given, overrides the file, either way.
    let migrate = args
        .no_migrate
        .map_or(file.migrate_on_start.unwrap_or(true), |no| !no);
    if migrate {
        store::migrate(&pool).await.context("applying migrations")?;
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        signal.cancel();
    });
    let mut builder = EngineBuilder::new(pool)
        .worker(worker)
        .probe(
            args.enable_probe
                .unwrap_or(file.enable_probe.unwrap_or(false)),
        )
        .drift(resync_interval)
        .retention(retention)
        .secrets(secrets.unwrap_or_else(SecretBox::none))
        .api(args.api.listen(&file.api), api_config)
        .plugins(setpoint::plugins::builtin(kvx));
    if let Some(addr) = args.metrics_listen.or(file.metrics_listen) {
        builder = builder.metrics(addr);
    }
    if let Some(addr) = args.console_listen.or(file.console.listen) {
        let plaintext = args
            .console_plaintext
            .or(file.console.plaintext)
            .unwrap_or(false);
        let defaults = setpoint::console::ConsoleConfig::default();
        builder = builder.console(
            addr,
            setpoint::console::ConsoleConfig {
                plaintext,
                // Plain HTTP behind a load balancer that ends TLS: the browser still speaks
                // HTTPS, so the cookie stays Secure unless told otherwise.
                secure_cookies: file.console.secure_cookies.unwrap_or(plaintext && api_tls),
                idle_timeout: file.console.idle_timeout.unwrap_or(defaults.idle_timeout),
                max_sessions: file.console.max_sessions.unwrap_or(defaults.max_sessions),
            },
        );
    }
    let engine = builder.file(file).start(shutdown.clone()).await?;
    if let Some(url) = &engine.console_url {
        tracing::info!(url = %url, "web console serving");
    }
    if engine.catalog.get(setpoint::plugins::kvx::KIND).is_none() {
        tracing::info!(
            "KVX workflows off: no [ec2], [kubernetes] or [smtp] configured, so the API's \
             instances run its configured stand-in kinds (setpoint.noop unless --create-kind \
             etc. are set)"
        );
    } else {
        tracing::info!(
            "KVX workflows on: [ec2], [kubernetes] and [smtp] are configured; instances run the \
             kvx.instance kind's chains"
        );
    }
    engine.wait().await?;
    Ok(())
}

/// Runs one benchmark and prints its figures.
async fn bench(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Queue(args) => bench_queue(args).await,
        BenchCommand::Api(args) => setpoint::bench::api::run(args)
            .await
            .map(|_| ())
            .map_err(Into::into),
        BenchCommand::Scale(args) => {
            let json_out = args.json;
            let report = setpoint::bench::scale::run(args, |m| eprintln!("bench: {m}")).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                setpoint::bench::scale::print(&report);
            }
            Ok(())
        }
        #[cfg(all(
            feature = "ec2",
            feature = "kubernetes",
            feature = "email",
            feature = "dns"
        ))]
        BenchCommand::Chaos(args) => setpoint::bench::chaos::bench(args)
            .await
            .map(|_| ())
            .map_err(Into::into),
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

/// What an operator's action does to resources: the chain runner's hooks over the built-in
/// kinds' declarations.
fn hooks(pool: &sqlx::PgPool) -> Result<setpoint::kinds::Chains> {
    let mut catalog = setpoint::kinds::KindCatalog::new();
    for kind in setpoint::plugins::builtin_kinds() {
        catalog.add(kind)?;
    }
    Ok(setpoint::kinds::Chains::new(
        std::sync::Arc::new(catalog),
        std::sync::Arc::new(SecretBox::none()),
        pool.clone(),
    ))
}

fn operator() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}

async fn work(cmd: WorkCommand) -> Result<()> {
    let db = match &cmd {
        WorkCommand::List { db, .. }
        | WorkCommand::Show { db, .. }
        | WorkCommand::Retry { db, .. }
        | WorkCommand::Cancel { db, .. }
        | WorkCommand::Orphans { db, .. }
        | WorkCommand::Budgets { db, .. }
        | WorkCommand::Weights { db, .. }
        | WorkCommand::Enqueue { db, .. } => db.clone(),
    };
    let (file, url) = resolve_db(&db)?;
    let pool = connect(&url.context(NO_DB)?, &file, 2).await?;
    let mut conn = pool.acquire().await?;
    match cmd {
        WorkCommand::List {
            state,
            kind,
            unserved,
            limit,
            json,
            ..
        } => {
            if !(1..=10_000).contains(&limit) {
                bail!("--limit must be between 1 and 10000");
            }
            if unserved {
                let report = queue::unserved(&mut conn, kind.as_deref(), limit).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print_unserved(&report);
                }
                return Ok(());
            }
            let rows = queue::list(
                &mut conn,
                &WorkFilter {
                    state,
                    kind,
                    limit,
                    ..WorkFilter::default()
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_rows(&rows);
            }
        }
        WorkCommand::Show { unit, json, .. } => {
            let report = queue::show(&mut conn, &unit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                match &report.row {
                    Some(r) => {
                        println!(
                            "unit {}  kind {}  state {}  attempt {}/{}",
                            r.id, r.kind, r.state, r.attempt, r.max_attempts
                        );
                        println!(
                            "token {}  resource {}",
                            r.token,
                            r.resource_id
                                .map(|u| u.to_string())
                                .unwrap_or_else(|| "-".into())
                        );
                        if let Some(e) = &r.last_error {
                            println!(
                                "last error ({}): {e}",
                                r.last_error_class.as_deref().unwrap_or("?")
                            );
                        }
                        if r.state == "parked" {
                            println!(
                                "operator: `setpoint work retry {0}` after fixing the cause, or `setpoint work cancel {0}`",
                                r.id
                            );
                        }
                    }
                    None => println!("unit {} has finished; its history:", report.id),
                }
                let table: Vec<Vec<String>> = report
                    .events
                    .iter()
                    .map(|e| {
                        vec![
                            e.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
                            e.event.clone(),
                            e.attempt.map(|a| a.to_string()).unwrap_or_default(),
                            e.worker.clone().unwrap_or_default(),
                            e.error_class.clone().unwrap_or_default(),
                            e.message.clone().unwrap_or_default(),
                            e.detail.as_ref().map(|d| d.to_string()).unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_table(
                    &["AT", "EVENT", "ATTEMPT", "BY", "CLASS", "MESSAGE", "DETAIL"],
                    &table,
                );
            }
        }
        WorkCommand::Retry {
            id, attempts, json, ..
        } => {
            let mut tx = pool.begin().await?;
            let row =
                queue::retry_parked(&mut tx, &hooks(&pool)?, id, &operator(), attempts).await?;
            tx.commit().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&row)?);
            } else {
                println!(
                    "unit {id} is pending again (attempt {} of at most {})",
                    row.attempt, row.max_attempts
                );
            }
        }
        WorkCommand::Cancel {
            id, reason, json, ..
        } => {
            let mut tx = pool.begin().await?;
            let row =
                queue::cancel_parked(&mut tx, &hooks(&pool)?, id, &operator(), &reason).await?;
            tx.commit().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&row)?);
            } else {
                println!("unit {id} cancelled");
            }
        }
        WorkCommand::Orphans { json, .. } => print_orphans(&mut conn, json).await?,
        WorkCommand::Budgets { json, .. } => print_budgets(&mut conn, json).await?,
        WorkCommand::Weights {
            set, reset, json, ..
        } => weights(&mut conn, &set, &reset, json).await?,
        WorkCommand::Enqueue {
            kind,
            spec,
            count,
            max_attempts,
            json,
            ..
        } => {
            let spec: serde_json::Value =
                serde_json::from_str(&spec).context("--spec is not valid JSON")?;
            if kind.is_empty() || kind.len() > 128 {
                bail!("--kind must have 1 to 128 characters");
            }
            let units: Vec<NewWork> = (0..count)
                .map(|_| {
                    let mut u = NewWork::new(kind.clone(), spec.clone());
                    u.max_attempts = max_attempts;
                    u
                })
                .collect();
            let mut tx = pool.begin().await?;
            let done = queue::enqueue_many(&mut tx, &units).await?;
            tx.commit().await?;
            if json {
                let v: Vec<_> = done
                    .iter()
                    .map(|e| json!({"id": e.id, "token": e.token}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in &done {
                    println!("enqueued unit {} (token {})", e.id, e.token);
                }
            }
        }
    }
    Ok(())
}

/// `setpoint work weights`: checks every `--set` and `--reset` before changing anything, applies
/// them in one transaction, then lists the weights.
async fn weights(
    conn: &mut sqlx::PgConnection,
    set: &[String],
    reset: &[String],
    json: bool,
) -> Result<()> {
    use setpoint::store::tenant_weights::{
        MAX_WEIGHT, MIN_WEIGHT, tenant_weight_list, tenant_weight_reset, tenant_weight_set,
        valid_weight,
    };
    let mut changes: Vec<(String, Option<f64>)> = Vec::new();
    for s in set {
        // The weight follows the last `=`: a tenant's name may hold one.
        let Some((tenant, weight)) = s.rsplit_once('=') else {
            bail!("--set wants TENANT=WEIGHT, e.g. --set acme=4; got {s:?}");
        };
        let tenant = tenant.trim();
        if tenant.is_empty() {
            bail!("--set {s:?}: the tenant is empty");
        }
        let weight: f64 = match weight.trim().parse() {
            Ok(w) if valid_weight(w) => w,
            _ => bail!(
                "--set {s:?}: the weight must be a number from {MIN_WEIGHT} to {MAX_WEIGHT} \
                 (1 is the default)"
            ),
        };
        changes.push((tenant.to_owned(), Some(weight)));
    }
    for tenant in reset {
        if tenant.trim().is_empty() {
            bail!("--reset: the tenant is empty");
        }
        changes.push((tenant.trim().to_owned(), None));
    }
    // Set and reset apply in one transaction, in no order the user could see: a tenant named
    // twice is refused rather than guessed at.
    let mut named = std::collections::BTreeSet::new();
    for (tenant, _) in &changes {
        if !named.insert(tenant.as_str()) {
            bail!("{tenant} is named twice in --set/--reset: name each tenant once");
        }
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    for (tenant, weight) in &changes {
        match weight {
            Some(w) => tenant_weight_set(&mut tx, tenant, *w).await?,
            None => {
                if !tenant_weight_reset(&mut tx, tenant).await? {
                    eprintln!("{tenant} had no weight of its own: it weighs 1");
                }
            }
        }
    }
    tx.commit().await?;
    let rows = tenant_weight_list(conn).await?;
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|(tenant, weight)| json!({ "tenant": tenant, "weight": weight }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("every tenant weighs 1 (the default): set one with --set TENANT=WEIGHT");
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(tenant, weight)| vec![tenant.clone(), format!("{weight}")])
        .collect();
    print_table(&["TENANT", "WEIGHT"], &table);
    println!("\nEvery other tenant weighs 1. A weight applies to units enqueued after it was set.");
    Ok(())
}

/// `setpoint work budgets`: every key's shared rate and the units waiting for it.
async fn print_budgets(conn: &mut sqlx::PgConnection, json: bool) -> Result<()> {
    use setpoint::store::budgets::{budget_list, budget_waiting};
    let rows = budget_list(conn).await?;
    let waiting: std::collections::BTreeMap<String, (i64, i64)> = budget_waiting(conn)
        .await?
        .into_iter()
        .map(|(key, promised, lined)| (key, (promised, lined)))
        .collect();
    let waiting_of = |key: &str| waiting.get(key).map_or(0, |w| w.0);
    let in_line_of = |key: &str| waiting.get(key).map_or(0, |w| w.1);
    if json {
        let keys: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "key": r.key, "rate": r.rate, "max_rate": r.max_rate, "burst": r.burst,
                    "tokens": r.tokens, "at": r.at, "throttled_at": r.throttled_at,
                    "throttles": r.throttles, "waits": r.waits, "waiting": waiting_of(&r.key),
                    "in_line": in_line_of(&r.key),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "no budget has been used on this database: a key appears with its adapter's first \
             call (docs/budgets.md)"
        );
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.key.clone(),
                format!("{:.2}/{:.2}", r.rate, r.max_rate),
                format!("{:.0}", r.burst),
                format!("{:.1}", r.tokens),
                waiting_of(&r.key).to_string(),
                in_line_of(&r.key).to_string(),
                r.waits.to_string(),
                r.throttles.to_string(),
                r.throttled_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        &[
            "KEY",
            "RATE/MAX",
            "BURST",
            "TOKENS",
            "WAITING",
            "IN LINE",
            "WAITS",
            "THROTTLES",
            "LAST THROTTLE",
        ],
        &table,
    );
    println!(
        "\nRATE is the shared rate every engine takes at (AIMD lowers it on a throttle, at most \
         once a second, and raises it slowly back to MAX). TOKENS as of the key's last take; \
         negative: promised to WAITING units. IN LINE: units at their first call, asleep until \
         the line of promises is short enough to let them in. WAITS and THROTTLES count over \
         every engine."
    );
    Ok(())
}

/// `setpoint work orphans`: what the last sweep of each region found.
async fn print_orphans(conn: &mut sqlx::PgConnection, json: bool) -> Result<()> {
    use setpoint::plugins::orphans::store;
    if !store::orphan_tables_exist(conn).await? {
        if json {
            println!("{}", json!({"sweeps": [], "orphans": []}));
        } else {
            println!(
                "no orphan sweep has run on this database: an engine with EC2 configured sweeps \
                 every [orphans] interval (10m by default)"
            );
        }
        return Ok(());
    }
    let sweeps = store::sweeps_list(conn).await?;
    let orphans = store::orphans_list(conn).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"sweeps": sweeps, "orphans": orphans}))?
        );
        return Ok(());
    }
    if sweeps.is_empty() {
        println!("no region has been swept yet");
    }
    for s in &sweeps {
        let at = s.swept_at.format("%Y-%m-%d %H:%M:%S UTC");
        match &s.error {
            Some(e) => println!(
                "{}: the sweep at {at} could not list the machines ({e}); below is what an \
                 earlier sweep found",
                s.region
            ),
            None => println!(
                "{}: swept at {at}: {} managed machine(s), {} orphan(s), {} terminated",
                s.region, s.machines, s.orphans, s.terminated
            ),
        }
    }
    if orphans.is_empty() {
        println!("no orphaned machines");
        return Ok(());
    }
    println!();
    let table: Vec<Vec<String>> = orphans
        .iter()
        .map(|o| {
            vec![
                o.region.clone(),
                o.instance_id.clone(),
                o.state.clone(),
                o.resource_id
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "-".into()),
                o.reason.clone(),
                o.launched_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_else(|| "?".into()),
                o.action.clone(),
                o.note.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "REGION", "MACHINE", "STATE", "RESOURCE", "REASON", "LAUNCHED", "ACTION", "NOTE",
        ],
        &table,
    );
    println!(
        "\nunknown-resource: the tag names a resource this database has no row of; extra: the tag \
         names a live resource whose record names another machine (a second launch of one \
         unit). Both are terminated when [orphans] terminate = true, once older than min_age. \
         deleted-resource: a deleted resource's machine; untagged: no resource tag. The last \
         two are never terminated."
    );
    Ok(())
}

fn print_unserved(report: &queue::Unserved) {
    if report.kinds.is_empty() {
        println!(
            "no unit waits for an engine: a live engine claims the kind of every pending unit"
        );
        return;
    }
    let total: i64 = report.kinds.iter().map(|k| k.units).sum();
    println!(
        "{total} unit(s) wait because no live engine claims their kind; start an engine whose \
         --kinds (worker.kinds) covers it:"
    );
    let kinds: Vec<Vec<String>> = report
        .kinds
        .iter()
        .map(|k| vec![k.kind.clone(), k.units.to_string()])
        .collect();
    print_table(&["KIND", "UNITS"], &kinds);
    println!();
    print_rows(&report.units);
    if (report.units.len() as i64) < total {
        println!(
            "(the oldest {} of {total}; --limit shows more)",
            report.units.len()
        );
    }
}

fn print_rows(rows: &[WorkRow]) {
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.kind.clone(),
                r.state.clone(),
                format!("{}/{}", r.attempt, r.max_attempts),
                r.run_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                r.token.clone(),
                r.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "KIND",
            "STATE",
            "ATTEMPT",
            "RUN AT",
            "TOKEN",
            "LAST ERROR",
        ],
        &table,
    );
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count().min(80));
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c: String = c.chars().take(80).collect();
                format!("{c:<w$}", w = widths[i])
            })
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

async fn bench_queue(args: setpoint::cli::BenchQueueArgs) -> Result<()> {
    let mut _cluster = None;
    let url = match args.database_url.clone() {
        Some(u) => u,
        None => {
            eprintln!(
                "starting a throw-away PostgreSQL with durable settings (fsync and synchronous_commit on)"
            );
            let c = tokio::task::spawn_blocking(|| {
                TempCluster::start(ClusterOptions {
                    durability: Durability::Durable,
                    ..ClusterOptions::default()
                })
            })
            .await??;
            eprintln!(
                "bench: PostgreSQL runs in {} (removed at the end, or on Ctrl-C)",
                c.dir().display()
            );
            let u = c.url("postgres");
            _cluster = Some(c);
            u
        }
    };
    let pool = store::connect(&url, 40)
        .await
        .with_context(|| format!("cannot connect to {}", redact_url(&url)))?;
    store::migrate(&pool).await?;
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'server_version')",
    )
    .fetch_all(&pool)
    .await?;
    let opts = setpoint::bench::QueueBenchOptions {
        jobs: args.jobs.clone(),
        workers: args.workers,
        enqueue_batch: args.enqueue_batch,
        claim_batch: args.claim_batch,
        latency_rate: args.latency_rate,
        latency_duration: args.latency_duration,
        baseline_cycles: args.baseline_cycles,
        baseline_clients: args.baseline_clients,
        unserved: args.unserved,
    };
    let report =
        setpoint::bench::run_queue_bench(&pool, &opts, |m| eprintln!("bench: {m}")).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"settings": settings, "report": report}))?
        );
        return Ok(());
    }
    let s: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "setpoint bench queue  ({}; {} workers, claim batch {})",
        s.join(", "),
        args.workers,
        args.claim_batch
    );
    println!(
        "{:>10}  {:>14}  {:>14}  {:>10}",
        "jobs", "enqueue/s", "drain/s", "unserved"
    );
    for d in &report.drains {
        println!(
            "{:>10}  {:>14.0}  {:>14.0}  {:>10}",
            d.jobs, d.enqueue_per_sec, d.drain_per_sec, d.unserved
        );
    }
    for d in report.drains.iter().filter(|d| d.unserved > 0) {
        if let Some(alone) = report
            .drains
            .iter()
            .find(|a| a.jobs == d.jobs && a.unserved == 0)
        {
            println!(
                "  drain of {} units with {} unserved at the head: {:+.1}% against without",
                d.jobs,
                d.unserved,
                (d.drain_per_sec / alone.drain_per_sec - 1.0) * 100.0
            );
        }
    }
    if let (Some(p50), Some(p99), Some(max)) = (
        report.pickup_p50_ms,
        report.pickup_p99_ms,
        report.pickup_max_ms,
    ) {
        println!(
            "pickup latency at {} units/s: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms ({} samples)",
            report.latency_rate, report.latency_samples
        );
    }
    if let Some(b) = report.baseline_cycles_per_sec {
        println!(
            "naive one-row queue (insert; claim 1 with SKIP LOCKED + delete), {} clients: {b:.0} cycles/s",
            args.baseline_clients
        );
        for d in &report.drains {
            println!(
                "  drain of {} units: {:.1}x the naive cycle rate",
                d.jobs,
                d.drain_per_sec / b
            );
        }
    }
    let alone: Vec<_> = report.drains.iter().filter(|d| d.unserved == 0).collect();
    if alone.len() >= 2 {
        let first = alone[0];
        for d in &alone[1..] {
            println!(
                "  drain rate at {} vs {}: {:+.1}%",
                d.jobs,
                first.jobs,
                (d.drain_per_sec / first.drain_per_sec - 1.0) * 100.0
            );
        }
    }
    let _ = Duration::ZERO;
    Ok(())
}
