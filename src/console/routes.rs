//! The console's pages and forms. Each handler reads as: who is signed in, what the API says,
//! which page shows it. Pages mirror the API's names: a resource
//! `tenants/acme/instances/db-1` is the page `/tenants/acme/instances/db-1`.
//!
//! Every POST passes [`User::refusal`] first (the session's CSRF token, and an `Origin`, if
//! sent, of this console); every mutating call carries the request id its form was rendered
//! with, so submitting a form twice acts once. After a change the browser is sent to a page
//! (303 See Other), never left on the POST.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Form, FromRequestParts, Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::client::{Api, CallError, FieldError};
use super::forms::{self, Field};
use super::session::{self, Sessions};
use super::views::{
    self, Choice, Chrome, CountView, DetailsPartial, ErrorPage, FormPage, ParkedView, ResourcePage,
    ResourceView, ResourcesPage, SignInPage, TimelinePartial, UnitPage, UnitView, WorkPage,
};
use super::{ConsoleConfig, assets, csrf, live};
use crate::api::InProcessApi;
use crate::api::auth::{Authenticator, Caller};
use crate::api::convert::{json_to_struct, struct_to_json};
use crate::api::errors::ApiError;
use crate::api::proto::{
    CancelWorkRequest, CreateResourceRequest, DeleteResourceRequest, GetResourceRequest,
    GetWorkRequest, GetWorkStatsRequest, Kind, ListKindsRequest, ListResourceHistoryRequest,
    ListResourcesRequest, ListWorkRequest, Resource, ResourceStatus, RetryWorkRequest,
    UpdateResourceRequest,
};
use crate::api::validate::ALL_TENANTS;
use crate::api::watch::InstanceEvents;

/// The Content-Security-Policy of every response: scripts and styles only from this console's
/// own files, no plugins, no framing, forms only to itself.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; object-src 'none'; base-uri 'none'; \
                       form-action 'self'; frame-ancestors 'none'";

/// Largest form body: a spec is at most the API's message size (64 KiB by default), and a form
/// spells it out at most a few times over.
const MAX_BODY: usize = 512 * 1024;

/// The console's shared state.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    api: Api,
    auth: Arc<Authenticator>,
    events: Arc<InstanceEvents>,
    sessions: Sessions,
    secure: bool,
    shutdown: CancellationToken,
}

impl Console {
    /// The console over `api`; `secure` marks its cookies `Secure` (HTTPS).
    pub fn new(
        api: InProcessApi,
        config: ConsoleConfig,
        secure: bool,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                api: Api::new(api.service),
                auth: api.auth,
                events: api.events,
                sessions: Sessions::new(config.idle_timeout, config.max_sessions),
                secure,
                shutdown,
            }),
        }
    }

    /// The API.
    pub fn api(&self) -> &Api {
        &self.inner.api
    }

    /// The feed of resource changes.
    pub fn events(&self) -> &Arc<InstanceEvents> {
        &self.inner.events
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// Fires when the engine stops.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The API's authenticator.
    pub fn auth(&self) -> &Authenticator {
        &self.inner.auth
    }

    fn session_cookie(&self) -> &'static str {
        if self.inner.secure {
            session::SECURE_COOKIE
        } else {
            session::COOKIE
        }
    }

    fn sign_in_cookie(&self) -> &'static str {
        if self.inner.secure {
            csrf::SECURE_SIGN_IN_COOKIE
        } else {
            csrf::SIGN_IN_COOKIE
        }
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

