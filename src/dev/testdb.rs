//! Fresh, migrated databases for tests, on one throw-away cluster per test process.
//!
//! The first call starts a cluster (non-durable settings: tests never survive a machine crash)
//! and migrates a template database; every call then copies the template into a new database,
//! so tests are isolated from each other and run in parallel. The cluster stops and its folder
//! is removed when the test process exits.

use std::sync::OnceLock;

use sqlx::PgPool;
use tokio::sync::OnceCell;

use super::postgres::{ClusterError, ClusterOptions, TempCluster};
use crate::store::{self, StoreError};

/// Why a test database could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TestDbError {
    /// The cluster could not start.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A database statement failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// A pool on the database.
    pub pool: PgPool,
    /// Its URL (for child processes).
    pub url: String,
    /// Its name.
    pub name: String,
}

static CLUSTER: OnceLock<Result<TempCluster, String>> = OnceLock::new();
static TEMPLATE: OnceCell<()> = OnceCell::const_new();

fn cluster() -> Result<&'static TempCluster, TestDbError> {
    let c = CLUSTER.get_or_init(|| {
        let c = TempCluster::start(ClusterOptions {
            max_connections: 500,
            ..ClusterOptions::default()
        })
        .map_err(|e| e.to_string())?;
        c.stop_when_process_exits(std::process::id())
            .map_err(|e| e.to_string())?;
        Ok(c)
    });
    c.as_ref().map_err(|e| {
        TestDbError::Cluster(ClusterError::Command {
            command: "starting the test cluster".into(),
            output: e.clone(),
        })
    })
}

/// A new, migrated database on this process's test cluster.
///
/// # Errors
/// When PostgreSQL cannot be started or a statement fails.
pub async fn test_db() -> Result<TestDb, TestDbError> {
    let cluster = tokio::task::spawn_blocking(cluster).await.map_err(|e| {
        TestDbError::Cluster(ClusterError::Command {
            command: "starting the test cluster".into(),
            output: e.to_string(),
        })
    })??;
    TEMPLATE
        .get_or_try_init(|| async {
            let admin = store::connect(&cluster.url("postgres"), 1).await?;
            sqlx::query("CREATE DATABASE setpoint_template")
                .execute(&admin)
                .await
                .map_err(StoreError::from)?;
            admin.close().await;
            let tmpl = store::connect(&cluster.url("setpoint_template"), 1).await?;
            store::migrate(&tmpl).await?;
            tmpl.close().await;
            Ok::<(), TestDbError>(())
        })
        .await?;
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = store::connect(&cluster.url("postgres"), 1).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} TEMPLATE setpoint_template"
    )))
    .execute(&admin)
    .await
    .map_err(StoreError::from)?;
    admin.close().await;
    let url = cluster.url(&name);
    let pool = store::connect(&url, 20).await?;
    Ok(TestDb { pool, url, name })
}
