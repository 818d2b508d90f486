//! SQL of the `instances` table, the resources of every kind (KVX instances are kind
//! `kvx.instance`): what the chains own (a step's outputs and conditions, clearing
//! `has_active_work` when a resource's chain of units ends) and what the API owns (create,
//! read, list, change). `status` is derived by the trigger of migrations 0002 and 0008 from
//! `operation` and `has_active_work`; nothing here sets it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::StoreError;

/// A fresh instance id, unique with overwhelming probability (74 random bits) and ordered by
/// creation time to the millisecond (the UUIDv7 layout).
pub fn new_instance_id() -> Uuid {
    // Time-ordered, not random (v4): the primary key and the work table's resource index then
    // grow at their right edge. With random ids every create writes into a random leaf page of
    // both, which on a table larger than memory costs a read, and after each checkpoint a
    // full-page image in the WAL, per index per create.
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    uuid::Builder::from_unix_timestamp_millis(millis, &rand::random()).into_uuid()
}

/// Merges `observed` (a JSON object) into the instance's observed state.
pub async fn instance_merge_observed(
    conn: &mut PgConnection,
    id: Uuid,
    observed: &Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE instances SET observed = observed || $2::jsonb, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(observed)
    .execute(conn)
    .await?;
    Ok(())
}

/// Clears `has_active_work` on those of `ids` that have no unit left pending or running that
/// holds them. Parked units do not count (a parked chain has ended and waits for an
/// operator), nor do units that run beside their resource (a notification, a drift check).
pub async fn instances_clear_active_work(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE instances i SET has_active_work = false, updated_at = now()
         WHERE i.id = ANY($1) AND i.has_active_work
           AND NOT EXISTS (SELECT 1 FROM work w WHERE w.resource_id = i.id AND w.state <> 'parked'
                                                  AND w.holds_resource)",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// How many of `tenant`'s resources have a change in flight (`has_active_work`), counting at
/// most `up_to` of them: the API's per-tenant quota only needs to know whether the limit is
/// reached, so the count stops there and its cost is bounded whatever the backlog
/// (`instances_active_tenant_idx`, migration 0021).
pub async fn tenant_changes_in_flight(
    conn: &mut PgConnection,
    tenant: &str,
    up_to: i64,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM instances
                               WHERE tenant = $1 AND has_active_work LIMIT $2) a",
    )
    .bind(tenant)
    .bind(up_to)
    .fetch_one(conn)
    .await?)
}

/// Where [`instances_fill_ready`] writes: `n` resources of `kind`, named `{name_prefix}{i}`
/// for `i` from `from`, spread over tenants `{tenant_prefix}0` … `{tenant_prefix}{tenants-1}`.
#[derive(Debug, Clone, Copy)]
pub struct Fill<'a> {
    /// The resources' kind.
    pub kind: &'a str,
    /// Their spec.
    pub spec: &'a Value,
    /// Tenant names are this and a number.
    pub tenant_prefix: &'a str,
    /// How many tenants.
    pub tenants: i64,
    /// Names are this and a number.
    pub name_prefix: &'a str,
    /// The first number.
    pub from: i64,
    /// How many.
    pub n: i64,
}

/// Writes READY resources as [`Fill`] says: the state a fleet is in once created, marked as
/// having joined the drift schedule (the caller places them there with
/// [`crate::store::drift::drift_schedule_fill`]), in one statement (for `setpoint bench scale`,
/// on a throw-away database). Returns the ids written.
///
/// # Errors
/// Database errors (a name already taken among them).
pub async fn instances_fill_ready(
    conn: &mut PgConnection,
    fill: Fill<'_>,
) -> Result<Vec<Uuid>, StoreError> {
    // The ids are made here, ordered by time like the API's (see `new_instance_id`).
    let ids: Vec<Uuid> = (0..fill.n).map(|_| new_instance_id()).collect();
    sqlx::query(
        "INSERT INTO instances (id, tenant, kind, name, spec, generation, observed_generation,
                                status, has_active_work, next_observe_at, created_at, updated_at)
         SELECT u.id, $2 || ((u.i - 1) % $3), $1, $4 || ($5 + u.i - 1), $6, 1, 1, 'READY', false,
                now(), now(), now()
         FROM unnest($7::uuid[]) WITH ORDINALITY AS u(id, i)",
    )
    .bind(fill.kind)
    .bind(fill.tenant_prefix)
    .bind(fill.tenants.max(1))
    .bind(fill.name_prefix)
    .bind(fill.from)
    .bind(fill.spec)
    .bind(&ids)
    .execute(conn)
    .await?;
    Ok(ids)
}

