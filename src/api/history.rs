//! `ResourceService.ListResourceHistory`: a resource's units of work, newest first, each with
//! its events — the timeline the console shows on a resource's page.
//!
//! An admin reads the units as WorkService shows them (raw errors, workers, details). A tenant
//! reads what happened in curated words, like its resource's `last_error`
//! ([`super::tenant_view`]): the adapter's text can name accounts, hosts or an operator's
//! token, so it stays with operators; so do worker and operator names, a unit's spec and its
//! lease owner. What a tenant keeps of an event's detail is the list of adapter calls made
//! with the unit's token: the proof that a retry repeated the same call, never a second one.

use std::collections::HashMap;

use serde_json::{Map, Value};
use sqlx::PgPool;

use super::auth::Caller;
use super::convert::{self, json_to_struct, timestamp};
use super::errors::{ApiError, Violation};
use super::page_token::{self, Scope};
use super::proto::{ListResourceHistoryRequest, ListResourceHistoryResponse, WorkEvent, WorkUnit};
use super::tenant_view::Audience;
use crate::store::StoreError;
use crate::store::events::{
    WorkEvent as EventRow, events_for_works, resource_work_ids, work_kinds,
};
use crate::store::instances::instance_get;
use crate::store::work::work_get_many;

/// Units per page when the request does not say.
const DEFAULT_PAGE: i32 = 20;
/// Most units per page.
const MAX_PAGE: i32 = 100;

/// A checked page request.
#[derive(Debug, Clone)]
pub struct Page {
    limit: i64,
    before: Option<i64>,
    scope: Scope,
}

/// Checks the paging fields of `r` for `caller` (a page token is bound to the caller's tenant
/// and the resource's name).
pub fn page(caller: &Caller, r: &ListResourceHistoryRequest, v: &mut Vec<Violation>) -> Page {
    let limit = if (0..=MAX_PAGE).contains(&r.page_size) {
        i64::from(if r.page_size == 0 {
            DEFAULT_PAGE
        } else {
            r.page_size
        })
    } else {
        v.push(Violation::new(
            "page_size",
            format!("must be between 0 and {MAX_PAGE} (0 means {DEFAULT_PAGE})"),
        ));
        i64::from(DEFAULT_PAGE)
    };
    let scope = Scope::new("ListResourceHistory", &[&caller.tenant, &r.name]);
    let before = if r.page_token.is_empty() {
        None
    } else {
        let id = page_token::decode(&scope, &r.page_token)
            .and_then(|c| c.parse::<i64>().ok())
            .filter(|id| *id > 0);
        if id.is_none() {
            v.push(Violation::new(
                "page_token",
                "not a page token of this listing: it must be the next_page_token of the page \
                 before, asked for by the same tenant about the same resource",
            ));
        }
        id
    };
    Page {
        limit,
        before,
        scope,
    }
}

/// The history of `tenant`'s live resource `name` of kind `kind`, one page of it, as
/// `caller` may read it (the tenant is the caller's own, or any for an admin: the caller of
/// [`super::validate::name_tenant`] has checked that).
///
/// # Errors
/// `NOT_FOUND` when the tenant has no such live resource; database errors.
pub async fn list(
    pool: &PgPool,
    caller: &Caller,
    tenant: &str,
    kind: &str,
    name: &str,
    resource_name: &str,
    page: Page,
) -> Result<ListResourceHistoryResponse, ApiError> {
    let mut conn = pool.acquire().await.map_err(StoreError::from)?;
    let row = instance_get(&mut conn, tenant, kind, name, false)
        .await?
        .ok_or_else(|| ApiError::NotFound(resource_name.to_owned()))?;
    let mut ids = resource_work_ids(&mut conn, row.id, page.before, page.limit + 1).await?;
    let more = ids.len() as i64 > page.limit;
    ids.truncate(usize::try_from(page.limit).unwrap_or(0));
    let mut rows: HashMap<i64, _> = work_get_many(&mut conn, &ids)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let kinds: HashMap<i64, String> = work_kinds(&mut conn, &ids).await?.into_iter().collect();
    let mut events: HashMap<i64, Vec<EventRow>> = HashMap::new();
    for e in events_for_works(&mut conn, &ids).await? {
        events.entry(e.work_id).or_default().push(e);
    }
    let audience = Audience::of(caller);
    let units = ids
        .iter()
        .map(|id| {
            let history = events.remove(id).unwrap_or_default();
            let unit = match rows.remove(id) {
                Some(row) => convert::work_unit(&row),
                None => WorkUnit {
                    id: *id,
                    kind: kinds.get(id).cloned().unwrap_or_default(),
                    state: "finished".into(),
                    token: history.first().map(|e| e.token.clone()).unwrap_or_default(),
                    resource_id: row.id.to_string(),
                    tenant: row.tenant.clone(),
                    attempt: history.iter().filter_map(|e| e.attempt).max().unwrap_or(0),
                    run_at: history.last().map(|e| timestamp(e.at)),
                    create_time: history.first().map(|e| timestamp(e.at)),
                    ..WorkUnit::default()
                },
            };
            shown(unit, &history, audience)
        })
        .collect();
    let next_page_token = match (more, ids.last()) {
        (true, Some(last)) => page_token::encode(&page.scope, &last.to_string()),
        _ => String::new(),
    };
    Ok(ListResourceHistoryResponse {
        units,
        next_page_token,
    })
}

