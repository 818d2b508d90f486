//! The console's pages: askama templates (`templates/console/`), compiled with the binary and
//! checked when it is built. Every value is HTML-escaped unless a template says otherwise, and
//! none does: a spec value `<script>` is shown as the text it is.

use askama::Template;
use serde_json::Value;

use super::forms::Field;
use crate::api::convert::struct_to_json;
use crate::api::proto::{Resource, ResourceStatus, WorkEvent, WorkUnit};

/// What every page's frame shows: who is signed in, and the token its forms carry.
#[derive(Debug, Clone, Default)]
pub struct Chrome {
    /// Signed in.
    pub signed_in: bool,
    /// The tenant.
    pub tenant: String,
    /// An admin: the work page is offered.
    pub admin: bool,
    /// The session's CSRF token (the sign-out form).
    pub csrf: String,
}

/// The sign-in page.
#[derive(Template)]
#[template(path = "console/sign_in.html")]
pub struct SignInPage {
    /// Frame.
    pub chrome: Chrome,
    /// The sign-in form's CSRF token.
    pub csrf: String,
    /// Why the last attempt failed, or why the session ended.
    pub message: String,
}

/// A kind in the filter.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Its value.
    pub value: String,
    /// Its label.
    pub label: String,
    /// Chosen.
    pub selected: bool,
}

/// A resource in a list or on its page.
#[derive(Debug, Clone)]
pub struct ResourceView {
    /// The API's name (`tenants/t/instances/db-1`).
    pub name: String,
    /// Its short name.
    pub short: String,
    /// Its tenant.
    pub tenant: String,
    /// Its page.
    pub href: String,
    /// Its kind.
    pub kind: String,
    /// Its uid.
    pub uid: String,
    /// `READY`, `CREATING`, …
    pub status: String,
    /// The status in lower case (CSS class).
    pub status_class: String,
    /// A unit of it is queued or running.
    pub active: bool,
    /// Its last error (curated for tenants).
    pub last_error: String,
    /// Generation of the spec.
    pub generation: i64,
    /// Generation the observed state was brought to.
    pub observed_generation: i64,
    /// The spec, as indented JSON.
    pub spec_json: String,
    /// The observed state without conditions, as indented JSON.
    pub observed_json: String,
    /// Its conditions.
    pub conditions: Vec<ConditionView>,
    /// Created (RFC 3339).
    pub created: String,
    /// Last changed (RFC 3339).
    pub updated: String,
}

/// A condition.
#[derive(Debug, Clone)]
pub struct ConditionView {
    /// Type.
    pub kind: String,
    /// `True`, `False`, `Unknown`.
    pub status: String,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
}

/// The name of a status.
pub fn status_name(status: i32) -> &'static str {
    match ResourceStatus::try_from(status) {
        Ok(ResourceStatus::Creating) => "CREATING",
        Ok(ResourceStatus::Ready) => "READY",
        Ok(ResourceStatus::Updating) => "UPDATING",
        Ok(ResourceStatus::Deleting) => "DELETING",
        Ok(ResourceStatus::Deleted) => "DELETED",
        Ok(ResourceStatus::Failed) => "FAILED",
        _ => "UNKNOWN",
    }
}

