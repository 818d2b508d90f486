//! The web console over plain HTTP requests (no browser): sign-in and its cookie's flags, CSRF
//! on every form, escaping of what tenants write, tenancy (404) and admin pages (403), a token
//! revoked under a session, and a retry sent twice with one request id acting once. The
//! engine runs in this process with a test kind (`test.note`) and the probe kind.
//!
//! No test asserts on timing; waits poll with a generous limit that only catches a hung test.

mod common;
mod console_support;

use std::time::{Duration, Instant};

use console_support::{Client, Env};
use hyper::StatusCode;
use setpoint::api::ApiConfig;
use setpoint::api::tls::TlsConfig;

const HUNG: Duration = Duration::from_secs(60);

async fn signed_in(env: &Env, token: &str) -> Client {
    let mut c = env.client(None);
    let a = c.sign_in(token).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    c
}

/// Creates a note through the form; returns the resource page's path.
async fn create_note(c: &mut Client, name: &str, text: &str) -> String {
    let csrf = c.csrf().await;
    let form = c.get("/resources/new?kind=test.note").await;
    assert_eq!(form.status, StatusCode::OK, "{}", form.body);
    let rid = form.hidden("request_id");
    let a = c
        .post(
            "/resources/new",
            &[
                ("csrf", &csrf),
                ("request_id", &rid),
                ("kind", "test.note"),
                ("name", name),
                ("spec.text", text),
            ],
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let page = a.location();
    assert!(page.ends_with("?done=created"), "{page}");
    page.trim_end_matches("?done=created").to_owned()
}

#[tokio::test]
async fn sign_in_sets_a_strict_cookie_and_every_post_needs_its_csrf_token() {
    let env = Env::start(ApiConfig::default()).await;
    let mut c = env.client(None);
    // Not signed in: every page sends the browser to the sign-in form.
    let a = c.get("/resources").await;
    assert_eq!(
        (a.status, a.location().as_str()),
        (StatusCode::SEE_OTHER, "/sign-in")
    );
    let form = c.get("/sign-in").await;
    let csp = form.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'self'")
            && csp.contains("script-src 'self'")
            && csp.contains("object-src 'none'")
            && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!form.body.contains("<script>"), "no inline script");
    let csrf = form.hidden("csrf");
    // The sign-in form's own token: without it, or with another, nobody signs in.
    for bad in ["", "0123"] {
        let a = c
            .post("/sign-in", &[("csrf", bad), ("token", &env.acme)])
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
    }
    let a = c
        .post("/sign-in", &[("csrf", &csrf), ("token", "spt_not-a-token")])
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = c.sign_in(&env.acme).await;
    assert_eq!(
        (a.status, a.location().as_str()),
        (StatusCode::SEE_OTHER, "/resources")
    );
    let session = a
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("setpoint_session="))
        .expect("session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session.contains(flag), "{session}");
    }
    assert!(!session.contains("Secure"), "plain HTTP: {session}");
    assert!(
        !session.contains(&env.acme),
        "the token never leaves the server"
    );
    let page = c.get("/resources").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("tenant acme"), "{}", page.body);
    assert!(!page.body.contains(&env.acme));

    // Every POST needs the session's token, and a foreign Origin is refused even with it.
    let csrf = c.csrf().await;
    let form = c.get("/resources/new?kind=test.note").await;
    let rid = form.hidden("request_id");
    let fields = |csrf: &'static str| {
        vec![
            ("csrf", csrf),
            ("kind", "test.note"),
            ("name", "n-1"),
            ("spec.text", "hello"),
        ]
    };
    let mut without = fields("");
    without.push(("request_id", &rid));
    let a = c.post("/resources/new", &without).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    let a = c.post("/sign-out", &[]).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = c
        .post_with(
            "/sign-out",
            &[("csrf", &csrf)],
            &[("origin", "http://evil.example")],
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let list = c.get("/resources?kind=test.note").await;
    assert!(!list.body.contains("n-1"), "nothing was created");

    // Sign-out ends the session: the cookie no longer opens pages.
    let old = c.cookies.clone();
    let a = c.post("/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(
        (a.status, a.location().as_str()),
        (StatusCode::SEE_OTHER, "/sign-in")
    );
    c.cookies = old;
    let a = c.get("/resources").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    env.stop().await;
}