/// The console's routes on `console`.
pub fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/resources") }))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/sign-out", post(sign_out))
        .route("/resources", get(resources))
        .route("/resources/new", get(new_form).post(create))
        .route("/tenants/{tenant}/{collection}/{name}", get(resource_page))
        .route(
            "/tenants/{tenant}/{collection}/{name}/timeline",
            get(timeline),
        )
        .route(
            "/tenants/{tenant}/{collection}/{name}/details",
            get(details),
        )
        .route(
            "/tenants/{tenant}/{collection}/{name}/edit",
            get(edit_form).post(update),
        )
        .route("/tenants/{tenant}/{collection}/{name}/delete", post(delete))
        .route("/events", get(live::events))
        .route("/work", get(work_page))
        .route("/work/{id}", get(unit_page))
        .route("/work/{id}/retry", post(retry))
        .route("/work/{id}/cancel", post(cancel))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            console.clone(),
            security_headers,
        ))
        .with_state(console)
}

/// Headers of every response: the CSP, no sniffing, no framing, no referrer to other sites,
/// nothing cached but the static files, and HSTS over HTTPS.
async fn security_headers(
    State(console): State<Console>,
    req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if console.inner.secure {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    res
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", assets::CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", assets::JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// `t` rendered with `status`; a template that fails to render (it cannot, short of a bug) is a
/// plain 500, never a trace.
pub fn page(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "console: a page could not be rendered");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be shown",
            )
                .into_response()
        }
    }
}

/// An error page.
pub fn error_page(chrome: Chrome, status: StatusCode, title: &str, message: &str) -> Response {
    page(
        status,
        &ErrorPage {
            chrome,
            status: status.as_u16(),
            title: title.to_owned(),
            message: message.to_owned(),
        },
    )
}

async fn not_found(user: Option<User>) -> Response {
    let chrome = user.map(|u| u.chrome()).unwrap_or_default();
    error_page(
        chrome,
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
    )
}

/// The signed-in user of a request: the session (from its cookie) and the caller its token
/// names, checked again now through the API's authenticator.
#[derive(Clone)]
pub struct User {
    session_id: String,
    /// The API token.
    pub token: String,
    /// The session's CSRF token.
    pub csrf: String,
    /// Who the token names.
    pub caller: Caller,
    console: Console,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

impl User {
    /// The frame of this user's pages.
    pub fn chrome(&self) -> Chrome {
        Chrome {
            signed_in: true,
            tenant: self.caller.tenant.clone(),
            admin: self.caller.admin,
            csrf: self.csrf.clone(),
        }
    }

    /// The API, as this user's console calls it.
    pub fn console_api(&self) -> &Api {
        self.console.api()
    }

    /// Ends the session (its token stopped working, or sign-out).
    pub fn end(&self) {
        self.console.sessions().remove(&self.session_id);
    }

    /// The 403 page for a POST without this session's CSRF token, or from another origin;
    /// `None` when the POST may go on.
    fn refusal(&self, headers: &HeaderMap, given: &str) -> Option<Response> {
        if !same_origin(headers) || !csrf::matches(&self.csrf, given) {
            return Some(forbidden_form(self.chrome()));
        }
        None
    }

    /// The answer to a failed API call: sign in again, 404, 403, or the API's message.
    pub fn failure(&self, e: &CallError) -> Response {
        failure(self, e)
    }
}

fn forbidden_form(chrome: Chrome) -> Response {
    error_page(
        chrome,
        StatusCode::FORBIDDEN,
        "Form refused",
        "This form did not come from this console's page, or it has expired. Go back, \
         reload the page and send it again.",
    )
}

/// False when the request names an `Origin` other than the host it was sent to (a browser
/// sends `Origin` with every POST; a request without one is judged by its CSRF token alone).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    !host.is_empty() && origin_host == host
}

/// Why a request has no user: no session (or an ended one), or the authenticator could not
/// answer now.
pub enum NoUser {
    /// Sign in (again).
    SignIn {
        /// The session existed and its token stopped working, or it went idle.
        ended: bool,
    },
    /// The API cannot check tokens now.
    Unavailable(String),
}

impl IntoResponse for NoUser {
    fn into_response(self) -> Response {
        match self {
            NoUser::SignIn { ended: false } => Redirect::to("/sign-in").into_response(),
            NoUser::SignIn { ended: true } => Redirect::to("/sign-in?ended=1").into_response(),
            NoUser::Unavailable(m) => error_page(
                Chrome::default(),
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again shortly",
                &m,
            ),
        }
    }
}