/// RFC 3339 of a timestamp, to the second.
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// The tenant of an API resource name (`acme` of `tenants/acme/instances/db-1`).
pub fn tenant_of(name: &str) -> &str {
    name.strip_prefix("tenants/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
}

/// The console path of an API resource name (they are the same, below `/`).
pub fn href(name: &str) -> String {
    format!("/{name}")
}

impl ResourceView {
    /// `r` for display.
    pub fn of(r: &Resource) -> Self {
        let status = status_name(r.status);
        let mut observed = r
            .observed
            .as_ref()
            .map(struct_to_json)
            .unwrap_or(Value::Null);
        let conditions = observed
            .as_object_mut()
            .and_then(|o| o.remove("conditions"))
            .and_then(|c| c.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|c| {
                let s = |k: &str| {
                    c.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                ConditionView {
                    kind: s("type"),
                    status: s("status"),
                    reason: s("reason"),
                    message: s("message"),
                }
            })
            .collect();
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
        Self {
            short: r.name.rsplit('/').next().unwrap_or_default().to_owned(),
            tenant: tenant_of(&r.name).to_owned(),
            href: href(&r.name),
            name: r.name.clone(),
            kind: r.kind.clone(),
            uid: r.uid.clone(),
            status: status.to_owned(),
            status_class: status.to_ascii_lowercase(),
            active: r.has_active_work,
            last_error: r.last_error.clone(),
            generation: r.generation,
            observed_generation: r.observed_generation,
            spec_json: pretty(&r.spec.as_ref().map(struct_to_json).unwrap_or(Value::Null)),
            observed_json: pretty(&observed),
            conditions,
            created: time(r.create_time.as_ref()),
            updated: time(r.update_time.as_ref()),
        }
    }
}

/// The resources page.
#[derive(Template)]
#[template(path = "console/resources.html")]
pub struct ResourcesPage {
    /// Frame.
    pub chrome: Chrome,
    /// The kinds to filter by.
    pub kinds: Vec<Choice>,
    /// The statuses to filter by.
    pub statuses: Vec<Choice>,
    /// The kind shown.
    pub kind: String,
    /// The tenant filter (admins): empty for every tenant.
    pub tenant: String,
    /// Rows name their tenant (an admin's list).
    pub show_tenant: bool,
    /// The kind's description.
    pub kind_description: String,
    /// The resources.
    pub rows: Vec<ResourceView>,
    /// The next page's link, if any.
    pub next_page: String,
    /// Their names, comma-separated, for the live feed.
    pub live: String,
    /// A message from the last action.
    pub notice: String,
}

/// A unit of work in a timeline or on its own page.
#[derive(Debug, Clone)]
pub struct UnitView {
    /// Id.
    pub id: i64,
    /// Work kind.
    pub kind: String,
    /// `pending`, `running`, `parked`, `finished`.
    pub state: String,
    /// Its idempotency token.
    pub token: String,
    /// Claims so far.
    pub attempt: i32,
    /// Allowed claims.
    pub max_attempts: i32,
    /// The last error (curated for tenants).
    pub last_error: String,
    /// Its tenant.
    pub tenant: String,
    /// Its resource (uid).
    pub resource_id: String,
    /// When it was enqueued.
    pub created: String,
    /// Its history, oldest first.
    pub events: Vec<EventView>,
}

/// One event.
#[derive(Debug, Clone)]
pub struct EventView {
    /// When.
    pub time: String,
    /// What.
    pub event: String,
    /// Attempt (0: none).
    pub attempt: i32,
    /// `transient` or `permanent`.
    pub class: String,
    /// The message (curated for tenants).
    pub message: String,
    /// The worker or operator (admins only).
    pub worker: String,
    /// Adapter calls made with the unit's token.
    pub calls: Vec<String>,
    /// The rest of the detail as JSON (admins only).
    pub detail: String,
}

impl UnitView {
    /// `u` for display.
    pub fn of(u: &WorkUnit) -> Self {
        Self {
            id: u.id,
            kind: u.kind.clone(),
            state: u.state.clone(),
            token: u.token.clone(),
            attempt: u.attempt,
            max_attempts: u.max_attempts,
            last_error: u.last_error.clone(),
            tenant: u.tenant.clone(),
            resource_id: u.resource_id.clone(),
            created: time(u.create_time.as_ref()),
            events: u.events.iter().map(EventView::of).collect(),
        }
    }
}

impl EventView {
    fn of(e: &WorkEvent) -> Self {
        let mut detail = e.detail.as_ref().map(struct_to_json).unwrap_or(Value::Null);
        let calls = detail
            .as_object_mut()
            .and_then(|d| d.remove("calls"))
            .and_then(|c| c.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        // Empty values say nothing (a success's null error code, a retry delay of null).
        if let Some(d) = detail.as_object_mut() {
            d.retain(|_, v| !v.is_null() && *v != Value::Array(Vec::new()));
        }
        let detail = match &detail {
            Value::Object(d) if !d.is_empty() => detail.to_string(),
            _ => String::new(),
        };
        Self {
            time: time(e.time.as_ref()),
            event: e.event.clone(),
            attempt: e.attempt,
            class: e.error_class.clone(),
            message: e.message.clone(),
            worker: e.worker.clone(),
            calls,
            detail,
        }
    }
}

/// A resource's page.
#[derive(Template)]
#[template(path = "console/resource.html")]
pub struct ResourcePage {
    /// Frame.
    pub chrome: Chrome,
    /// The resource.
    pub r: ResourceView,
    /// Its units, newest first.
    pub units: Vec<UnitView>,
    /// The delete form's request id.
    pub delete_request_id: String,
    /// The resource is the caller's own tenant's, so Change and Delete are offered (an admin
    /// reads other tenants' resources, and changes only its own tenant's).
    pub own: bool,
    /// A message from the last action.
    pub notice: String,
}

/// A resource's facts, spec, observed state and conditions alone (the live page fetches them
/// again when the resource changes).
#[derive(Template)]
#[template(path = "console/details.html")]
pub struct DetailsPartial {
    /// The resource.
    pub r: ResourceView,
}

/// A resource's timeline alone (the live page fetches it again when the status changes).
#[derive(Template)]
#[template(path = "console/timeline.html")]
pub struct TimelinePartial {
    /// Frame (the timeline reads `chrome.admin`).
    pub chrome: Chrome,
    /// Units, newest first.
    pub units: Vec<UnitView>,
}

/// A create or update form.
#[derive(Template)]
#[template(path = "console/form.html")]
pub struct FormPage {
    /// Frame.
    pub chrome: Chrome,
    /// The heading.
    pub title: String,
    /// Where the form posts.
    pub action: String,
    /// The kind.
    pub kind: String,
    /// The new resource's name (create) or the resource's (update).
    pub name: String,
    /// An update: the name is fixed.
    pub update: bool,
    /// Errors of the name field.
    pub name_errors: Vec<String>,
    /// The inputs.
    pub fields: Vec<Field>,
    /// Errors not of any input.
    pub errors: Vec<String>,
    /// The request id (the same on every submit of this form: a double submit acts once).
    pub request_id: String,
    /// Where "cancel" goes.
    pub back: String,
}

/// A count of units.
#[derive(Debug, Clone)]
pub struct CountView {
    /// Work kind.
    pub kind: String,
    /// State.
    pub state: String,
    /// How many.
    pub count: i64,
}

/// A parked unit on the work page.
#[derive(Debug, Clone)]
pub struct ParkedView {
    /// The unit.
    pub unit: UnitView,
    /// The retry form's request id.
    pub retry_request_id: String,
    /// The cancel form's request id.
    pub cancel_request_id: String,
}

/// The work page (admins).
#[derive(Template)]
#[template(path = "console/work.html")]
pub struct WorkPage {
    /// Frame.
    pub chrome: Chrome,
    /// Units by kind and state.
    pub counts: Vec<CountView>,
    /// Age of the oldest due pending unit.
    pub oldest_pending: String,
    /// Parked units.
    pub parked: Vec<ParkedView>,
    /// More parked units than shown.
    pub more_parked: bool,
    /// A message from the last action.
    pub notice: String,
}

/// One unit's page (admins).
#[derive(Template)]
#[template(path = "console/unit.html")]
pub struct UnitPage {
    /// Frame.
    pub chrome: Chrome,
    /// The unit.
    pub unit: UnitView,
    /// Its spec as JSON (unfinished units).
    pub spec_json: String,
    /// The retry form's request id.
    pub retry_request_id: String,
    /// The cancel form's request id.
    pub cancel_request_id: String,
    /// A message from the last action.
    pub notice: String,
}

/// An error page: what happened, in words, never a stack trace.
#[derive(Template)]
#[template(path = "console/error.html")]
pub struct ErrorPage {
    /// Frame.
    pub chrome: Chrome,
    /// The HTTP status.
    pub status: u16,
    /// The heading.
    pub title: String,
    /// The explanation.
    pub message: String,
}

/// `1h 2m`, `3m 4s`, `5s` for a number of seconds.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}
