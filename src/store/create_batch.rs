//! The SQL of the API's group commit for CreateInstance: many creates in ONE statement that
//! claims their request ids (with the answers already in them), inserts their instances and
//! enqueues the first unit of each, with its `enqueued` event.
//!
//! It spans four tables because being one statement is its purpose: run outside a transaction
//! it commits on its own, so a batch costs one round trip instead of six (begin, claim and
//! insert, enqueue, store the answers, commit), and each request id row is written once, with
//! its answer, instead of inserted and then updated. That works because the caller knows every
//! value of the answer before the statement runs: the instance id, the creation time, the
//! unit's id (reserved with [`super::work::work_reserve_ids`]) and its token.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::StoreError;

/// One create of a batch for [`instances_create_batch`].
#[derive(Debug, Clone)]
pub struct BatchCreate<'a> {
    /// The owning tenant.
    pub tenant: &'a str,
    /// The client's request id.
    pub request_id: &'a str,
    /// sha256 of the request's body (see `api_requests`).
    pub body_hash: &'a [u8],
    /// The encoded answer, stored under the request id.
    pub response: &'a [u8],
    /// The new instance's id.
    pub id: Uuid,
    /// Its name.
    pub name: &'a str,
    /// Its desired spec.
    pub spec: &'a Value,
    /// The id of its first unit of work, reserved from the work table's sequence.
    pub work_id: i64,
    /// That unit's idempotency token (freshly generated).
    pub token: &'a str,
    /// That unit's spec.
    pub work_spec: &'a Value,
}

/// The statement. A create is written only when, as of the statement's snapshot, its request
/// id is new and its name is not live; then all of it is (request id with answer, instance,
/// unit, event), so the steps need no joins between them: a generic plan, which knows nothing
/// of the batch's size, would run such joins by comparing every create with every other.
/// Each check is a LATERAL subquery with a LIMIT, which stays one index probe per create; a
/// NOT EXISTS would become an anti-join, which a generic plan made while a table was small
/// runs by reading all of it.
const CREATE_BATCH: &str = "WITH input AS (
         SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::bytea[], $5::bytea[],
                              $6::uuid[], $7::text[], $8::jsonb[], $9::bigint[], $10::text[],
                              $11::jsonb[])
             AS u(ord, tenant, request_id, body_hash, response, id, name, spec, work_id, token,
                  work_spec)
     ), last AS MATERIALIZED (
         -- Each tenant's last unit waiting in the change lane: one probe per tenant of the
         -- batch, not per create (a probe may pass the entries of the other executor's
         -- uncommitted batch of the same tenant).
         SELECT t.tenant,
                (SELECT w.fair_at FROM work w
                 WHERE coalesce(w.tenant, '') = t.tenant AND w.kind = $14
                   AND w.lane = 0 AND w.state IN ('pending', 'queued')
                 ORDER BY w.fair_at DESC LIMIT 1) AS fair_at,
                $16::float8 / 1000 / coalesce(
                    (SELECT tw.weight FROM tenant_weights tw WHERE tw.tenant = t.tenant), 1)
                    AS spacing
         FROM (SELECT DISTINCT tenant FROM input) t
     ), checked AS (
         SELECT i.*, seen.taken IS NULL AND live.taken IS NULL AS ok,
                -- The unit's place in the change lane: after its tenant's last unit waiting
                -- there, spaced by its weight (see `work_enqueue`), or now.
                greatest(now() - make_interval(secs => last.spacing), last.fair_at)
                    + make_interval(secs => last.spacing
                        * row_number() OVER (PARTITION BY i.tenant ORDER BY i.ord)) AS fair_at
         FROM input i
         LEFT JOIN LATERAL (SELECT true AS taken FROM api_requests a
                            WHERE a.tenant = i.tenant AND a.request_id = i.request_id
                            LIMIT 1) seen ON true
         LEFT JOIN LATERAL (SELECT true AS taken FROM instances x
                            WHERE x.tenant = i.tenant AND x.name = i.name
                              AND x.kind = $15 AND x.deleted_at IS NULL
                            LIMIT 1) live ON true
         LEFT JOIN last ON last.tenant = i.tenant
     ), claimed AS (
         INSERT INTO api_requests (tenant, request_id, method, body_hash, response)
         SELECT tenant, request_id, $12, body_hash, response FROM checked WHERE ok
         ORDER BY tenant, request_id
         RETURNING 1
     ), inserted AS (
         INSERT INTO instances (id, tenant, kind, name, spec, operation, has_active_work,
                                created_at, updated_at)
         SELECT id, tenant, $15, name, spec, 'create', true, $13, $13 FROM checked
         -- The subquery runs first, once: every request id is claimed before the first name.
         WHERE ok AND (SELECT count(*) FROM claimed) >= 0
         ORDER BY tenant, name
         RETURNING 1
     ), queued AS (
         INSERT INTO work (id, kind, spec, token, resource_id, tenant, state, lane, fair_at)
         OVERRIDING SYSTEM VALUE
         SELECT work_id, $14, work_spec, token, id, tenant, 'queued', 0, fair_at
         FROM checked WHERE ok
         RETURNING id, token, resource_id, kind
     ), ev AS (
         INSERT INTO work_events (work_id, token, event, resource_id, kind)
         SELECT id, token, 'enqueued', resource_id, kind FROM queued
     )
     SELECT ord, ok FROM checked ORDER BY ord";