impl FromRequestParts<Console> for User {
    type Rejection = NoUser;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, NoUser> {
        let cookies = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join("; ");
        let Some(id) = session::cookie(&cookies, console.session_cookie()) else {
            return Err(NoUser::SignIn { ended: false });
        };
        let Some(s) = console.sessions().get(id) else {
            return Err(NoUser::SignIn { ended: true });
        };
        match console
            .auth()
            .authenticate(Some(&format!("Bearer {}", s.token)))
            .await
        {
            Ok(caller) => Ok(User {
                session_id: id.to_owned(),
                token: s.token,
                csrf: s.csrf,
                caller,
                console: console.clone(),
            }),
            Err(ApiError::Unauthenticated(_)) => {
                console.sessions().remove(id);
                Err(NoUser::SignIn { ended: true })
            }
            Err(e) => Err(NoUser::Unavailable(e.to_string())),
        }
    }
}

impl axum::extract::OptionalFromRequestParts<Console> for User {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Console,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(
            <User as FromRequestParts<Console>>::from_request_parts(parts, console)
                .await
                .ok(),
        )
    }
}

/// The page for a failed call.
fn failure(user: &User, e: &CallError) -> Response {
    let chrome = user.chrome();
    match e.code {
        Code::Unauthenticated => {
            user.end();
            Redirect::to("/sign-in?ended=1").into_response()
        }
        Code::NotFound => error_page(
            chrome,
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such resource, or it is not yours to see.",
        ),
        Code::PermissionDenied => {
            error_page(chrome, StatusCode::FORBIDDEN, "Not allowed", &e.message)
        }
        Code::InvalidArgument => {
            let mut text = e.message.clone();
            for f in &e.fields {
                text.push_str(&format!(" {}: {}.", f.field, f.description));
            }
            error_page(chrome, StatusCode::BAD_REQUEST, "Refused", &text)
        }
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
            error_page(chrome, StatusCode::CONFLICT, "Not now", &e.message)
        }
        Code::ResourceExhausted | Code::Unavailable | Code::DeadlineExceeded => error_page(
            chrome,
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again shortly",
            &e.message,
        ),
        _ => error_page(
            chrome,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong",
            &e.message,
        ),
    }
}

/// Runs an API call, turning its error into a [`CallError`].
macro_rules! call {
    ($user:expr, $client:expr, $method:ident, $msg:expr) => {{
        match $crate::console::client::authed(&$user.token, $msg) {
            Ok(req) => $client
                .$method(req)
                .await
                .map(tonic::Response::into_inner)
                .map_err(CallError::from),
            Err(e) => Err(e),
        }
    }};
}
pub(crate) use call;

/// A fixed notice for `done=…` after a change (never text from the URL).
fn notice(done: Option<&str>) -> String {
    match done {
        Some("created") => "Created: the engine is provisioning it.",
        Some("updated") => "Saved: the engine is applying the change.",
        Some("unchanged") => "Nothing to change: the spec already says that.",
        Some("deleted") => "Deleting: the engine is removing it.",
        Some("retried") => "Retried: the unit is due again.",
        Some("cancelled") => "Cancelled: the unit is removed; its history stays.",
        _ => "",
    }
    .to_owned()
}

/// A new request id for a form.
fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

// ---- sign-in and sign-out ----------------------------------------------------------------

#[derive(Deserialize)]
struct SignInQuery {
    ended: Option<String>,
}

async fn sign_in_page(State(c): State<Console>, Query(q): Query<SignInQuery>) -> Response {
    let message = if q.ended.is_some() {
        "Your session ended: its token was revoked or expired, or it was unused too long. Sign \
         in again."
    } else {
        ""
    };
    sign_in_form(&c, StatusCode::OK, message)
}

