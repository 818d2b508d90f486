//! The API driven by clients written by others: a Python client generated from `proto/` with
//! grpcio-tools inside this test run, and grpcurl through server reflection (v1alpha).

mod api_support;
mod common;

use std::path::PathBuf;
use std::process::Command;

use api_support::*;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("setpoint-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run scripts/install-deps.sh)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn python_client_generated_from_the_protos_exercises_every_rpc() {
    let env = Env::default().await;
    env.start_workers();
    let root = common::package_dir();
    let gen_dir = temp_dir("pygen");
    let (ok, _, err) = run(Command::new("python3")
        .current_dir(&root)
        .args(["-m", "grpc_tools.protoc", "-Iproto"])
        .arg(format!("--python_out={}", gen_dir.display()))
        .arg(format!("--grpc_python_out={}", gen_dir.display()))
        .args([
            "proto/setpoint/v1/instances.proto",
            "proto/setpoint/v1/work.proto",
        ]));
    assert!(ok, "grpcio-tools failed: {err}");
    let script = root.join("tests/python/api_client.py");
    let addr = env.addr.to_string();
    let (acme, admin) = (env.acme.clone(), env.admin.clone());
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(Command::new("python3")
            .arg(script)
            .arg(&gen_dir)
            .arg(addr)
            .arg(acme)
            .arg(admin))
    })
    .await
    .unwrap();
    assert!(ok, "python client failed:\n{out}\n{err}");
    assert!(out.contains("OK "), "{out}");
    env.stop().await;
}

#[tokio::test]
async fn grpcurl_works_through_reflection() {
    let env = Env::default().await;
    let addr = env.addr.to_string();
    let auth = format!("authorization: Bearer {}", env.acme);
    let grpcurl = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || run(Command::new("grpcurl").args(args)))
    };
    let (ok, out, err) = grpcurl(vec![
        "-plaintext".into(),
        "-H".into(),
        auth.clone(),
        addr.clone(),
        "list".into(),
    ])
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("setpoint.v1.InstanceService"), "{out}");
    assert!(out.contains("setpoint.v1.WorkService"), "{out}");
    assert!(out.contains("grpc.health.v1.Health"), "{out}");
    let (ok, out, err) = grpcurl(vec![
        "-plaintext".into(),
        "-H".into(),
        auth.clone(),
        addr.clone(),
        "describe".into(),
        "setpoint.v1.CreateInstanceRequest".into(),
    ])
    .await
    .unwrap();
    assert!(ok && out.contains("request_id"), "{out}{err}");
    let body = r#"{"instance_id":"curl-1","request_id":"c-1","instance":{"spec":{"plan":"kvx.small","region":"eu-west-1","size_gb":10,"owner_email":"c@example.com"}}}"#;
    let (ok, out, err) = grpcurl(vec![
        "-plaintext".into(),
        "-H".into(),
        auth.clone(),
        "-d".into(),
        body.into(),
        addr.clone(),
        "setpoint.v1.InstanceService/CreateInstance".into(),
    ])
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("CREATING") && out.contains("tenants/acme/instances/curl-1"),
        "{out}"
    );
    // Bad input comes back as InvalidArgument.
    let (ok, _, err) = grpcurl(vec![
        "-plaintext".into(),
        "-H".into(),
        auth.clone(),
        "-d".into(),
        r#"{"instance_id":"Curl_1","request_id":"c-2"}"#.into(),
        addr.clone(),
        "setpoint.v1.InstanceService/CreateInstance".into(),
    ])
    .await
    .unwrap();
    assert!(!ok && err.contains("InvalidArgument"), "{err}");
    // Reflection serves the google.rpc types, so grpcurl shows the details, not raw bytes.
    assert!(
        err.contains(r#""@type":"type.googleapis.com/google.rpc.BadRequest""#)
            && err.contains(r#""field":"instance_id""#),
        "{err}"
    );
    // A change while the create's unit is queued (no workers run here): FailedPrecondition,
    // with details naming the unit. grpcurl 1.8 takes a field mask as an object.
    let update = r#"{"instance":{"name":"tenants/-/instances/curl-1","spec":{"plan":"kvx.large"}},"update_mask":{"paths":["spec.plan"]},"request_id":"c-3"}"#;
    let (ok, _, err) = grpcurl(vec![
        "-plaintext".into(),
        "-H".into(),
        auth.clone(),
        "-d".into(),
        update.into(),
        addr.clone(),
        "setpoint.v1.InstanceService/UpdateInstance".into(),
    ])
    .await
    .unwrap();
    assert!(!ok && err.contains("FailedPrecondition"), "{err}");
    assert!(
        err.contains("google.rpc.PreconditionFailure")
            && err.contains("google.rpc.ErrorInfo")
            && err.contains(r#""reason":"ACTIVE_WORK""#),
        "{err}"
    );
    // Reflection needs a token; health does not.
    let (ok, _, err) = grpcurl(vec!["-plaintext".into(), addr.clone(), "list".into()])
        .await
        .unwrap();
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, out, err) = grpcurl(vec![
        "-plaintext".into(),
        "-import-path".into(),
        health_proto_dir(),
        "-proto".into(),
        "health.proto".into(),
        addr.clone(),
        "grpc.health.v1.Health/Check".into(),
    ])
    .await
    .unwrap();
    assert!(ok && out.contains("SERVING"), "{out}{err}");
    env.stop().await;
}

/// grpc.health.v1's proto for calling health without reflection (reflection needs a token).
fn health_proto_dir() -> String {
    let d = temp_dir("health");
    std::fs::write(
        d.join("health.proto"),
        "syntax = \"proto3\";\npackage grpc.health.v1;\nmessage HealthCheckRequest { string service = 1; }\n\
         message HealthCheckResponse { enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }\n\
         ServingStatus status = 1; }\nservice Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }\n",
    )
    .unwrap();
    d.display().to_string()
}