/// The ids of `tenant`'s READY resources of `kind` (benchmarks poll it to time create ->
/// READY).
///
/// # Errors
/// Database errors.
pub async fn instances_ready_ids(
    conn: &mut PgConnection,
    tenant: &str,
    kind: &str,
) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM instances WHERE tenant = $1 AND kind = $2 AND status = 'READY'",
    )
    .bind(tenant)
    .bind(kind)
    .fetch_all(conn)
    .await?)
}

/// Marks the instance as having active work (an operator retried its parked unit).
pub async fn instance_mark_active(conn: &mut PgConnection, id: Uuid) -> Result<(), StoreError> {
    sqlx::query("UPDATE instances SET has_active_work = true, updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// An instance as the API shows it, with the newest unit of work still queued for it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    /// Id (the API's `uid`).
    pub id: Uuid,
    /// Owning tenant.
    pub tenant: String,
    /// The resource's kind (`kvx.instance`).
    pub kind: String,
    /// Short name, unique among the tenant's live instances.
    pub name: String,
    /// Desired spec.
    pub spec: Value,
    /// The version of its kind's schema the spec was written for.
    pub spec_version: i32,
    /// Version of the spec.
    pub generation: i64,
    /// What workers observed.
    pub observed: Value,
    /// The generation the observed state was brought to.
    pub observed_generation: i64,
    /// `CREATING`, `READY`, `UPDATING`, `DELETING`, `DELETED`, `FAILED`.
    pub status: String,
    /// A unit of this instance is pending or running.
    pub has_active_work: bool,
    /// The operation in progress (`create`, `update`, `delete`), if any.
    pub operation: Option<String>,
    /// The newest unit of this instance still in the work table.
    pub active_work_id: Option<i64>,
    /// That unit's last error.
    pub last_error: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Deletion time (tombstone).
    pub deleted_at: Option<DateTime<Utc>>,
}

const INSTANCE_SELECT: &str =
    "SELECT i.id, i.tenant, i.kind, i.name, i.spec, i.spec_version, i.generation, i.observed,
        i.observed_generation, i.status, i.has_active_work, i.operation, i.created_at,
        i.updated_at, i.deleted_at, w.id AS active_work_id, w.last_error
     FROM instances i
     LEFT JOIN LATERAL (SELECT id, last_error FROM work WHERE resource_id = i.id AND holds_resource
                        ORDER BY id DESC LIMIT 1) w ON true";

const INSTANCE_RETURNING: &str =
    "RETURNING id, tenant, kind, name, spec, spec_version, generation, observed,
        observed_generation, status, has_active_work, operation, created_at, updated_at,
        deleted_at, NULL::bigint AS active_work_id, NULL::text AS last_error";

fn instance_row(r: sqlx::postgres::PgRow) -> Result<InstanceRow, StoreError> {
    Ok(InstanceRow {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        kind: r.try_get("kind")?,
        name: r.try_get("name")?,
        spec: r.try_get("spec")?,
        spec_version: r.try_get("spec_version")?,
        generation: r.try_get("generation")?,
        observed: r.try_get("observed")?,
        observed_generation: r.try_get("observed_generation")?,
        status: r.try_get("status")?,
        has_active_work: r.try_get("has_active_work")?,
        operation: r.try_get("operation")?,
        active_work_id: r.try_get("active_work_id")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        deleted_at: r.try_get("deleted_at")?,
    })
}

/// A resource to insert.
#[derive(Debug, Clone, Copy)]
pub struct NewResource<'a> {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant: &'a str,
    /// Its kind.
    pub kind: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its desired spec.
    pub spec: &'a Value,
    /// The version of its kind's schema the spec was written for.
    pub spec_version: i32,
}