fn sign_in_form(c: &Console, status: StatusCode, message: &str) -> Response {
    let token = csrf::random_token();
    let mut res = page(
        status,
        &SignInPage {
            chrome: Chrome::default(),
            csrf: token.clone(),
            message: message.to_owned(),
        },
    );
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        c.sign_in_cookie(),
        &token,
        c.inner.secure,
        Some(3600),
    )) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
}

async fn sign_in(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(f): Form<SignInForm>,
) -> Response {
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ");
    let expected = session::cookie(&cookies, c.sign_in_cookie()).unwrap_or_default();
    if !same_origin(&headers) || !csrf::matches(expected, &f.csrf) {
        return forbidden_form(Chrome::default());
    }
    let token = f.token.trim();
    match c
        .auth()
        .authenticate(Some(&format!("Bearer {token}")))
        .await
    {
        Ok(caller) => {
            let id = c.sessions().create(token.to_owned());
            tracing::info!(tenant = %caller.tenant, token_id = caller.token_id, admin = caller.admin,
                "console: signed in");
            let mut res = Redirect::to("/resources").into_response();
            for cookie in [
                session::set_cookie(c.session_cookie(), &id, c.inner.secure, None),
                session::set_cookie(c.sign_in_cookie(), "", c.inner.secure, Some(0)),
            ] {
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    res.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            res
        }
        Err(ApiError::Unauthenticated(_)) => sign_in_form(
            &c,
            StatusCode::UNAUTHORIZED,
            "That token does not work: it is unknown, revoked or expired.",
        ),
        Err(e) => sign_in_form(&c, StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    State(c): State<Console>,
    user: User,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(r) = user.refusal(&headers, &f.csrf) {
        return r;
    }
    user.end();
    let mut res = Redirect::to("/sign-in").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        c.session_cookie(),
        "",
        c.inner.secure,
        Some(0),
    )) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

// ---- resources ----------------------------------------------------------------------------

#[derive(Deserialize)]
struct ListQuery {
    kind: Option<String>,
    status: Option<String>,
    /// Admins: one tenant's resources; empty or absent for every tenant's.
    tenant: Option<String>,
    page: Option<String>,
    done: Option<String>,
}

/// The statuses a list may be filtered by, with their API values.
const STATUSES: &[(&str, ResourceStatus)] = &[
    ("", ResourceStatus::Unspecified),
    ("CREATING", ResourceStatus::Creating),
    ("READY", ResourceStatus::Ready),
    ("UPDATING", ResourceStatus::Updating),
    ("DELETING", ResourceStatus::Deleting),
    ("FAILED", ResourceStatus::Failed),
];

async fn kinds(user: &User) -> Result<Vec<Kind>, CallError> {
    call!(
        user,
        user.console.api().resources(),
        list_kinds,
        ListKindsRequest {}
    )
    .map(|r| r.kinds)
}

async fn resources(user: User, Query(q): Query<ListQuery>) -> Response {
    let kinds = match kinds(&user).await {
        Ok(k) => k,
        Err(e) => return user.failure(&e),
    };
    let kind = q
        .kind
        .clone()
        .filter(|k| !k.is_empty())
        .or_else(|| kinds.first().map(|k| k.name.clone()))
        .unwrap_or_default();
    let status = q.status.clone().unwrap_or_default();
    let filter = STATUSES
        .iter()
        .find(|(name, _)| *name == status)
        .map_or(ResourceStatus::Unspecified, |(_, s)| *s);
    // An admin sees every tenant's resources (the API's `tenants/*`), or one tenant's; a
    // tenant its own (the API refuses anything else anyway).
    let tenant = if user.caller.admin {
        q.tenant.as_deref().unwrap_or_default().trim().to_owned()
    } else {
        String::new()
    };
    let parent = match (user.caller.admin, tenant.is_empty()) {
        (true, true) => ALL_TENANTS.to_owned(),
        (true, false) => format!("tenants/{tenant}"),
        (false, _) => String::new(),
    };
    let (rows, next) = if kind.is_empty() {
        (Vec::new(), String::new())
    } else {
        let listed = call!(
            user,
            user.console.api().resources(),
            list_resources,
            ListResourcesRequest {
                parent,
                kind: kind.clone(),
                page_size: 50,
                page_token: q.page.clone().unwrap_or_default(),
                status_filter: filter as i32,
            }
        );
        match listed {
            Ok(l) => (l.resources, l.next_page_token),
            Err(e) => return user.failure(&e),
        }
    };
    let next_page = if next.is_empty() {
        String::new()
    } else {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("kind", &kind)
            .append_pair("status", &status)
            .append_pair("tenant", &tenant)
            .append_pair("page", &next)
            .finish();
        format!("/resources?{query}")
    };
    let views: Vec<ResourceView> = rows.iter().map(ResourceView::of).collect();
    let live = views
        .iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(",");
    page(
        StatusCode::OK,
        &ResourcesPage {
            chrome: user.chrome(),
            kind_description: kinds
                .iter()
                .find(|k| k.name == kind)
                .map(|k| k.description.clone())
                .unwrap_or_default(),
            kinds: kinds
                .iter()
                .map(|k| Choice {
                    value: k.name.clone(),
                    label: k.name.clone(),
                    selected: k.name == kind,
                })
                .collect(),
            statuses: STATUSES
                .iter()
                .map(|(name, _)| Choice {
                    value: (*name).to_owned(),
                    label: if name.is_empty() { "any" } else { name }.to_owned(),
                    selected: *name == status,
                })
                .collect(),
            kind,
            tenant,
            show_tenant: user.caller.admin,
            rows: views,
            next_page,
            live,
            notice: notice(q.done.as_deref()),
        },
    )
}

/// The API name of a resource page's path.
fn resource_name(tenant: &str, collection: &str, name: &str) -> String {
    format!("tenants/{tenant}/{collection}/{name}")
}

#[derive(Deserialize)]
struct DoneQuery {
    done: Option<String>,
}

async fn get_resource(user: &User, name: String) -> Result<Resource, CallError> {
    call!(
        user,
        user.console.api().resources(),
        get_resource,
        GetResourceRequest { name }
    )
}

async fn history(user: &User, name: String) -> Result<Vec<UnitView>, CallError> {
    call!(
        user,
        user.console.api().resources(),
        list_resource_history,
        ListResourceHistoryRequest {
            name,
            page_size: 20,
            page_token: String::new(),
        }
    )
    .map(|h| h.units.iter().map(UnitView::of).collect())
}

async fn resource_page(
    user: User,
    Path((tenant, collection, name)): Path<(String, String, String)>,
    Query(q): Query<DoneQuery>,
) -> Response {
    let name = resource_name(&tenant, &collection, &name);
    let r = match get_resource(&user, name.clone()).await {
        Ok(r) => r,
        Err(e) => return user.failure(&e),
    };
    let units = match history(&user, name).await {
        Ok(u) => u,
        Err(e) => return user.failure(&e),
    };
    let r = ResourceView::of(&r);
    page(
        StatusCode::OK,
        &ResourcePage {
            chrome: user.chrome(),
            own: r.tenant == user.caller.tenant,
            r,
            units,
            delete_request_id: request_id(),
            notice: notice(q.done.as_deref()),
        },
    )
}

/// The resource page's facts, spec, observed state and conditions alone: the page's script
/// fetches them again when the resource changes, so that a page opened while the resource
/// was CREATING shows what the engine observed once it is READY.
async fn details(
    user: User,
    Path((tenant, collection, name)): Path<(String, String, String)>,
) -> Response {
    match get_resource(&user, resource_name(&tenant, &collection, &name)).await {
        Ok(r) => page(
            StatusCode::OK,
            &DetailsPartial {
                r: ResourceView::of(&r),
            },
        ),
        Err(e) => user.failure(&e),
    }
}

async fn timeline(
    user: User,
    Path((tenant, collection, name)): Path<(String, String, String)>,
) -> Response {
    match history(&user, resource_name(&tenant, &collection, &name)).await {
        Ok(units) => page(
            StatusCode::OK,
            &TimelinePartial {
                chrome: user.chrome(),
                units,
            },
        ),
        Err(e) => user.failure(&e),
    }
}

#[derive(Deserialize)]
struct NewQuery {
    kind: Option<String>,
}

/// The kind named `name` among the caller's kinds, or the 404 page.
async fn kind_named(user: &User, name: &str) -> Result<Kind, Response> {
    match kinds(user).await {
        Ok(kinds) => kinds.into_iter().find(|k| k.name == name).ok_or_else(|| {
            error_page(
                user.chrome(),
                StatusCode::NOT_FOUND,
                "Not found",
                "No such kind of resource is served to this token.",
            )
        }),
        Err(e) => Err(user.failure(&e)),
    }
}

fn schema_of(kind: &Kind) -> serde_json::Value {
    kind.schema
        .as_ref()
        .map(struct_to_json)
        .unwrap_or(serde_json::Value::Null)
}

async fn new_form(user: User, Query(q): Query<NewQuery>) -> Response {
    let kind = match kind_named(&user, q.kind.as_deref().unwrap_or_default()).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    let fields = forms::fields(&schema_of(&kind), &kind.immutable_fields, None);
    page(
        StatusCode::OK,
        &create_form(&user, &kind, String::new(), fields, request_id()),
    )
}

fn create_form(
    user: &User,
    kind: &Kind,
    name: String,
    fields: Vec<Field>,
    request_id: String,
) -> FormPage {
    FormPage {
        chrome: user.chrome(),
        title: format!("New {}", kind.name),
        action: "/resources/new".into(),
        kind: kind.name.clone(),
        name,
        update: false,
        name_errors: Vec::new(),
        fields,
        errors: Vec::new(),
        request_id,
        back: format!(
            "/resources?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("kind", &kind.name)
                .finish()
        ),
    }
}

/// Shows `form` again with `errors` placed at their fields (the name's under it).
fn refused(mut form: FormPage, errors: &[FieldError], message: Option<&str>) -> Response {
    let mut rest = forms::place_errors(&mut form.fields, errors);
    rest.retain(|e| {
        if let Some(text) = e
            .strip_prefix("resource_id: ")
            .or_else(|| e.strip_prefix("resource.name: "))
        {
            form.name_errors.push(text.to_owned());
            false
        } else {
            true
        }
    });
    if let Some(m) = message.filter(|_| errors.is_empty()) {
        rest.push(m.to_owned());
    }
    form.errors = rest;
    page(StatusCode::UNPROCESSABLE_ENTITY, &form)
}

fn field_of(form: &HashMap<String, String>, key: &str) -> String {
    form.get(key).cloned().unwrap_or_default()
}

async fn create(
    user: User,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(r) = user.refusal(&headers, &field_of(&form, "csrf")) {
        return r;
    }
    let kind = match kind_named(&user, &field_of(&form, "kind")).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    let mut fields = forms::fields(&schema_of(&kind), &kind.immutable_fields, None);
    let (spec, local) = forms::spec_of(&mut fields, &form);
    let name = field_of(&form, "name").trim().to_owned();
    let rid = field_of(&form, "request_id");
    let page_form = create_form(&user, &kind, name.clone(), fields, rid.clone());
    if !local.is_empty() {
        return refused(page_form, &local, None);
    }
    let created = call!(
        user,
        user.console.api().resources(),
        create_resource,
        CreateResourceRequest {
            parent: String::new(),
            kind: kind.name.clone(),
            resource_id: name,
            resource: Some(Resource {
                spec: Some(json_to_struct(&spec)),
                ..Resource::default()
            }),
            request_id: rid,
            // A person at a form makes one change at a time: never bulk.
            bulk: false,
        }
    );
    match created {
        Ok(r) => Redirect::to(&format!("{}?done=created", views::href(&r.name))).into_response(),
        Err(e) => match e.code {
            Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition => {
                let errors = if e.code == Code::AlreadyExists {
                    vec![FieldError {
                        field: "resource_id".into(),
                        description: "is taken: a live resource of this kind has that name".into(),
                    }]
                } else {
                    e.fields.clone()
                };
                refused(page_form, &errors, Some(&e.message))
            }
            _ => user.failure(&e),
        },
    }
}

async fn edit_form(
    user: User,
    Path((tenant, collection, name)): Path<(String, String, String)>,
) -> Response {
    let full = resource_name(&tenant, &collection, &name);
    let r = match get_resource(&user, full.clone()).await {
        Ok(r) => r,
        Err(e) => return user.failure(&e),
    };
    if views::tenant_of(&r.name) != user.caller.tenant {
        // An admin reading another tenant's resource: the API would refuse the change.
        return error_page(
            user.chrome(),
            StatusCode::FORBIDDEN,
            "Not allowed",
            "An admin token reads every tenant's resources but changes only its own tenant's; \
             use a token of this resource's tenant.",
        );
    }
    let kind = match kind_named(&user, &r.kind).await {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let spec = r.spec.as_ref().map(struct_to_json);
    let fields = forms::fields(&schema_of(&kind), &kind.immutable_fields, spec.as_ref());
    page(
        StatusCode::OK,
        &update_form(&user, &kind, &full, fields, request_id()),
    )
}

fn update_form(
    user: &User,
    kind: &Kind,
    full: &str,
    fields: Vec<Field>,
    request_id: String,
) -> FormPage {
    let short = full.rsplit('/').next().unwrap_or_default().to_owned();
    FormPage {
        chrome: user.chrome(),
        title: format!("Change {short}"),
        action: format!("{}/edit", views::href(full)),
        kind: kind.name.clone(),
        name: short,
        update: true,
        name_errors: Vec::new(),
        fields,
        errors: Vec::new(),
        request_id,
        back: views::href(full),
    }
}

async fn update(
    user: User,
    headers: HeaderMap,
    Path((tenant, collection, name)): Path<(String, String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(r) = user.refusal(&headers, &field_of(&form, "csrf")) {
        return r;
    }
    let full = resource_name(&tenant, &collection, &name);
    let r = match get_resource(&user, full.clone()).await {
        Ok(r) => r,
        Err(e) => return user.failure(&e),
    };
    let kind = match kind_named(&user, &r.kind).await {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let mut fields = forms::fields(&schema_of(&kind), &kind.immutable_fields, None);
    let (spec, local) = forms::spec_of(&mut fields, &form);
    let rid = field_of(&form, "request_id");
    let page_form = update_form(&user, &kind, &full, fields, rid.clone());
    if !local.is_empty() {
        return refused(page_form, &local, None);
    }
    let before = r.generation;
    let updated = call!(
        user,
        user.console.api().resources(),
        update_resource,
        UpdateResourceRequest {
            resource: Some(Resource {
                name: full.clone(),
                spec: Some(json_to_struct(&spec)),
                ..Resource::default()
            }),
            update_mask: None,
            request_id: rid,
            // A person at a form makes one change at a time: never bulk.
            bulk: false,
        }
    );
    match updated {
        Ok(r) => {
            let done = if r.generation == before {
                "unchanged"
            } else {
                "updated"
            };
            Redirect::to(&format!("{}?done={done}", views::href(&r.name))).into_response()
        }
        Err(e) if matches!(e.code, Code::InvalidArgument | Code::FailedPrecondition) => {
            refused(page_form, &e.fields, Some(&e.message))
        }
        Err(e) => user.failure(&e),
    }
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    reason: String,
}

async fn delete(
    user: User,
    headers: HeaderMap,
    Path((tenant, collection, name)): Path<(String, String, String)>,
    Form(f): Form<ActionForm>,
) -> Response {
    if let Some(r) = user.refusal(&headers, &f.csrf) {
        return r;
    }
    let deleted = call!(
        user,
        user.console.api().resources(),
        delete_resource,
        DeleteResourceRequest {
            name: resource_name(&tenant, &collection, &name),
            request_id: f.request_id,
            // A person at a form makes one change at a time: never bulk.
            bulk: false,
        }
    );
    match deleted {
        Ok(r) => {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("kind", &r.kind)
                .append_pair("done", "deleted")
                .finish();
            Redirect::to(&format!("/resources?{query}")).into_response()
        }
        Err(e) => user.failure(&e),
    }
}

// ---- work (admins) ----------------------------------------------------------------------

/// Parked units shown on the work page.
const PARKED_SHOWN: i32 = 100;

async fn work_page(user: User, Query(q): Query<DoneQuery>) -> Response {
    let stats = call!(
        user,
        user.console.api().work(),
        get_work_stats,
        GetWorkStatsRequest {}
    );
    let stats = match stats {
        Ok(s) => s,
        Err(e) => return user.failure(&e),
    };
    let parked = call!(
        user,
        user.console.api().work(),
        list_work,
        ListWorkRequest {
            state: "parked".into(),
            page_size: PARKED_SHOWN,
            ..ListWorkRequest::default()
        }
    );
    let parked = match parked {
        Ok(p) => p,
        Err(e) => return user.failure(&e),
    };
    page(
        StatusCode::OK,
        &WorkPage {
            chrome: user.chrome(),
            counts: stats
                .counts
                .iter()
                .map(|c| CountView {
                    kind: c.kind.clone(),
                    state: c.state.clone(),
                    count: c.count,
                })
                .collect(),
            oldest_pending: views::age(stats.oldest_pending_age_seconds),
            more_parked: !parked.next_page_token.is_empty(),
            parked: parked
                .units
                .iter()
                .map(|u| ParkedView {
                    unit: UnitView::of(u),
                    retry_request_id: request_id(),
                    cancel_request_id: request_id(),
                })
                .collect(),
            notice: notice(q.done.as_deref()),
        },
    )
}

async fn unit_page(user: User, Path(id): Path<i64>, Query(q): Query<DoneQuery>) -> Response {
    let unit = call!(
        user,
        user.console.api().work(),
        get_work,
        GetWorkRequest { id }
    );
    match unit {
        Ok(u) => page(
            StatusCode::OK,
            &UnitPage {
                chrome: user.chrome(),
                spec_json: u
                    .spec
                    .as_ref()
                    .map(|s| serde_json::to_string_pretty(&struct_to_json(s)).unwrap_or_default())
                    .unwrap_or_default(),
                unit: UnitView::of(&u),
                retry_request_id: request_id(),
                cancel_request_id: request_id(),
                notice: notice(q.done.as_deref()),
            },
        ),
        Err(e) => user.failure(&e),
    }
}

async fn retry(
    user: User,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(f): Form<ActionForm>,
) -> Response {
    if let Some(r) = user.refusal(&headers, &f.csrf) {
        return r;
    }
    let retried = call!(
        user,
        user.console.api().work(),
        retry_work,
        RetryWorkRequest {
            id,
            extra_attempts: 0,
            request_id: f.request_id,
        }
    );
    match retried {
        Ok(_) => Redirect::to("/work?done=retried").into_response(),
        Err(e) => user.failure(&e),
    }
}

async fn cancel(
    user: User,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(f): Form<ActionForm>,
) -> Response {
    if let Some(r) = user.refusal(&headers, &f.csrf) {
        return r;
    }
    let cancelled = call!(
        user,
        user.console.api().work(),
        cancel_work,
        CancelWorkRequest {
            id,
            reason: f.reason,
            request_id: f.request_id,
        }
    );
    match cancelled {
        Ok(_) => Redirect::to("/work?done=cancelled").into_response(),
        Err(e) => user.failure(&e),
    }
}
