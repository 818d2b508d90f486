//! `custom-engine`: setpoint's engine with the built-in plugins and the webhook plugin.
//!
//! ```sh
//! DATABASE_URL=postgres://setpoint@db/setpoint SETPOINT_WEBHOOK_SECRET=… \
//!     custom-engine --config engine.toml --listen 0.0.0.0:50051 --metrics-listen 0.0.0.0:9090
//! ```
//!
//! It applies setpoint's migrations, then starts the engine (workers, the gRPC API with the
//! plugin's service, metrics and `/readyz`), until SIGTERM or ctrl-c: then it stops claiming,
//! lets running units finish within the shutdown grace, and exits.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use custom_engine::WebhookPlugin;
use setpoint::config::{FileConfig, database_url_from_parts, redact_url};
use setpoint::engine::EngineBuilder;
use setpoint::kinds::SecretBox;
use setpoint::plugins::kvx::KvxConfig;
use tokio_util::sync::CancellationToken;

/// setpoint with a webhook notifier plugin.
#[derive(Debug, Parser)]
#[command(name = "custom-engine", version)]
struct Args {
    /// The configuration file: setpoint's keys and `[plugins.webhook]`.
    #[arg(long, env = "SETPOINT_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL URL (else the file's `database_url`, else SETPOINT_DATABASE_HOST and its
    /// siblings, as the Terraform module sets them).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz` (else the file's `metrics_listen`).
    #[arg(long, env = "SETPOINT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// This engine's id in leases and in the engines table (default: host name and pid).
    #[arg(long, env = "SETPOINT_WORKER_ID")]
    worker_id: Option<String>,
    /// How long running units may take to finish after SIGTERM (else the file's
    /// `worker.shutdown_grace`).
    #[arg(long, env = "SETPOINT_SHUTDOWN_GRACE", value_parser = setpoint::config::parse_duration)]
    shutdown_grace: Option<std::time::Duration>,
    /// Log lines as `text` or `json`.
    #[arg(long, env = "SETPOINT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The gRPC API's settings, as `setpoint serve` takes them.
    #[command(flatten)]
    api: setpoint::api::ApiArgs,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
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

async fn run(args: Args) -> Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let url = args
        .database_url
        .clone()
        .or_else(|| file.database_url.clone())
        .or_else(|| database_url_from_parts(|k| std::env::var(k).ok()))
        .context(
            "no database: set DATABASE_URL (or --database-url, or database_url in the file)",
        )?;
    let mut worker = file.worker_config();
    worker.worker_id = args.worker_id.clone();
    if let Some(grace) = args.shutdown_grace {
        worker.shutdown_grace = grace;
    }
    worker.validate()?;
    let api_config = args.api.config(&file.api)?;
    let secrets = match std::env::var("SETPOINT_SECRETS_KEY") {
        Ok(keys) if !keys.trim().is_empty() => SecretBox::from_keys(&keys)?,
        _ => SecretBox::none(),
    };

    let max = file.database_max_connections.unwrap_or(16);
    let pool = setpoint::store::connect(&url, max)
        .await
        .with_context(|| format!("cannot connect to {}", redact_url(&url)))?;
    setpoint::store::migrate(&pool)
        .await
        .context("applying setpoint's migrations")?;

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        signal.cancel();
    });

    let mut builder = EngineBuilder::new(pool.clone())
        .worker(worker)
        .secrets(secrets)
        .drift(file.workflows.resync_interval)
        .api(args.api.listen(&file.api), api_config)
        // The stock engine's plugins first (they provide clients to the ones after them),
        // then ours.
        .plugins(setpoint::plugins::builtin(KvxConfig::default()))
        .plugin(WebhookPlugin::new(pool));
    if let Some(addr) = args.metrics_listen.or(file.metrics_listen) {
        builder = builder.metrics(addr);
    }
    let engine = builder.file(file).start(shutdown).await?;
    tracing::info!(
        api = %engine.api_addr.map(|a| a.to_string()).unwrap_or_default(),
        metrics = %engine.metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
        kinds = ?engine.catalog.kinds().map(|k| k.decl.name.clone()).collect::<Vec<_>>(),
        "custom engine running"
    );
    engine.wait().await?;
    tracing::info!("custom engine stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing(&args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