/// Inserts a live resource with `operation = 'create'` and active work. Returns `None` when
/// the tenant already has a live resource of that kind and name.
pub async fn instance_insert(
    conn: &mut PgConnection,
    new: NewResource<'_>,
) -> Result<Option<InstanceRow>, StoreError> {
    let sql = format!(
        "INSERT INTO instances (id, tenant, kind, name, spec, spec_version, operation,
                                has_active_work)
         VALUES ($1, $2, $3, $4, $5, $6, 'create', true)
         -- Any unique index is an arbiter: the name per (tenant, kind), and, until the contract
         -- migration drops it, the previous release's per (tenant, name); either way a taken
         -- name is no insert, never an error (also when a concurrent create wins the race).
         ON CONFLICT DO NOTHING
         {INSTANCE_RETURNING}"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(new.id)
        .bind(new.tenant)
        .bind(new.kind)
        .bind(new.name)
        .bind(new.spec)
        .bind(new.spec_version)
        .fetch_optional(conn)
        .await?
        .map(instance_row)
        .transpose()
}

/// The tenant's live resource of `kind` called `name`; with `lock`, the row is locked for
/// update until the transaction ends.
pub async fn instance_get(
    conn: &mut PgConnection,
    tenant: &str,
    kind: &str,
    name: &str,
    lock: bool,
) -> Result<Option<InstanceRow>, StoreError> {
    let sql = format!(
        "{INSTANCE_SELECT} WHERE i.tenant = $1 AND i.kind = $2 AND i.name = $3
           AND i.deleted_at IS NULL{}",
        if lock { " FOR UPDATE OF i" } else { "" }
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(kind)
        .bind(name)
        .fetch_optional(conn)
        .await?
        .map(instance_row)
        .transpose()
}

/// Instance `id`, live or deleted.
pub async fn instance_get_by_id(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<InstanceRow>, StoreError> {
    let sql = format!("{INSTANCE_SELECT} WHERE i.id = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(instance_row)
        .transpose()
}

/// The tenant's live resources of `kind` ordered by name, after `after_name`, optionally only
/// those in `status`; at most `limit`.
pub async fn instance_list(
    conn: &mut PgConnection,
    tenant: &str,
    kind: &str,
    status: Option<&str>,
    after_name: Option<&str>,
    limit: i64,
) -> Result<Vec<InstanceRow>, StoreError> {
    let sql = format!(
        "{INSTANCE_SELECT} WHERE i.tenant = $1 AND i.kind = $5 AND i.deleted_at IS NULL
           AND ($2::text IS NULL OR i.status = $2)
           AND ($3::text IS NULL OR i.name > $3)
         ORDER BY i.name LIMIT $4"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(status)
        .bind(after_name)
        .bind(limit)
        .bind(kind)
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(instance_row).collect()
}

/// Live resources of `kind` of every tenant, ordered by tenant and name, after the cursor
/// `after` (a tenant and a name) when given: an admin's listing across tenants. The order is
/// that of `instances_tenant_kind_name_live_key` once the kind is fixed.
///
/// # Errors
/// Database errors.
pub async fn instance_list_all_tenants(
    conn: &mut PgConnection,
    kind: &str,
    status: Option<&str>,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<InstanceRow>, StoreError> {
    let sql = format!(
        "{INSTANCE_SELECT} WHERE i.kind = $1 AND i.deleted_at IS NULL
           AND ($2::text IS NULL OR i.status = $2)
           AND ($3::text IS NULL OR (i.tenant, i.name) > ($3::text, $4::text))
         ORDER BY i.tenant, i.name LIMIT $5"
    );
    let (after_tenant, after_name) = after.unzip();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(kind)
        .bind(status)
        .bind(after_tenant)
        .bind(after_name)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(instance_row).collect()
}

/// Starts `operation` (`update` or `delete`) on instance `id`: sets the new spec (bumping the
/// generation) when one is given, and marks the instance active. The trigger sets the status.
pub async fn instance_start_operation(
    conn: &mut PgConnection,
    id: Uuid,
    operation: &str,
    new_spec: Option<&Value>,
) -> Result<InstanceRow, StoreError> {
    let sql = format!(
        "UPDATE instances SET spec = coalesce($3, spec),
                generation = generation + CASE WHEN $3::jsonb IS NULL THEN 0 ELSE 1 END,
                operation = $2, has_active_work = true, updated_at = now()
         WHERE id = $1
         {INSTANCE_RETURNING}"
    );
    let r = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(operation)
        .bind(new_spec)
        .fetch_one(conn)
        .await?;
    instance_row(r)
}

/// Starts `operation` on resource `id` with `new_spec` written for version `spec_version` of
/// its kind's schema (a new generation), as [`instance_start_operation`] does.
///
/// # Errors
/// Database errors.
pub async fn resource_start_operation(
    conn: &mut PgConnection,
    id: Uuid,
    operation: &str,
    new_spec: &Value,
    spec_version: i32,
) -> Result<InstanceRow, StoreError> {
    let sql = format!(
        "UPDATE instances SET spec = $3, spec_version = $4, generation = generation + 1,
                operation = $2, has_active_work = true, updated_at = now()
         WHERE id = $1
         {INSTANCE_RETURNING}"
    );
    let r = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(operation)
        .bind(new_spec)
        .bind(spec_version)
        .fetch_one(conn)
        .await?;
    instance_row(r)
}

/// The sealed secret outputs of resource `id`, if it has any.
///
/// # Errors
/// Database errors.
pub async fn resource_secrets(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<Vec<u8>>, StoreError> {
    let sealed: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT secrets FROM instances WHERE id = $1")
            .bind(id)
            .fetch_optional(conn)
            .await?;
    Ok(sealed.flatten())
}

/// The NOTIFY channel on which the `instances_notify` trigger announces every change of an
/// instance (payload: the instance id).
pub const INSTANCE_CHANNEL: &str = "setpoint_instances";

/// What a chain step reads of its resource (live or deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct StepResource {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant: String,
    /// Its kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its desired spec.
    pub spec: Value,
    /// The schema version the spec was written for.
    pub spec_version: i32,
    /// Its spec generation.
    pub generation: i64,
    /// Its observed state: step outputs by name, and `conditions`.
    pub observed: Value,
    /// Its sealed secret outputs.
    pub secrets: Option<Vec<u8>>,
    /// The operation in progress, if any.
    pub operation: Option<String>,
    /// Its status.
    pub status: String,
    /// True once deleted.
    pub deleted: bool,
    /// A unit holding it is queued or running.
    pub has_active_work: bool,
}

/// Resource `id`, live or deleted; with `lock`, locked until the transaction ends.
pub async fn resource_for_step(
    conn: &mut PgConnection,
    id: Uuid,
    lock: bool,
) -> Result<Option<StepResource>, StoreError> {
    let sql = if lock {
        "SELECT id, tenant, kind, name, spec, spec_version, generation, observed, secrets,
                operation, status, deleted_at IS NOT NULL AS deleted, has_active_work
         FROM instances WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT id, tenant, kind, name, spec, spec_version, generation, observed, secrets,
                operation, status, deleted_at IS NOT NULL AS deleted, has_active_work
         FROM instances WHERE id = $1"
    };
    let row = sqlx::query(sql).bind(id).fetch_optional(conn).await?;
    row.map(|r| {
        Ok(StepResource {
            id: r.try_get("id")?,
            tenant: r.try_get("tenant")?,
            kind: r.try_get("kind")?,
            name: r.try_get("name")?,
            spec: r.try_get("spec")?,
            spec_version: r.try_get("spec_version")?,
            generation: r.try_get("generation")?,
            observed: r.try_get("observed")?,
            secrets: r.try_get("secrets")?,
            operation: r.try_get("operation")?,
            status: r.try_get("status")?,
            deleted: r.try_get("deleted")?,
            has_active_work: r.try_get("has_active_work")?,
        })
    })
    .transpose()
}

/// Records what a step learned: `outputs` (an object of output name → value) merged into the
/// observed state, the whole `conditions` list (also mirrored into its column), and, when
/// given, the sealed secrets.
pub async fn resource_record_step(
    conn: &mut PgConnection,
    id: Uuid,
    outputs: &Value,
    conditions: &Value,
    secrets: Option<&[u8]>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE instances
         SET observed = observed || $2::jsonb || jsonb_build_object('conditions', $3::jsonb),
             conditions = $3::jsonb, secrets = coalesce($4, secrets), updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(outputs)
    .bind(conditions)
    .bind(secrets)
    .execute(conn)
    .await?;
    Ok(())
}

/// Which of `ids` name a resource of any kind that still has a row, and whether it is deleted
/// (a tombstone, kept until retention removes it): `(id, deleted)` for each one found. A
/// resource id that is absent has no row at all: it never existed here, or its tombstone was
/// pruned.
///
/// # Errors
/// Database errors.
pub async fn resources_known(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, bool)>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT id, deleted_at IS NOT NULL AS deleted FROM instances WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("deleted")?)))
        .collect()
}

/// How many resources have active work (a chain of units running).
///
/// # Errors
/// Database errors.
pub async fn resources_active_count(conn: &mut PgConnection) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM instances WHERE has_active_work")
            .fetch_one(conn)
            .await?,
    )
}

