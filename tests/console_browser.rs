//! The web console in a real browser: Debian's headless Chromium driven over WebDriver
//! (`chromedriver`, started here), against `setpoint dev` as a child process (PostgreSQL,
//! moto, aiosmtpd, the Kubernetes test server, the engine, the API and the console).
//!
//! One scenario, as a person would go through it: a tenant signs in, creates a KVX instance
//! from the form generated from its schema, sees it become READY without reloading (server-sent
//! events) with what the engine observed (the machine, the observed generation) and reads its
//! timeline; an admin of another tenant finds that instance in the list of every tenant's
//! resources and opens it read only, then retries one parked unit and cancels another, each
//! after a confirmation; a tenant of another tenant gets 404 for that instance's page and 403
//! for the admin pages; everyone signs out.
//!
//! Screenshots of every page go to `$SETPOINT_CONSOLE_SCREENSHOTS` when it is set (that is how
//! `docs/console/*.png` are made), else into the test's temporary folder.
//!
//! Nothing here asserts on speed: every wait polls for a condition with a generous limit.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::peers::{Proc, free_port, spawn, start_dev, test_dir};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(180);

/// chromedriver on a free port, and a WebDriver session of a fresh headless Chromium.
async fn browser(dir: &Path) -> (Proc, Client) {
    let port = free_port();
    let driver = spawn(
        &format!("exec chromedriver --port={port} --allowed-ips=127.0.0.1"),
        &dir.join("chromedriver.log"),
    );
    common::peers::wait_port(port).await;
    let profile = dir.join("chromium-profile");
    std::fs::create_dir_all(&profile).expect("profile dir");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium_binary(),
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session (is chromium-driver installed? scripts/install-deps.sh)");
    (driver, client)
}

fn chromium_binary() -> String {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/usr/bin/chromium")
        .to_owned()
}

