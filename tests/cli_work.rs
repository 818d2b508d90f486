//! The operator commands of the binary (`setpoint work …`, `setpoint migrate`) and `serve` on
//! embedded defaults, run as a user would.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_show_retry_and_cancel_parked_units() {
    let db = db().await;
    let (ok, _, err) = setpoint(Some(&db.url), &["migrate"]);
    assert!(ok, "{err}");
    let (ok, out, err) = setpoint(
        Some(&db.url),
        &[
            "work",
            "enqueue",
            "--kind",
            "setpoint.probe",
            "--spec",
            r#"{"fail_permanent":"quota exceeded"}"#,
            "--count",
            "2",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let enqueued: Vec<Value> = serde_json::from_str(&out).unwrap();
    let ids: Vec<i64> = enqueued.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    let engine = EngineProcess::start(&db.url, "ops", &[], &[]);
    wait_for("both units to park", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work WHERE state = 'parked'")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (n == 2).then_some(())
    })
    .await;
    drop(engine);

    let (ok, out, _) = setpoint(Some(&db.url), &["work", "list", "--state", "parked"]);
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("ID"), "{out}");
    assert!(out.contains("quota exceeded"), "{out}");
    let (ok, out, _) = setpoint(Some(&db.url), &["work", "show", &ids[0].to_string()]);
    assert!(ok);
    assert!(
        out.contains("parked") && out.contains("setpoint work retry"),
        "{out}"
    );
    let token = enqueued[0]["token"].as_str().unwrap();
    let (ok, out, _) = setpoint(Some(&db.url), &["work", "show", token, "--json"]);
    assert!(ok);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["id"].as_i64(), Some(ids[0]));

    let (ok, out, _) = setpoint(Some(&db.url), &["work", "retry", &ids[0].to_string()]);
    assert!(ok, "{out}");
    let (ok, _, _) = setpoint(
        Some(&db.url),
        &[
            "work",
            "cancel",
            &ids[1].to_string(),
            "--reason",
            "no quota this month",
        ],
    );
    assert!(ok);
    let (ok, _, err) = setpoint(Some(&db.url), &["work", "cancel", &ids[1].to_string()]);
    assert!(!ok);
    assert!(err.contains("has already finished"), "{err}");
    let (ok, _, err) = setpoint(Some(&db.url), &["work", "retry", &ids[0].to_string()]);
    assert!(!ok);
    assert!(err.contains("is pending, not parked"), "{err}");
    let (ok, _, err) = setpoint(
        Some(&db.url),
        &["work", "enqueue", "--kind", "x", "--spec", "{nope"],
    );
    assert!(!ok);
    assert!(err.contains("--spec is not valid JSON"), "{err}");
}

#[tokio::test]
async fn commands_without_a_database_say_how_to_give_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_setpoint"))
        .args(["work", "list"])
        .env_remove("SETPOINT_DATABASE_URL")
        .env_remove("SETPOINT_DATABASE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SETPOINT_DATABASE_URL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_database_runs_its_own_and_stops_on_sigterm() {
    let dir =
        std::env::temp_dir().join(format!("setpoint-serve-{}", uuid::Uuid::new_v4().simple()));
    let data = dir.join("pg");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_setpoint"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ])
    .env_remove("SETPOINT_DATABASE_URL")
    .env_remove("SETPOINT_DATABASE_HOST")
    .stderr(std::process::Stdio::piped());
    let mut engine = EngineProcess::from_command(cmd);
    wait_for("the embedded engine to start", || async {
        engine.printed("worker started").then_some(())
    })
    .await;
    engine.signal("TERM");
    assert!(engine.wait_exit().await, "{}", engine.output());
    assert!(engine.printed("worker stopped"), "{}", engine.output());
    assert!(
        data.join("data/PG_VERSION").exists(),
        "the embedded data is kept"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `setpoint work budgets` shows each shared budget's key, rate, tokens and the units waiting
/// for it, as a table and as JSON, and says when no budget was used yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_lists_each_key_with_its_waiting_units() {
    let db = db().await;
    let (ok, out, err) = setpoint(Some(&db.url), &["work", "budgets"]);
    assert!(ok, "{err}");
    assert!(out.contains("no budget has been used"), "{out}");

    let key = "ec2/123456789012/eu-west-1/run_instances";
    let mut conn = db.pool.acquire().await.unwrap();
    setpoint::store::budgets::budget_ensure(&mut conn, key, 2.0, 5.0)
        .await
        .unwrap();
    for work_id in [41, 42] {
        setpoint::store::budgets::budget_reserve(&mut conn, key, work_id, 1.5)
            .await
            .unwrap();
    }
    drop(conn);
    let (ok, out, err) = setpoint(Some(&db.url), &["work", "budgets"]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("KEY") && header.contains("WAITING"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with(key))
        .expect("the key's row");
    assert!(row.contains("2.00/2.00"), "{row}");
    let (ok, out, err) = setpoint(Some(&db.url), &["work", "budgets", "--json"]);
    assert!(ok, "{err}");
    let keys: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(keys.len(), 1, "{out}");
    assert_eq!(keys[0]["key"], key);
    assert_eq!(keys[0]["waiting"], 2, "{out}");
    assert_eq!(keys[0]["max_rate"], 2.0);
}

/// A printing command whose reader went away (`setpoint work list | head`) ends quietly with
/// the status of a process ended by SIGPIPE (141), without a panic or a backtrace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_reader_went_away_ends_quietly() {
    let db = db().await;
    let (reader, writer) = std::io::pipe().expect("pipe");
    // Closed before the command starts: its first print finds no reader.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_setpoint"))
        .args(["work", "budgets"])
        .env("SETPOINT_DATABASE_URL", &db.url)
        .stdout(writer)
        .output()
        .expect("run setpoint");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "{err}");
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_set_listed_and_reset_and_bad_ones_change_nothing() {
    let db = db().await;
    let url = db.url.as_str();
    let (ok, out, err) = setpoint(Some(url), &["work", "weights"]);
    assert!(ok, "{err}");
    assert!(out.contains("every tenant weighs 1"), "{out}");

    let (ok, out, err) = setpoint(
        Some(url),
        &["work", "weights", "--set", "acme=4", "--set", "beta=0.5"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("acme") && out.contains('4'), "{out}");
    assert!(out.contains("beta") && out.contains("0.5"), "{out}");

    // One bad change refuses them all, with a message that says what is wanted.
    for (bad, says) in [
        ("acme", "TENANT=WEIGHT"),
        ("gamma=0", "from 0.01 to 1000"),
        ("gamma=lots", "from 0.01 to 1000"),
        ("=2", "the tenant is empty"),
        ("delta=3", "named twice"),
    ] {
        let (ok, _, err) = setpoint(
            Some(url),
            &["work", "weights", "--set", "delta=2", "--set", bad],
        );
        assert!(!ok, "{bad} was taken");
        assert!(err.contains(says), "{bad}: {err}");
    }
    let (ok, out, err) = setpoint(Some(url), &["work", "weights", "--reset", "beta", "--json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        list,
        serde_json::json!([{ "tenant": "acme", "weight": 4.0 }])
    );
}