/// One resource as [`resources_of_tenant_kind`] reads it, tombstones included.
#[derive(Debug, Clone)]
pub struct ResourceSummary {
    /// Its id.
    pub id: Uuid,
    /// Its name (unique per tenant and kind).
    pub name: String,
    /// Its status (`READY`, `DELETED`, ...).
    pub status: String,
    /// Its spec's generation.
    pub generation: i64,
    /// Deleted: a tombstone.
    pub deleted: bool,
    /// Its observed state (outputs and conditions).
    pub observed: Value,
}

/// Every resource of `tenant` of kind `kind`, tombstones included, by name.
///
/// # Errors
/// Database errors.
pub async fn resources_of_tenant_kind(
    conn: &mut PgConnection,
    tenant: &str,
    kind: &str,
) -> Result<Vec<ResourceSummary>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, name, status, generation, deleted_at IS NOT NULL AS deleted, observed
           FROM instances WHERE tenant = $1 AND kind = $2 ORDER BY name",
    )
    .bind(tenant)
    .bind(kind)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ResourceSummary {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                status: r.try_get("status")?,
                generation: r.try_get("generation")?,
                deleted: r.try_get("deleted")?,
                observed: r.try_get("observed")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::new_instance_id;

    #[test]
    fn instance_ids_are_uuidv7_distinct_and_ordered_by_creation_time() {
        let first = new_instance_id();
        assert_eq!(first.get_version(), Some(uuid::Version::SortRand));
        assert_eq!(first.get_variant(), uuid::Variant::RFC4122);
        let same_ms: std::collections::HashSet<_> = (0..1000).map(|_| new_instance_id()).collect();
        assert_eq!(
            same_ms.len(),
            1000,
            "ids of the same millisecond must differ"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = new_instance_id();
        assert!(later > first, "a later id sorts after an earlier one");
        let (secs, _) = later
            .get_timestamp()
            .map(|t| t.to_unix())
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        assert!(now.abs_diff(secs) <= 1, "the id carries its creation time");
    }
}