#[tokio::test]
async fn a_script_in_a_spec_renders_as_text() {
    let env = Env::start(ApiConfig::default()).await;
    let mut c = signed_in(&env, &env.acme).await;
    let page = create_note(&mut c, "xss", "<script>alert(1)</script>").await;
    assert_eq!(page, "/tenants/acme/notes/xss");
    let a = c.get(&page).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(!a.body.contains("<script>alert(1)"), "{}", a.body);
    assert!(
        a.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
            || a.body.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{}",
        a.body
    );
    // The same on the edit form, where it is an input's value.
    let edit = c.get(&format!("{page}/edit")).await;
    assert_eq!(edit.status, StatusCode::OK);
    assert!(!edit.body.contains("<script>alert(1)"), "{}", edit.body);
    env.stop().await;
}

#[tokio::test]
async fn tenants_see_404_for_other_tenants_and_403_for_admin_pages() {
    let env = Env::start(ApiConfig::default()).await;
    let mut acme = signed_in(&env, &env.acme).await;
    let page = create_note(&mut acme, "mine", "acme's").await;
    assert_eq!(acme.get(&page).await.status, StatusCode::OK);
    let mut globex = signed_in(&env, &env.globex).await;
    for path in [
        page.clone(),
        format!("{page}/edit"),
        format!("{page}/timeline"),
        format!("{page}/details"),
    ] {
        let a = globex.get(&path).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.body);
        assert!(!a.body.contains("acme's"));
    }
    let csrf = globex.csrf().await;
    let a = globex
        .post(
            &format!("{page}/delete"),
            &[("csrf", &csrf), ("request_id", "r-1")],
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    for path in ["/work", "/work/1"] {
        let a = globex.get(path).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}: {}", a.body);
    }
    let a = globex
        .post("/work/1/retry", &[("csrf", &csrf), ("request_id", "r-2")])
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // The admin sees the work page.
    let mut ops = signed_in(&env, &env.admin).await;
    assert_eq!(ops.get("/work").await.status, StatusCode::OK);
    env.stop().await;
}

