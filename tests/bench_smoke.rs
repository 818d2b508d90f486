//! The benchmarks run as a user runs them (`setpoint bench …` on a throw-away durable cluster),
//! briefly: they must keep working and report their figures. No figure is asserted on; speed
//! is read from the printed figures, never from a test.

mod common;

use common::setpoint;

#[test]
fn bench_api_reports_creates_next_to_the_commit_rate_with_the_cpu_per_create_and_its_floor() {
    let (ok, out, err) = setpoint(
        None,
        &[
            "bench",
            "api",
            "--clients",
            "4",
            "--duration",
            "1s",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert!(
        report["baseline_commits_per_sec"].as_f64().unwrap() > 0.0,
        "{out}"
    );
    assert!(report["creates_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(report["create_errors"], 0, "{out}");
    // The two parts every Create holds, measured on their own.
    assert!(
        report["batched_writes_per_sec"].as_f64().unwrap() > 0.0,
        "{out}"
    );
    assert!(
        report["empty_calls_per_sec"].as_f64().unwrap() > 0.0,
        "{out}"
    );
    assert_eq!(report["floor_errors"], 0, "{out}");
    // The cluster runs on this machine, so where the CPU went is known.
    let cpu = &report["cpu"];
    for field in [
        "baseline_postgres_us",
        "baseline_process_us",
        "create_postgres_us",
        "create_process_us",
        "create_ceiling_per_sec",
        "batched_write_postgres_us",
        "batched_write_process_us",
        "empty_call_process_us",
        "floor_ceiling_per_sec",
    ] {
        assert!(
            cpu[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {out}"
        );
    }
}

#[test]
fn bench_queue_reports_enqueue_and_drain_rates_on_a_durable_cluster() {
    let (ok, out, err) = setpoint(
        None,
        &[
            "bench",
            "queue",
            "--jobs",
            "2000",
            "--workers",
            "50",
            "--latency-rate",
            "0",
            "--baseline-cycles",
            "0",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let drain = &v["report"]["drains"][0];
    assert_eq!(drain["jobs"], 2000, "{out}");
    assert!(drain["drain_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    assert!(drain["enqueue_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    let settings = v["settings"].to_string();
    assert!(
        settings.contains(r#"["fsync","on"]"#)
            && settings.contains(r#"["synchronous_commit","on"]"#),
        "the benchmark runs durable: {settings}"
    );
}

#[test]
fn bench_scale_reports_create_latency_drift_rate_and_table_sizes() {
    let (ok, out, err) = setpoint(
        None,
        &[
            "bench",
            "scale",
            "--resources",
            "2000",
            "--tenants",
            "10",
            "--drift-interval",
            "20s",
            "--adapter-latency",
            "5ms",
            "--create-rate",
            "20",
            "--duration",
            "2s",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(r["resources"], 2000, "{out}");
    assert_eq!(r["create_errors"], 0, "{out}");
    let creates = r["creates"].as_u64().unwrap();
    assert!(creates > 0, "{out}");
    // Every accepted create reached its first adapter call and READY.
    assert_eq!(
        r["commit_to_first_call"]["n"].as_u64(),
        Some(creates),
        "{out}"
    );
    assert_eq!(r["create_to_ready"]["n"].as_u64(), Some(creates), "{out}");
    assert!(r["drift_checks_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    let tables: Vec<&str> = r["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["table"].as_str().unwrap())
        .collect();
    assert_eq!(
        tables,
        [
            "instances",
            "drift_schedule",
            "work",
            "work_events",
            "api_requests"
        ],
        "{out}"
    );
}
