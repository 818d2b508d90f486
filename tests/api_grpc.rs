//! The gRPC API driven by the generated Rust client: create/get/list/update/delete/watch,
//! request ids, active work, validation, tenant isolation, tokens and admin-only calls.

mod api_support;

use api_support::*;
use setpoint::api::proto::{GetInstanceRequest, InstanceStatus, WatchInstanceRequest};
use tonic::Code;

#[tokio::test]
async fn create_then_watch_sees_every_state_until_ready() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let created = c
        .create_instance(authed(&env.acme, create_req("web-1", "r1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "tenants/acme/instances/web-1");
    assert_eq!(created.status, InstanceStatus::Creating as i32);
    assert!(created.has_active_work);
    assert!(created.active_work_id > 0);

    // No workers yet: the watch sees CREATING first, then (after workers start) READY.
    let mut stream = c
        .watch_instance(authed(
            &env.acme,
            WatchInstanceRequest {
                name: created.name.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status, InstanceStatus::Creating as i32);
    env.start_workers();
    let mut seen = vec![first.status];
    while let Some(i) = tokio::time::timeout(HUNG, stream.message())
        .await
        .expect("hung")
        .unwrap()
    {
        if *seen.last().unwrap() != i.status {
            seen.push(i.status);
        }
        if i.status == InstanceStatus::Ready as i32 {
            assert!(!i.has_active_work);
            assert_eq!(i.observed_generation, 1);
            break;
        }
    }
    assert_eq!(
        seen,
        vec![
            InstanceStatus::Creating as i32,
            InstanceStatus::Ready as i32
        ]
    );
    let got = c
        .get_instance(authed(
            &env.acme,
            GetInstanceRequest {
                name: created.name.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, InstanceStatus::Ready as i32);
    // Another tenant does not see it.
    let err = c
        .get_instance(authed(
            &env.globex,
            GetInstanceRequest {
                name: created.name.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    env.stop().await;
}