#[tokio::test]
async fn a_revoked_token_ends_its_session() {
    let env = Env::start(ApiConfig::default()).await;
    let mut c = signed_in(&env, &env.acme).await;
    assert_eq!(c.get("/resources").await.status, StatusCode::OK);
    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE tenant = 'acme'")
        .execute(&env.db.pool)
        .await
        .unwrap();
    // Known tokens are trusted for a few seconds (the API's cache); then the session ends.
    let start = Instant::now();
    loop {
        let a = c.get("/resources").await;
        if a.status == StatusCode::SEE_OTHER {
            assert_eq!(a.location(), "/sign-in?ended=1");
            break;
        }
        assert!(start.elapsed() < HUNG, "the session outlived its token");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.stop().await;
}

#[tokio::test]
async fn an_expired_token_ends_its_session() {
    let env = Env::start(ApiConfig::default()).await;
    let short = setpoint::api::auth::create_token(
        &env.db.pool,
        "acme",
        false,
        Some(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let mut c = signed_in(&env, &short.token).await;
    assert_eq!(c.get("/resources").await.status, StatusCode::OK);
    // The API checks a token's expiry on every call, cached or not: once it passes, the next
    // page ends the session, and the same cookie does not open a page again.
    let start = Instant::now();
    loop {
        let a = c.get("/resources").await;
        if a.status == StatusCode::SEE_OTHER {
            assert_eq!(a.location(), "/sign-in?ended=1");
            break;
        }
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert!(start.elapsed() < HUNG, "the session outlived its token");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ended = c.get("/sign-in?ended=1").await;
    assert!(ended.body.contains("Your session ended"), "{}", ended.body);
    let a = c.get("/resources").await;
    assert_eq!(
        (a.status, a.location().as_str()),
        (StatusCode::SEE_OTHER, "/sign-in?ended=1"),
        "the session is gone, not just refused once"
    );
    env.stop().await;
}

#[tokio::test]
async fn an_admin_sees_every_tenants_resources_and_changes_none_of_them() {
    use setpoint::api::proto::resource_service_client::ResourceServiceClient;
    use setpoint::api::proto::{
        GetConnectionDetailsRequest, GetResourceRequest, ListResourceHistoryRequest,
        ListResourcesRequest,
    };
    use tonic::Code;

    let env = Env::start(ApiConfig::default()).await;
    let mut acme = signed_in(&env, &env.acme).await;
    let mine = create_note(&mut acme, "mine", "acme's words").await;
    let mut globex = signed_in(&env, &env.globex).await;
    let theirs = create_note(&mut globex, "theirs", "globex's words").await;
    assert_eq!(
        (mine.as_str(), theirs.as_str()),
        ("/tenants/acme/notes/mine", "/tenants/globex/notes/theirs")
    );

    // The admin's list: every tenant's, with a tenant column and a tenant filter.
    let mut ops = signed_in(&env, &env.admin).await;
    let all = ops.get("/resources?kind=test.note").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert!(all.body.contains("<th>Tenant</th>"), "{}", all.body);
    assert!(all.body.contains("id=\"tenant\""), "the tenant filter");
    for (tenant, page) in [("acme", &mine), ("globex", &theirs)] {
        assert!(
            all.body.contains(&format!("href=\"{page}\"")),
            "{}",
            all.body
        );
        assert!(
            all.body
                .contains(&format!("<td class=\"tenant\">{tenant}</td>")),
            "{}",
            all.body
        );
    }
    let one = ops.get("/resources?kind=test.note&tenant=globex").await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.body);
    assert!(
        one.body.contains(&theirs) && !one.body.contains(&mine),
        "{}",
        one.body
    );
    // Any tenant's page, read only: no Change or Delete, and the API refuses them anyway.
    let page = ops.get(&mine).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("acme&#39;s words") || page.body.contains("acme's words"));
    assert!(page.body.contains("id=\"read-only\""), "{}", page.body);
    assert!(!page.body.contains("id=\"edit\""), "{}", page.body);
    for path in [format!("{mine}/timeline"), format!("{mine}/details")] {
        assert_eq!(ops.get(&path).await.status, StatusCode::OK, "{path}");
    }
    assert_eq!(
        ops.get(&format!("{mine}/edit")).await.status,
        StatusCode::FORBIDDEN
    );
    let csrf = ops.csrf().await;
    let a = ops
        .post(
            &format!("{mine}/delete"),
            &[("csrf", &csrf), ("request_id", "ops-1")],
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    // A tenant's list is its own, whatever the query says; no tenant column.
    let own = acme.get("/resources?kind=test.note&tenant=globex").await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    assert!(
        own.body.contains(&mine) && !own.body.contains(&theirs),
        "{}",
        own.body
    );
    assert!(!own.body.contains("<th>Tenant</th>"));
    assert_eq!(acme.get(&theirs).await.status, StatusCode::NOT_FOUND);

    // The same rules in the gRPC API the console calls.
    let mut rs = ResourceServiceClient::connect(env.api.clone())
        .await
        .unwrap();
    fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    }
    let list = |parent: &str| ListResourcesRequest {
        parent: parent.into(),
        kind: "test.note".into(),
        ..ListResourcesRequest::default()
    };
    let names = rs
        .list_resources(authed(&env.admin, list("tenants/*")))
        .await
        .unwrap()
        .into_inner()
        .resources
        .into_iter()
        .map(|r| r.name)
        .collect::<Vec<_>>();
    assert_eq!(
        names,
        ["tenants/acme/notes/mine", "tenants/globex/notes/theirs"]
    );
    let got = rs
        .get_resource(authed(
            &env.admin,
            GetResourceRequest {
                name: "tenants/globex/notes/theirs".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, "tenants/globex/notes/theirs");
    let history = rs
        .list_resource_history(authed(
            &env.admin,
            ListResourceHistoryRequest {
                name: "tenants/globex/notes/theirs".into(),
                ..ListResourceHistoryRequest::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!history.units.is_empty());
    let e = rs
        .get_connection_details(authed(
            &env.admin,
            GetConnectionDetailsRequest {
                name: "tenants/globex/notes/theirs".into(),
            },
        ))
        .await
        .expect_err("another tenant's secrets");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = rs
        .list_resources(authed(&env.acme, list("tenants/*")))
        .await
        .expect_err("a tenant listing every tenant");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = rs
        .list_resources(authed(&env.acme, list("tenants/globex")))
        .await
        .expect_err("a tenant listing another");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = rs
        .get_resource(authed(
            &env.acme,
            GetResourceRequest {
                name: "tenants/globex/notes/theirs".into(),
            },
        ))
        .await
        .expect_err("a tenant reading another's");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    env.stop().await;
}

#[tokio::test]
async fn a_ready_resource_page_shows_what_the_engine_observed() {
    let env = Env::start(ApiConfig::default()).await;
    let mut c = signed_in(&env, &env.acme).await;
    let page = create_note(&mut c, "seen", "hello").await;
    // The page as the live script fetches its details again once the note is READY: the
    // step's output in the observed state, and the generation it was brought to.
    let details = common::wait_for("the note to be READY with its observed state", || {
        let mut c2 = env.client(None);
        c2.cookies = c.cookies.clone();
        let page = page.clone();
        async move {
            let p = c2.get(&page).await;
            if !p.body.contains(">READY<") {
                return None;
            }
            Some(c2.get(&format!("{page}/details")).await)
        }
    })
    .await;
    assert_eq!(details.status, StatusCode::OK);
    assert!(
        details
            .body
            .trim_start()
            .starts_with("<div id=\"details\">"),
        "a fragment, not a page: {}",
        details.body
    );
    assert!(
        details
            .body
            .contains("1 (observed <span id=\"observed-generation\">1</span>)"),
        "{}",
        details.body
    );
    let observed = details
        .body
        .split("<pre id=\"observed\">")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_default()
        .replace("&#34;", "\"")
        .replace("&quot;", "\"");
    assert!(observed.contains("\"write\""), "{observed}");
    assert!(observed.contains("\"chars\": 5"), "{observed}");
    // The whole page shows the same.
    let full = c.get(&page).await;
    assert!(
        full.body
            .contains("<span id=\"observed-generation\">1</span>"),
        "{}",
        full.body
    );
    assert!(
        full.body
            .contains("data-details=\"/tenants/acme/notes/seen/details\"")
    );
    env.stop().await;
}

#[tokio::test]
async fn a_retry_sent_twice_with_one_request_id_acts_once() {
    let env = Env::start(ApiConfig::default()).await;
    // A probe that fails transiently on its first attempt, which is its last: parked.
    let unit = setpoint::queue::enqueue(
        &mut env.db.pool.acquire().await.unwrap(),
        setpoint::NewWork::new(
            "setpoint.probe",
            serde_json::json!({"fail_transient_until_attempt": 1, "sleep_ms": 0}),
        )
        .max_attempts(1),
    )
    .await
    .unwrap();
    let state = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>("SELECT state::text FROM work WHERE id = $1")
            .bind(unit.id)
            .fetch_optional(&pool)
            .await
            .unwrap()
    };
    common::wait_for("the probe to park", || {
        let pool = env.db.pool.clone();
        async move { (state(pool).await.as_deref() == Some("parked")).then_some(()) }
    })
    .await;
    let mut ops = signed_in(&env, &env.admin).await;
    let work = ops.get("/work").await;
    assert_eq!(work.status, StatusCode::OK);
    assert!(
        work.body.contains(&format!("data-unit=\"{}\"", unit.id)),
        "{}",
        work.body
    );
    let csrf = work.hidden("csrf");
    let path = format!("/work/{}/retry", unit.id);
    let rid = uuid::Uuid::new_v4().to_string();
    for _ in 0..2 {
        let a = ops
            .post(&path, &[("csrf", &csrf), ("request_id", &rid)])
            .await;
        assert_eq!(
            (a.status, a.location().as_str()),
            (StatusCode::SEE_OTHER, "/work?done=retried"),
            "{}",
            a.body
        );
    }
    let retried: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM work_events WHERE work_id = $1 AND event = 'retried'",
    )
    .bind(unit.id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(retried, 1);
    // Retried, the probe runs again and succeeds: the unit leaves the queue.
    common::wait_for("the retried probe to finish", || {
        let pool = env.db.pool.clone();
        async move { state(pool).await.is_none().then_some(()) }
    })
    .await;
    let unit_page = ops.get(&format!("/work/{}", unit.id)).await;
    assert!(
        unit_page.body.contains("id=\"unit-state\">finished<"),
        "{}",
        unit_page.body
    );
    // The same id for another unit's retry is refused, not applied.
    let a = ops
        .post(
            "/work/999999/retry",
            &[("csrf", &csrf), ("request_id", &rid)],
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    env.stop().await;
}

#[tokio::test]
async fn over_tls_the_console_serves_https_and_its_cookie_is_secure() {
    let certs = common::certs::make_certs();
    let env = Env::start(ApiConfig {
        tls: Some(TlsConfig::from_files(
            certs.join("server.pem"),
            certs.join("server.key"),
            None,
        )),
        ..ApiConfig::default()
    })
    .await;
    assert!(env.console.starts_with("https://"), "{}", env.console);
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let mut c = env.client(Some(&ca));
    let a = c.sign_in(&env.acme).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let session = a
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("__Host-setpoint_session="))
        .expect("session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Secure"] {
        assert!(session.contains(flag), "{session}");
    }
    let page = c.get("/resources").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers.contains_key("strict-transport-security"));
    env.stop().await;
    let _ = std::fs::remove_dir_all(certs);
}

#[tokio::test]
async fn a_note_is_changed_and_deleted_through_its_forms() {
    let env = Env::start(ApiConfig::default()).await;
    let mut c = signed_in(&env, &env.acme).await;
    let page = create_note(&mut c, "draft", "first words").await;
    let csrf = c.csrf().await;
    let edit = c.get(&format!("{page}/edit")).await;
    assert_eq!(edit.status, StatusCode::OK, "{}", edit.body);
    assert!(edit.body.contains("first words"), "the form shows the spec");
    let rid = edit.hidden("request_id");
    // A value the kind's schema refuses (size is at least 1): the form comes back with the
    // API's words at the field, and nothing changes.
    let a = c
        .post(
            &format!("{page}/edit"),
            &[
                ("csrf", &csrf),
                ("request_id", &rid),
                ("spec.text", "second words"),
                ("spec.size", "0"),
            ],
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
    assert!(
        a.body.contains("second words"),
        "the form keeps what was typed"
    );
    assert!(c.get(&page).await.body.contains("first words"));
    // Without the CSRF token: refused.
    let a = c
        .post(
            &format!("{page}/edit"),
            &[("request_id", &rid), ("spec.text", "forged")],
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // A valid change, once the create chain has let go of the resource.
    common::wait_for("the note to take changes", || {
        let mut c2 = env.client(None);
        c2.cookies = c.cookies.clone();
        let page = page.clone();
        async move {
            let p = c2.get(&page).await;
            p.body.contains(">READY<").then_some(())
        }
    })
    .await;
    let rid = c.get(&format!("{page}/edit")).await.hidden("request_id");
    let a = c
        .post(
            &format!("{page}/edit"),
            &[
                ("csrf", &csrf),
                ("request_id", &rid),
                ("spec.text", "second words"),
                ("spec.size", "3"),
            ],
        )
        .await;
    assert_eq!(
        (a.status, a.location()),
        (StatusCode::SEE_OTHER, format!("{page}?done=updated")),
        "{}",
        a.body
    );
    let shown = c.get(&page).await;
    assert!(shown.body.contains("second words"), "{}", shown.body);
    // Delete, with the request id the page's form carries.
    let rid = shown.hidden("request_id");
    let a = c
        .post(
            &format!("{page}/delete"),
            &[("csrf", &csrf), ("request_id", &rid)],
        )
        .await;
    assert_eq!(
        (a.status, a.location().as_str()),
        (
            StatusCode::SEE_OTHER,
            "/resources?kind=test.note&done=deleted"
        ),
        "{}",
        a.body
    );
    common::wait_for("the note to be gone", || {
        let mut c2 = env.client(None);
        c2.cookies = c.cookies.clone();
        let page = page.clone();
        async move { (c2.get(&page).await.status == StatusCode::NOT_FOUND).then_some(()) }
    })
    .await;
    env.stop().await;
}