/// Readies a connection of its own for [`instances_create_batch`]: generic plans (see
/// [`super::use_generic_plans`]) and no sequential scans.
///
/// A generic plan is made once, with estimates that know nothing of the batch and, on a new
/// database, think the tables are tiny: it would read the whole instances table for the name
/// check of every batch until the next ANALYZE. The name check must probe the unique index.
///
/// # Errors
/// Database errors.
pub async fn prepare_batch_connection(conn: &mut PgConnection) -> Result<(), StoreError> {
    super::use_generic_plans(conn).await?;
    sqlx::query("SET enable_seqscan = off")
        .execute(conn)
        .await?;
    Ok(())
}

/// Writes many CreateInstance calls (as `method`, units of `kind`, created at `created_at`)
/// with one statement; one answer per create, in order: `true` when it was written (its request
/// id holds its answer, its instance is CREATING and its unit is queued), `false` when nothing
/// of it was because its request id was taken (a repeat or a reuse) or its name was live.
/// Outside a transaction the statement commits on its own.
///
/// Request ids are claimed in (tenant, request id) order, all before the first name, and names
/// are taken in (tenant, name) order, so two such statements, or one and a single create (which
/// claims its request id before its name), never wait for each other in a cycle. A request id
/// or a name that another transaction holds makes the statement wait for it to end; if that
/// transaction committed, the whole statement fails (a unique violation) and nothing is
/// written. Request ids and names must be distinct within one call (per tenant).
///
/// # Errors
/// Database errors, in which case nothing was written (unless the commit's outcome is unknown).
pub async fn instances_create_batch(
    conn: &mut PgConnection,
    method: &str,
    resource_kind: &str,
    kind: &str,
    created_at: DateTime<Utc>,
    creates: &[BatchCreate<'_>],
) -> Result<Vec<bool>, StoreError> {
    if creates.is_empty() {
        return Ok(Vec::new());
    }
    let n = creates.len();
    let ords: Vec<i32> = (0..n)
        .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
        .collect();
    let rows = sqlx::query(CREATE_BATCH)
        .bind(&ords)
        .bind(creates.iter().map(|c| c.tenant).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.request_id).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.body_hash).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.response).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.id).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.name).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.spec).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.work_id).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.token).collect::<Vec<_>>())
        .bind(creates.iter().map(|c| c.work_spec).collect::<Vec<_>>())
        .bind(method)
        .bind(created_at)
        .bind(kind)
        .bind(resource_kind)
        .bind(super::work::FAIR_SPACING_MS)
        .fetch_all(conn)
        .await?;
    if rows.len() != n {
        return Err(StoreError::Database(sqlx::Error::Protocol(format!(
            "batched create returned {} rows for {n} creates",
            rows.len()
        ))));
    }
    rows.into_iter()
        .map(|r| Ok(r.try_get::<bool, _>("ok")?))
        .collect()
}