/// Where screenshots go.
fn shots_dir(dir: &Path) -> PathBuf {
    let d = std::env::var_os("SETPOINT_CONSOLE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("screenshots"));
    std::fs::create_dir_all(&d).expect("screenshot dir");
    d
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

/// Polls `f` until it gives `Some`, for at most [`LIMIT`].
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn sign_in(c: &Client, console: &str, token: &str) {
    c.goto(&format!("{console}/sign-in"))
        .await
        .expect("sign-in page");
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(token)
        .await
        .expect("type token");
    c.find(Locator::Css("#sign-in"))
        .await
        .expect("button")
        .click()
        .await
        .expect("sign in");
    until("the resources page", || async {
        text(c, "#who").await.filter(|t| t.contains("tenant"))
    })
    .await;
}

async fn sign_out(c: &Client) {
    c.find(Locator::Css("#sign-out"))
        .await
        .expect("sign-out button")
        .click()
        .await
        .expect("sign out");
    until("the sign-in page", || async { text(c, "#sign-in").await }).await;
}

/// Clicks `css` (a button of a form with a confirmation) and accepts the dialog.
async fn click_and_confirm(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");
    until("the confirmation dialog", || async {
        c.get_alert_text().await.ok()
    })
    .await;
    c.accept_alert().await.expect("accept");
}

async fn parked_probes(url: &str, n: usize) -> Vec<i64> {
    let pool = setpoint::store::connect(url, 2)
        .await
        .expect("dev database");
    let mut conn = pool.acquire().await.expect("connection");
    let mut ids = Vec::new();
    for _ in 0..n {
        // Fails transiently on its first attempt, which is its last: parked. A retry succeeds.
        let unit = setpoint::queue::enqueue(
            &mut conn,
            setpoint::NewWork::new("setpoint.probe", json!({"fail_transient_until_attempt": 1}))
                .max_attempts(1),
        )
        .await
        .expect("enqueue a probe");
        ids.push(unit.id);
    }
    drop(conn);
    pool.close().await;
    ids
}

/// A new token of `tenant` (an admin's when `admin`).
async fn token_of(url: &str, tenant: &str, admin: bool) -> String {
    let pool = setpoint::store::connect(url, 2)
        .await
        .expect("dev database");
    let t = setpoint::api::auth::create_token(&pool, tenant, admin, None)
        .await
        .expect("token");
    pool.close().await;
    t.token
}

#[tokio::test]
async fn a_tenant_and_an_admin_use_the_console_in_a_browser() {
    let dir = test_dir("console-browser");
    let shots = shots_dir(&dir);
    let (_dev, info) = start_dev(
        &dir,
        &[
            "--console-listen".into(),
            "127.0.0.1:0".into(),
            "--enable-probe".into(),
        ],
        &[],
    )
    .await;
    let console = info["console"].as_str().expect("console url").to_owned();
    let db = info["database_url"].as_str().expect("database").to_owned();
    let tenant = info["tenant_token"].as_str().expect("token").to_owned();
    // `setpoint dev`'s admin token is of the same tenant as its tenant token; an admin of
    // another tenant shows that an admin reads every tenant's resources.
    let admin = token_of(&db, "ops", true).await;
    let (_driver, c) = browser(&dir).await;

    // A tenant signs in and creates an instance from the generated form.
    c.goto(&format!("{console}/sign-in")).await.expect("goto");
    shot(&c, &shots, "sign-in").await;
    sign_in(&c, &console, &tenant).await;
    c.goto(&format!("{console}/resources/new?kind=kvx.instance"))
        .await
        .expect("form");
    c.find(Locator::Css("#name"))
        .await
        .expect("name")
        .send_keys("web-1")
        .await
        .expect("type");
    c.find(Locator::Css("[name='spec.plan']"))
        .await
        .expect("plan")
        .select_by_value("kvx.small")
        .await
        .expect("plan");
    for (field, value) in [
        ("spec.region", "us-east-1"),
        ("spec.size_gb", "10"),
        ("spec.owner_email", "owner@example.com"),
    ] {
        c.find(Locator::Css(&format!("[name='{field}']")))
            .await
            .expect("field")
            .send_keys(value)
            .await
            .expect("type");
    }
    shot(&c, &shots, "create-form").await;
    c.find(Locator::Css("#submit"))
        .await
        .expect("submit")
        .click()
        .await
        .expect("create");
    // The resource page, then READY without a reload: the status changes under our eyes.
    until("the resource page", || async { text(&c, "#status").await }).await;
    let page_url = c.current_url().await.expect("url").to_string();
    assert!(
        page_url.contains("/tenants/demo/instances/web-1"),
        "{page_url}"
    );
    until("READY without reloading", || async {
        text(&c, "#status").await.filter(|s| s == "READY")
    })
    .await;
    // What the engine observed comes with it, still without a reload: the machine the
    // create chain made, and the generation it was brought to.
    until("the observed state without reloading", || async {
        let generation = text(&c, "#observed-generation").await?;
        let observed = text(&c, "#observed").await?;
        (generation == "1" && observed.contains("machine") && observed.contains("instance_id"))
            .then_some(())
    })
    .await;
    assert_eq!(
        c.current_url().await.expect("url").to_string(),
        page_url,
        "no navigation happened"
    );
    // Its timeline: the create chain's units, each with its token and adapter calls.
    let timeline = until("the timeline with the finished chain", || async {
        let t = text(&c, "#timeline").await?;
        (t.contains("kvx.create.k8s") && t.contains("succeeded") && t.contains("token="))
            .then_some(t)
    })
    .await;
    assert!(timeline.contains("kvx.create.ec2"), "{timeline}");
    // A taller window for this one, so that the picture shows the timeline too.
    c.set_window_size(1280, 1800).await.expect("resize");
    shot(&c, &shots, "resource").await;
    c.set_window_size(1280, 900).await.expect("resize");
    c.goto(&format!("{console}/resources?kind=kvx.instance"))
        .await
        .expect("list");
    until("web-1 in the list", || async {
        text(&c, "#resources")
            .await
            .filter(|t| t.contains("web-1") && t.contains("READY"))
    })
    .await;
    shot(&c, &shots, "resources").await;
    sign_out(&c).await;

    // An admin of another tenant finds demo's instance among every tenant's, and reads it.
    let ids = parked_probes(&db, 2).await;
    sign_in(&c, &console, &admin).await;
    c.goto(&format!("{console}/resources?kind=kvx.instance"))
        .await
        .expect("list");
    until("demo's web-1 in the admin's list", || async {
        let row = text(&c, "tr[data-resource='tenants/demo/instances/web-1']").await?;
        (row.contains("demo") && row.contains("web-1") && row.contains("READY")).then_some(())
    })
    .await;
    shot(&c, &shots, "resources-admin").await;
    c.find(Locator::Css(
        "tr[data-resource='tenants/demo/instances/web-1'] a",
    ))
    .await
    .expect("the instance's link")
    .click()
    .await
    .expect("open it");
    until("demo's instance, read only", || async {
        text(&c, "#read-only").await.filter(|t| t.contains("demo"))
    })
    .await;
    assert!(
        c.find(Locator::Css("#edit")).await.is_err(),
        "an admin does not change another tenant's resource"
    );
    let observed = text(&c, "#observed").await.unwrap_or_default();
    assert!(observed.contains("instance_id"), "{observed}");
    // The admin retries one parked unit and cancels another.
    until("two parked units on the work page", || async {
        c.goto(&format!("{console}/work")).await.ok()?;
        let t = text(&c, "#parked").await?;
        let both = ids.iter().all(|id| t.contains(&format!("{id}")));
        both.then_some(())
    })
    .await;
    shot(&c, &shots, "work").await;
    click_and_confirm(&c, &format!("#retry-{}", ids[0])).await;
    until("the retry's notice", || async {
        text(&c, "#notice")
            .await
            .filter(|t| t.starts_with("Retried"))
    })
    .await;
    click_and_confirm(&c, &format!("#cancel-{}", ids[1])).await;
    until("the cancel's notice", || async {
        text(&c, "#notice")
            .await
            .filter(|t| t.starts_with("Cancelled"))
    })
    .await;
    for id in &ids {
        c.goto(&format!("{console}/work/{id}"))
            .await
            .expect("unit page");
        let expected = if *id == ids[0] {
            "retried"
        } else {
            "cancelled"
        };
        until("the operator's event in the unit's history", || async {
            text(&c, ".events").await.filter(|t| t.contains(expected))
        })
        .await;
    }
    c.goto(&format!("{console}/work/{}", ids[0]))
        .await
        .expect("unit");
    until("the retried unit to finish", || async {
        c.refresh().await.ok()?;
        // The page shows states in capitals (CSS); WebDriver reads the rendered text.
        text(&c, "#unit-state")
            .await
            .filter(|s| s.eq_ignore_ascii_case("finished"))
    })
    .await;
    shot(&c, &shots, "unit").await;
    sign_out(&c).await;

    // Another tenant: 404 for demo's instance, 403 for the admin pages.
    let other = token_of(&db, "other", false).await;
    sign_in(&c, &console, &other).await;
    c.goto(&page_url).await.expect("goto");
    let title = until("an error page", || async { text(&c, "#error-title").await }).await;
    assert!(title.starts_with("404"), "{title}");
    c.goto(&format!("{console}/work")).await.expect("goto");
    let title = until("an error page", || async { text(&c, "#error-title").await }).await;
    assert!(title.starts_with("403"), "{title}");
    shot(&c, &shots, "forbidden").await;
    sign_out(&c).await;
    // Signed out: the pages send the browser to the sign-in form.
    c.goto(&format!("{console}/resources")).await.expect("goto");
    until("the sign-in page", || async { text(&c, "#sign-in").await }).await;

    c.close().await.expect("close the browser");
    let _ = std::fs::remove_dir_all(&dir);
}
