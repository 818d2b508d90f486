//! How the API starts an operation on a resource: the first unit of the chain its kind
//! declares (or, for instances while no KVX kind is declared, the configured stand-in kinds),
//! and which regions live engines serve.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;

use crate::kinds::Chains;
use crate::queue::NewWork;
use crate::store::StoreError;
use crate::store::engines::regions_served;
use crate::store::instances::InstanceRow;

/// The first units of an instance's operations.
#[derive(Clone)]
pub enum FirstUnits {
    /// The kind is declared: its chains.
    Declared(Arc<Chains>),
    /// No KVX kind is declared (an engine without adapters, a test): each operation is one
    /// unit of the configured kind, with the instance in its spec.
    StandIn {
        /// The create's unit kind.
        create: String,
        /// The update's unit kind.
        update: String,
        /// The delete's unit kind.
        delete: String,
    },
}

impl std::fmt::Debug for FirstUnits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FirstUnits::Declared(_) => f.write_str("FirstUnits::Declared"),
            FirstUnits::StandIn { create, .. } => write!(f, "FirstUnits::StandIn({create})"),
        }
    }
}

impl FirstUnits {
    /// The unit kind that starts a create (the same for every create).
    pub fn create_kind(&self, kind: &str) -> String {
        match self {
            FirstUnits::Declared(chains) => chains
                .first_unit(kind, "create", uuid::Uuid::nil(), "", 1)
                .map(|u| u.kind)
                .unwrap_or_default(),
            FirstUnits::StandIn { create, .. } => create.clone(),
        }
    }

    /// The first unit of `operation` (`create`, `update`, `delete`, or a named chain) of
    /// `row`; `None` when the kind declares no step for it.
    pub fn first(&self, row: &InstanceRow, operation: &str) -> Option<NewWork> {
        match self {
            FirstUnits::Declared(chains) => {
                chains.first_unit(&row.kind, operation, row.id, &row.tenant, row.generation)
            }
            FirstUnits::StandIn {
                create,
                update,
                delete,
            } => {
                let kind = match operation {
                    "create" => create,
                    "update" => update,
                    "delete" => delete,
                    _ => return None,
                };
                Some(
                    NewWork::new(kind.clone(), stand_in_spec(row, operation))
                        .for_resource(row.id, &row.tenant),
                )
            }
        }
    }
}

/// The spec a stand-in unit of `operation` is enqueued with: the instance as a whole.
fn stand_in_spec(row: &InstanceRow, operation: &str) -> Value {
    json!({
        "instance_id": row.id,
        "tenant": row.tenant,
        "name": row.name,
        "operation": operation,
        "generation": row.generation,
        "spec": row.spec,
    })
}

/// The regions live engines serve for a kind, read at most every few seconds (a create must
/// not cost a query for it).
#[derive(Debug)]
pub struct ServedRegions {
    pool: PgPool,
    kind: String,
    cache: Mutex<Option<(Instant, Arc<Vec<String>>)>>,
}

/// How long a read of the served regions is used.
const FRESH_FOR: Duration = Duration::from_secs(5);

impl ServedRegions {
    /// The served regions of `kind`.
    pub fn new(pool: PgPool, kind: impl Into<String>) -> Self {
        Self {
            pool,
            kind: kind.into(),
            cache: Mutex::new(None),
        }
    }

    /// The regions, sorted.
    ///
    /// # Errors
    /// Database errors.
    pub async fn get(&self) -> Result<Arc<Vec<String>>, StoreError> {
        if let Ok(c) = self.cache.lock()
            && let Some((at, regions)) = c.as_ref()
            && at.elapsed() < FRESH_FOR
        {
            return Ok(regions.clone());
        }
        let mut conn = self.pool.acquire().await?;
        let regions = Arc::new(regions_served(&mut conn, &self.kind).await?);
        if let Ok(mut c) = self.cache.lock() {
            *c = Some((Instant::now(), regions.clone()));
        }
        Ok(regions)
    }
}