/// `unit` with `history`, as `audience` reads it.
fn shown(mut unit: WorkUnit, history: &[EventRow], audience: Audience) -> WorkUnit {
    match audience {
        Audience::Operator => {
            unit.events = history.iter().map(convert::work_event).collect();
        }
        Audience::Tenant => {
            unit.events = history.iter().map(tenant_event).collect();
            unit.last_error = tenant_unit_error(&unit);
            unit.spec = None;
            unit.lease_owner = String::new();
        }
    }
    unit
}

/// What a tenant reads as a unit's `last_error`: whether it is retried or waits for an
/// operator, never the adapter's text.
fn tenant_unit_error(unit: &WorkUnit) -> String {
    if unit.last_error.is_empty() {
        return String::new();
    }
    if unit.state == "parked" {
        format!(
            "this step failed and waits for an operator (unit {})",
            unit.id
        )
    } else if unit.state == "finished" {
        String::new()
    } else {
        "this step ran into a problem and is retried automatically".into()
    }
}

/// An event as a tenant reads it: see the module documentation.
fn tenant_event(e: &EventRow) -> WorkEvent {
    let calls = e
        .detail
        .as_ref()
        .and_then(|d| d.get("calls"))
        .filter(|c| c.as_array().is_some_and(|a| !a.is_empty()))
        .cloned();
    let detail = calls.map(|c| {
        let mut m = Map::new();
        m.insert("calls".into(), c);
        json_to_struct(&Value::Object(m))
    });
    WorkEvent {
        event: e.event.clone(),
        attempt: e.attempt.unwrap_or(0),
        worker: String::new(),
        error_class: e.error_class.clone().unwrap_or_default(),
        message: tenant_message(&e.event, e.error_class.as_deref()).into(),
        detail,
        time: Some(timestamp(e.at)),
    }
}

/// The curated words for an event.
fn tenant_message(event: &str, class: Option<&str>) -> &'static str {
    match (event, class) {
        ("enqueued", _) => "queued",
        ("claimed", _) => "started",
        ("rescued", _) => "taken over after its worker stopped",
        ("succeeded", _) => "done",
        ("failed", Some("permanent")) => "failed; waits for an operator",
        ("failed", _) => "ran into a problem; retried automatically",
        ("waiting", _) => "waiting its turn (the attempt does not count)",
        ("parked", _) => "waits for an operator",
        ("retried", _) => "retried by an operator",
        ("cancelled", _) => "cancelled by an operator",
        ("superseded", _) => "dropped: the resource is being deleted",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;

    use super::*;

    fn event(event: &str, class: Option<&str>, message: &str, detail: Value) -> EventRow {
        EventRow {
            id: 1,
            work_id: 7,
            token: "tok-1".into(),
            event: event.into(),
            attempt: Some(2),
            worker: Some("api:token-3@ops".into()),
            error_class: class.map(str::to_owned),
            message: Some(message.into()),
            detail: Some(detail),
            at: Utc::now(),
        }
    }

    #[test]
    fn a_tenant_reads_calls_and_curated_words_never_the_raw_text() {
        let raw = "InvalidAMIID.NotFound: ami-1 in account 111122223333";
        let e = tenant_event(&event(
            "failed",
            Some("permanent"),
            raw,
            json!({"code": "InvalidAMIID.NotFound", "calls": ["ec2:ensure-instance token=tok-1"]}),
        ));
        assert_eq!(e.message, "failed; waits for an operator");
        assert!(e.worker.is_empty());
        let detail = convert::struct_to_json(e.detail.as_ref().expect("calls"));
        assert_eq!(
            detail,
            json!({"calls": ["ec2:ensure-instance token=tok-1"]})
        );
        let quiet = tenant_event(&event("retried", None, "by api:token-3@ops", json!({})));
        assert_eq!(quiet.message, "retried by an operator");
        assert!(quiet.detail.is_none());
        let unit = WorkUnit {
            id: 7,
            state: "parked".into(),
            last_error: raw.into(),
            ..WorkUnit::default()
        };
        assert_eq!(
            tenant_unit_error(&unit),
            "this step failed and waits for an operator (unit 7)"
        );
    }
}
