//! The gRPC API driven by the generated Rust client: create/get/list/update/delete/watch,
//! request ids, active work, validation, tenant isolation, tokens and admin-only calls.

mod api_support;
mod common;

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
    let got = get_ok(&mut c, &env.acme, &created.name).await;
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

use setpoint::api::ApiConfig;
use setpoint::api::auth::create_token;
use setpoint::api::proto::{
    CancelWorkRequest, DeleteInstanceRequest, GetWorkRequest, Instance, InstanceSpec,
    ListInstancesRequest, ListWorkRequest, RetryWorkRequest, UpdateInstanceRequest,
};
use tonic_types::StatusExt;

fn violations(s: &tonic::Status) -> Vec<String> {
    s.get_details_bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// Follows `name` until its status is `want` (or the stream ends), returning every status
/// seen (consecutive repeats folded).
async fn follow_until(env: &Env, name: &str, want: InstanceStatus) -> Vec<i32> {
    let mut c = env.instances().await;
    let mut s = c
        .watch_instance(authed(
            &env.acme,
            WatchInstanceRequest { name: name.into() },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<i32> = Vec::new();
    while let Some(i) = tokio::time::timeout(HUNG, s.message())
        .await
        .expect("hung")
        .unwrap()
    {
        if seen.last() != Some(&i.status) {
            seen.push(i.status);
        }
        if i.status == want as i32 && !i.has_active_work {
            break;
        }
    }
    seen
}

#[tokio::test]
async fn request_id_replays_the_first_answer_and_refuses_a_different_body() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let a = c
        .create_instance(authed(&env.acme, create_req("web-1", "rid-1")))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .create_instance(authed(&env.acme, create_req("web-1", "rid-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a, b, "the replay is the first answer");
    // The same request spelled otherwise (the parent named, output-only fields set) is the
    // same request.
    for parent in ["tenants/-", "tenants/acme"] {
        let mut again = create_req("web-1", "rid-1");
        again.parent = parent.into();
        if let Some(i) = again.instance.as_mut() {
            i.status = InstanceStatus::Ready as i32;
            i.uid = "ignored".into();
        }
        let replay = c
            .create_instance(authed(&env.acme, again))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a, replay, "parent {parent}");
    }
    let err = c
        .create_instance(authed(&env.acme, create_req("web-2", "rid-1")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["request_id"]);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "REQUEST_ID_REUSED"
    );
    // The same id under another tenant is another request.
    c.create_instance(authed(&env.globex, create_req("web-1", "rid-1")))
        .await
        .unwrap();
    assert_eq!(
        count(
            &env.db,
            "SELECT count(*) FROM instances WHERE tenant = 'acme'"
        )
        .await,
        1
    );
    assert_eq!(count(&env.db, "SELECT count(*) FROM work").await, 2);
    env.stop().await;
}

#[tokio::test]
async fn concurrent_duplicates_make_one_instance_and_one_unit() {
    let env = Env::default().await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = env.instances().await;
        let token = env.acme.clone();
        calls.push(tokio::spawn(async move {
            c.create_instance(authed(&token, create_req("db-1", "same")))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut uids = Vec::new();
    for call in calls {
        uids.push(call.await.unwrap().expect("every duplicate succeeds").uid);
    }
    uids.dedup();
    assert_eq!(uids.len(), 1);
    assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 1);
    assert_eq!(count(&env.db, "SELECT count(*) FROM work").await, 1);
    assert_eq!(count(&env.db, "SELECT count(*) FROM api_requests").await, 1);
    // Concurrent different bodies under one id: exactly one wins, the others are refused.
    let mut calls = Vec::new();
    for n in 0..6 {
        let mut c = env.instances().await;
        let token = env.acme.clone();
        calls.push(tokio::spawn(async move {
            c.create_instance(authed(&token, create_req(&format!("x-{n}"), "contested")))
                .await
        }));
    }
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 2);
    env.stop().await;
}

#[tokio::test]
async fn changes_during_active_work_fail_with_details_naming_the_unit() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let a = c
        .create_instance(authed(&env.acme, create_req("web-1", "r1")))
        .await
        .unwrap()
        .into_inner();
    let update = UpdateInstanceRequest {
        instance: Some(Instance {
            name: a.name.clone(),
            spec: Some(InstanceSpec {
                plan: "kvx.large".into(),
                ..spec()
            }),
            ..Instance::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["spec.plan".into()],
        }),
        request_id: "r2".into(),
        bulk: false,
    };
    let err = c
        .update_instance(authed(&env.acme, update.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("try again"), "{}", err.message());
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "ACTIVE_WORK");
    assert_eq!(info.metadata["work_id"], a.active_work_id.to_string());
    let pf = err.get_details_precondition_failure().unwrap();
    assert_eq!(pf.violations[0].subject, a.name);
    // Nothing was written by the refused call; after the chain ends the same update works.
    assert_eq!(count(&env.db, "SELECT count(*) FROM work").await, 1);
    assert_eq!(count(&env.db, "SELECT count(*) FROM api_requests").await, 1);
    // An update that changes nothing has nothing to wait for: the instance, unchanged. The
    // same request id with the tenant spelled out replays it.
    let same = |name: &str| UpdateInstanceRequest {
        instance: Some(Instance {
            name: name.into(),
            spec: Some(spec()),
            ..Instance::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["spec.plan".into()],
        }),
        request_id: "r4".into(),
        bulk: false,
    };
    let unchanged = c
        .update_instance(authed(&env.acme, same("tenants/-/instances/web-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (unchanged.generation, unchanged.status),
        (1, InstanceStatus::Creating as i32)
    );
    let replay = c
        .update_instance(authed(&env.acme, same(&a.name)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged, replay);
    // A mask of the whole spec carries the region: another one is refused, not dropped.
    let mut moved = same(&a.name);
    moved.request_id = "r5".into();
    moved.update_mask = Some(prost_types::FieldMask {
        paths: vec!["spec".into()],
    });
    if let Some(s) = moved.instance.as_mut().and_then(|i| i.spec.as_mut()) {
        s.region = "us-west-2".into();
    }
    let err = c
        .update_instance(authed(&env.acme, moved))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["instance.spec.region"]);
    assert_eq!(count(&env.db, "SELECT count(*) FROM work").await, 1);
    env.start_workers();
    follow_until(&env, &a.name, InstanceStatus::Ready).await;
    let u = c
        .update_instance(authed(&env.acme, update))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.status, InstanceStatus::Updating as i32);
    assert_eq!(u.generation, 2);
    env.stop().await;
}

/// A delete is the one change that does not wait: it supersedes the chain in flight (whose
/// units are removed, with a `cancelled` event saying why) and the instance ends DELETED.
#[tokio::test]
async fn a_delete_supersedes_the_chain_in_flight() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let a = c
        .create_instance(authed(&env.acme, create_req("web-1", "r1")))
        .await
        .unwrap()
        .into_inner();
    let d = c
        .delete_instance(authed(
            &env.acme,
            DeleteInstanceRequest {
                name: a.name.clone(),
                request_id: "r3".into(),
                bulk: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.status, InstanceStatus::Deleting as i32);
    assert_ne!(d.active_work_id, a.active_work_id);
    let cancelled: (String, String) = sqlx::query_as(
        "SELECT event, message FROM work_events WHERE work_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(a.active_work_id)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(cancelled.0, "cancelled");
    assert!(cancelled.1.contains("superseded"), "{}", cancelled.1);
    assert_eq!(count(&env.db, "SELECT count(*) FROM work").await, 1);
    env.start_workers();
    follow_until(&env, &a.name, InstanceStatus::Deleted).await;
    env.stop().await;
}

#[tokio::test]
async fn every_validation_rule_refuses_with_field_violations_and_writes_nothing() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let cases: Vec<(&str, setpoint::api::proto::CreateInstanceRequest)> = vec![
        ("instance_id", create_req("Bad_Name", "v1")),
        ("instance_id", create_req("-x", "v2")),
        ("instance_id", create_req(&"a".repeat(64), "v3")),
        ("request_id", create_req("ok", "")),
        ("request_id", create_req("ok", "has space")),
        ("parent", {
            let mut r = create_req("ok", "v4");
            r.parent = "projects/x".into();
            r
        }),
        ("instance.spec", {
            let mut r = create_req("ok", "v5");
            r.instance = None;
            r
        }),
    ];
    let spec_cases: Vec<(&str, InstanceSpec)> = vec![
        (
            "instance.spec.plan",
            InstanceSpec {
                plan: "kvx.huge".into(),
                ..spec()
            },
        ),
        (
            "instance.spec.region",
            InstanceSpec {
                region: "mars-1".into(),
                ..spec()
            },
        ),
        (
            "instance.spec.size_gb",
            InstanceSpec {
                size_gb: 0,
                ..spec()
            },
        ),
        (
            "instance.spec.size_gb",
            InstanceSpec {
                size_gb: 20000,
                ..spec()
            },
        ),
        (
            "instance.spec.owner_email",
            InstanceSpec {
                owner_email: "nobody".into(),
                ..spec()
            },
        ),
        (
            "instance.spec.owner_email",
            InstanceSpec {
                owner_email: "a@b".into(),
                ..spec()
            },
        ),
    ];
    let mut all = cases;
    for (i, (field, s)) in spec_cases.into_iter().enumerate() {
        let mut r = create_req("ok", &format!("s{i}"));
        r.instance = Some(Instance {
            spec: Some(s),
            ..Instance::default()
        });
        all.push((field, r));
    }
    for (field, req) in all {
        let err = c.create_instance(authed(&env.acme, req)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            violations(&err).contains(&field.to_owned()),
            "{field}: {err:?}"
        );
    }
    // Several problems at once are all reported.
    let mut r = create_req("Bad", "");
    r.instance = Some(Instance {
        spec: Some(InstanceSpec {
            plan: "x".into(),
            region: "y".into(),
            size_gb: -1,
            owner_email: "z".into(),
        }),
        ..Instance::default()
    });
    let err = c.create_instance(authed(&env.acme, r)).await.unwrap_err();
    assert_eq!(violations(&err).len(), 6);
    // Page sizes, page tokens and update masks.
    let err = c
        .list_instances(authed(
            &env.acme,
            ListInstancesRequest {
                page_size: 5000,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["page_size"]);
    let err = c
        .list_instances(authed(
            &env.acme,
            ListInstancesRequest {
                page_token: "nonsense".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["page_token"]);
    let err = c
        .update_instance(authed(
            &env.acme,
            UpdateInstanceRequest {
                instance: Some(Instance {
                    name: "tenants/acme/instances/web".into(),
                    spec: Some(spec()),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["spec.region".into(), "uid".into()],
                }),
                request_id: "u1".into(),
                bulk: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["update_mask", "update_mask"]);
    let err = c
        .get_instance(authed(
            &env.acme,
            GetInstanceRequest {
                name: "instances/web".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["name"]);
    // An oversized message is refused by the decoder before any handler runs.
    let err = c
        .create_instance(authed(&env.acme, create_req(&"a".repeat(100_000), "big")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 0);
    assert_eq!(count(&env.db, "SELECT count(*) FROM work").await, 0);
    assert_eq!(count(&env.db, "SELECT count(*) FROM api_requests").await, 0);
    env.stop().await;
}

#[tokio::test]
async fn tenants_see_and_change_only_their_own_instances() {
    let env = Env::default().await;
    env.start_workers();
    let mut c = env.instances().await;
    let a = c
        .create_instance(authed(&env.acme, create_req("web-1", "r1")))
        .await
        .unwrap()
        .into_inner();
    follow_until(&env, &a.name, InstanceStatus::Ready).await;
    let g = &env.globex;
    let nf = |r: Result<_, tonic::Status>| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(!e.message().contains(&a.uid));
    };
    nf(c.get_instance(authed(
        g,
        GetInstanceRequest {
            name: a.name.clone(),
        },
    ))
    .await
    .map(|_| ()));
    nf(c.update_instance(authed(
        g,
        UpdateInstanceRequest {
            instance: Some(Instance {
                name: a.name.clone(),
                spec: Some(spec()),
                ..Default::default()
            }),
            update_mask: None,
            request_id: "g1".into(),
            bulk: false,
        },
    ))
    .await
    .map(|_| ()));
    nf(c.delete_instance(authed(
        g,
        DeleteInstanceRequest {
            name: a.name.clone(),
            request_id: "g2".into(),
            bulk: false,
        },
    ))
    .await
    .map(|_| ()));
    nf(c.watch_instance(authed(
        g,
        WatchInstanceRequest {
            name: a.name.clone(),
        },
    ))
    .await
    .map(|_| ()));
    nf(c.list_instances(authed(
        g,
        ListInstancesRequest {
            parent: "tenants/acme".into(),
            ..Default::default()
        },
    ))
    .await
    .map(|_| ()));
    let mine = c
        .list_instances(authed(g, ListInstancesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(mine.instances.is_empty());
    // `tenants/-/…` is the caller's own tenant: globex's web-1 does not exist.
    nf(c.get_instance(authed(
        g,
        GetInstanceRequest {
            name: "tenants/-/instances/web-1".into(),
        },
    ))
    .await
    .map(|_| ()));
    // Creating into another tenant is refused the same way.
    let mut r = create_req("web-1", "g3");
    r.parent = "tenants/acme".into();
    nf(c.create_instance(authed(g, r)).await.map(|_| ()));
    let got = get_ok(&mut c, &env.acme, "tenants/-/instances/web-1").await;
    assert_eq!(got.uid, a.uid);
    assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 1);
    env.stop().await;
}

#[tokio::test]
async fn an_admin_reads_every_tenants_instances_and_changes_none_of_them() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let a = c
        .create_instance(authed(&env.acme, create_req("web-1", "a1")))
        .await
        .unwrap()
        .into_inner();
    for (token, name) in [(&env.acme, "web-2"), (&env.globex, "db-1")] {
        c.create_instance(authed(token, create_req(name, name)))
            .await
            .unwrap();
    }
    let ops = &env.admin;
    // Any tenant's instance, by its name; the admin reads the raw view.
    let got = get_ok(&mut c, ops, &a.name).await;
    assert_eq!(
        (got.uid.as_str(), got.name.as_str()),
        (a.uid.as_str(), "tenants/acme/instances/web-1")
    );
    let mut watch = c
        .watch_instance(authed(
            ops,
            WatchInstanceRequest {
                name: a.name.clone(),
            },
        ))
        .await
        .expect("an admin watches another tenant's instance")
        .into_inner();
    let first = watch.message().await.unwrap().expect("the first state");
    assert_eq!(first.uid, a.uid);
    drop(watch);
    let list = |parent: &str, page_size: i32, page_token: String| ListInstancesRequest {
        parent: parent.into(),
        page_size,
        page_token,
        status_filter: 0,
    };
    // `tenants/*`: every tenant's, by tenant then name, page by page.
    let mut names = Vec::new();
    let mut token = String::new();
    let mut first_token = String::new();
    loop {
        let page = c
            .list_instances(authed(ops, list("tenants/*", 2, token.clone())))
            .await
            .unwrap()
            .into_inner();
        names.extend(page.instances.into_iter().map(|i| i.name));
        if page.next_page_token.is_empty() {
            break;
        }
        if first_token.is_empty() {
            first_token = page.next_page_token.clone();
        }
        token = page.next_page_token;
    }
    assert_eq!(
        names,
        [
            "tenants/acme/instances/web-1",
            "tenants/acme/instances/web-2",
            "tenants/globex/instances/db-1"
        ]
    );
    // One tenant's; and `tenants/-` stays the admin's own tenant (which has none).
    let acme = c
        .list_instances(authed(ops, list("tenants/acme", 0, String::new())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acme.instances.len(), 2);
    let own = c
        .list_instances(authed(ops, list("tenants/-", 0, String::new())))
        .await
        .unwrap()
        .into_inner();
    assert!(own.instances.is_empty(), "{own:?}");
    // A page token stays with its parent and its caller.
    for (token_of, parent) in [
        (ops, "tenants/acme"),
        (ops, "tenants/-"),
        (&env.acme, "tenants/*"),
    ] {
        let e = c
            .list_instances(authed(token_of, list(parent, 2, first_token.clone())))
            .await
            .expect_err("another listing's token");
        assert!(
            matches!(e.code(), Code::InvalidArgument | Code::PermissionDenied),
            "{parent}: {e:?}"
        );
    }
    // Reading is all: an admin changes only its own tenant's instances.
    let e = c
        .update_instance(authed(
            ops,
            UpdateInstanceRequest {
                instance: Some(Instance {
                    name: a.name.clone(),
                    spec: Some(spec()),
                    ..Default::default()
                }),
                update_mask: None,
                request_id: "o1".into(),
                bulk: false,
            },
        ))
        .await
        .expect_err("an admin's change of another tenant's instance");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .delete_instance(authed(
            ops,
            DeleteInstanceRequest {
                name: a.name.clone(),
                request_id: "o2".into(),
                bulk: false,
            },
        ))
        .await
        .expect_err("an admin's delete of another tenant's instance");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut r = create_req("web-9", "o3");
    r.parent = "tenants/acme".into();
    let e = c
        .create_instance(authed(ops, r))
        .await
        .expect_err("create elsewhere");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A tenant still sees only its own: `tenants/*` needs an admin, another tenant is not found.
    let e = c
        .list_instances(authed(&env.globex, list("tenants/*", 0, String::new())))
        .await
        .expect_err("a tenant listing every tenant");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .list_instances(authed(&env.globex, list("tenants/acme", 0, String::new())))
        .await
        .expect_err("a tenant listing another");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .get_instance(authed(
            &env.globex,
            GetInstanceRequest {
                name: a.name.clone(),
            },
        ))
        .await
        .expect_err("a tenant reading another's instance");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 3);
    env.stop().await;
}

#[tokio::test]
async fn missing_invalid_expired_tokens_are_unauthenticated_and_health_needs_none() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let get = || GetInstanceRequest {
        name: "tenants/acme/instances/web".into(),
    };
    let e = c
        .get_instance(tonic::Request::new(get()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c.get_instance(authed("spt_0000", get())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        !e.message().contains("spt_0000"),
        "the token is never echoed"
    );
    let mut r = tonic::Request::new(get());
    r.metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    assert_eq!(
        c.get_instance(r).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let expired = create_token(&env.db.pool, "acme", false, Some(std::time::Duration::ZERO))
        .await
        .unwrap()
        .token;
    let e = c.get_instance(authed(&expired, get())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"));
    // Tokens are stored hashed.
    let stored: i64 = count(
        &env.db,
        &format!(
            "SELECT count(*) FROM api_tokens WHERE token_hash::text LIKE '%{}%'",
            &env.acme[4..20]
        ),
    )
    .await;
    assert_eq!(stored, 0);
    let mut health = tonic_health::pb::health_client::HealthClient::new(env.channel().await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    env.stop().await;
}

/// `setpoint instances ARGS` against `env`'s API with `token`: (success, stdout, stderr). Off
/// the runtime's threads, so that the API keeps serving while the command runs.
async fn instances_cli(env: &Env, token: &str, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<String> = vec!["instances".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["--server".into(), env.url(), "--token".into(), token.into()]);
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        common::setpoint(None, &args)
    })
    .await
    .unwrap()
}

/// The JSON lines a `--json` command printed.
fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instances_cli_creates_waits_watches_lists_updates_and_deletes_as_its_tenant() {
    let env = Env::default().await;
    env.start_workers();
    let spec = [
        "--plan",
        "kvx.small",
        "--region",
        "eu-west-1",
        "--size-gb",
        "10",
        "--owner-email",
        "ops@example.com",
    ];
    let create = |name: &'static str, extra: &'static [&'static str]| {
        let mut a = vec!["create", name];
        a.extend(spec);
        a.extend(extra);
        a
    };

    // create --wait follows the instance until READY, one JSON line per change.
    let (ok, out, err) = instances_cli(
        &env,
        &env.acme,
        &create("web-1", &["--request-id", "cli-1", "--wait", "--json"]),
    )
    .await;
    assert!(ok, "{err}");
    let seen = json_lines(&out);
    let last = seen.last().unwrap();
    assert_eq!(last["name"], "tenants/acme/instances/web-1", "{out}");
    assert_eq!(last["status"], "READY", "{out}");
    assert_eq!(last["has_active_work"], false, "{out}");
    let uid = last["uid"].as_str().unwrap().to_owned();

    // The same request id again is answered with the first answer: no second instance.
    let (ok, out, err) = instances_cli(
        &env,
        &env.acme,
        &create("web-1", &["--request-id", "cli-1", "--json"]),
    )
    .await;
    assert!(ok, "{err}");
    let replay = &json_lines(&out)[0];
    assert_eq!(replay["uid"], uid.as_str());
    assert_eq!(replay["status"], "CREATING", "the first answer: {out}");

    // get, as text; another tenant is told it does not exist.
    let (ok, out, err) = instances_cli(&env, &env.acme, &["get", "web-1"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("tenants/acme/instances/web-1  READY\n"),
        "{out}"
    );
    assert!(
        out.contains("plan kvx.small  region eu-west-1  size 10 GiB  owner ops@example.com"),
        "{out}"
    );
    let (ok, out, err) = instances_cli(&env, &env.globex, &["get", "web-1"]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("NotFound"), "{err}");
    assert!(!err.contains(&uid), "never another tenant's data: {err}");

    // watch --until-done follows an instance made without --wait.
    let (ok, _, err) = instances_cli(&env, &env.acme, &create("web-2", &["--json"])).await;
    assert!(ok, "{err}");
    let (ok, out, err) = instances_cli(
        &env,
        &env.acme,
        &["watch", "web-2", "--until-done", "--json"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(json_lines(&out).last().unwrap()["status"], "READY", "{out}");

    // list: a tenant sees its own instances only.
    let (ok, out, err) = instances_cli(&env, &env.acme, &["list", "--json"]).await;
    assert!(ok, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = listed.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "tenants/acme/instances/web-1",
            "tenants/acme/instances/web-2"
        ]
    );
    let (ok, out, err) = instances_cli(&env, &env.globex, &["list", "--json"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "[]");

    // update --wait, as text: the plan changes and the generation is observed.
    let (ok, out, err) = instances_cli(
        &env,
        &env.acme,
        &["update", "web-1", "--plan", "kvx.medium", "--wait"],
    )
    .await;
    assert!(ok, "{err}");
    let last = out.lines().last().unwrap();
    assert!(
        last.contains("tenants/acme/instances/web-1  READY  generation 2/2"),
        "{out}"
    );
    let (ok, _, err) = instances_cli(&env, &env.acme, &["update", "web-1"]).await;
    assert!(!ok);
    assert!(err.contains("nothing to change"), "{err}");

    // Bad input: every violation named, nothing written.
    let (ok, out, err) = instances_cli(
        &env,
        &env.acme,
        &[
            "create",
            "web-3",
            "--plan",
            "kvx.huge",
            "--region",
            "eu-west-1",
            "--size-gb",
            "0",
            "--owner-email",
            "nobody",
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(err.contains("InvalidArgument"), "{err}");
    for field in [
        "instance.spec.plan",
        "instance.spec.size_gb",
        "instance.spec.owner_email",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
    let (ok, _, _) = instances_cli(&env, &env.acme, &["get", "web-3"]).await;
    assert!(!ok, "nothing was written");

    // delete --wait ends when the instance is gone.
    let (ok, out, err) =
        instances_cli(&env, &env.acme, &["delete", "web-1", "--wait", "--json"]).await;
    assert!(ok, "{err}");
    if let Some(last) = json_lines(&out).last() {
        assert_eq!(last["status"], "DELETED", "{out}");
    }
    let (ok, out, err) = instances_cli(&env, &env.acme, &["list", "--json"]).await;
    assert!(ok, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1, "{out}");

    // Without a valid token, the command says so.
    let (ok, _, err) = instances_cli(&env, "spt_not-a-token", &["list"]).await;
    assert!(!ok);
    assert!(err.contains("Unauthenticated"), "{err}");
    env.stop().await;
}

#[tokio::test]
async fn tokens_are_listed_without_their_secret_and_a_revoked_token_is_refused() {
    let env = Env::default().await;
    let (ok, out, err) = common::setpoint(Some(&env.db.url), &["tokens", "list", "--json"]);
    assert!(ok, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let tenants: Vec<(&str, bool)> = listed
        .iter()
        .map(|t| (t["tenant"].as_str().unwrap(), t["admin"].as_bool().unwrap()))
        .collect();
    assert_eq!(tenants, [("acme", false), ("globex", false), ("ops", true)]);
    for secret in [&env.acme, &env.globex, &env.admin] {
        assert!(!out.contains(&secret[4..]), "a listing never shows a token");
    }
    let (ok, out, _) = common::setpoint(Some(&env.db.url), &["tokens", "list", "--tenant", "acme"]);
    assert!(ok);
    assert!(out.starts_with("    ID  TENANT"), "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(!out.contains(&env.acme[4..]));
    let acme_id = listed[0]["id"].as_i64().unwrap().to_string();

    // In use, then revoked: refused within the cache's lifetime (bounded here only to catch a
    // hang); the other tenants' tokens keep working.
    let mut c = env.instances().await;
    let get = |tenant: &str| GetInstanceRequest {
        name: format!("tenants/{tenant}/instances/none"),
    };
    let e = c
        .get_instance(authed(&env.acme, get("acme")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "the token works before: {e:?}");
    // A watch opened before the revocation ends with it (no workers run: the instance does not
    // change, so only the token check can end the stream).
    let watched = c
        .create_instance(authed(&env.acme, create_req("w-1", "w-1")))
        .await
        .unwrap()
        .into_inner();
    let mut stream = c
        .watch_instance(authed(
            &env.acme,
            WatchInstanceRequest {
                name: watched.name.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "the current state"
    );
    let (ok, out, err) = common::setpoint(Some(&env.db.url), &["tokens", "revoke", &acme_id]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked") && out.contains("acme"), "{out}");
    let end = tokio::time::timeout(HUNG, stream.message())
        .await
        .expect("the watch ends");
    let e = end.expect_err("an error ends the watch");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let deadline = std::time::Instant::now() + HUNG;
    let e = loop {
        let e = c
            .get_instance(authed(&env.acme, get("acme")))
            .await
            .unwrap_err();
        if e.code() != Code::NotFound || std::time::Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{}", e.message());
    let e = c
        .get_instance(authed(&env.globex, get("globex")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Revoking again keeps the first revocation; an unknown id is an error that says where
    // the ids are.
    let (ok, out, _) =
        common::setpoint(Some(&env.db.url), &["tokens", "revoke", &acme_id, "--json"]);
    assert!(ok);
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (_, listed, _) = common::setpoint(
        Some(&env.db.url),
        &["tokens", "list", "--json", "--tenant", "acme"],
    );
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(again["revoked_at"], listed[0]["revoked_at"]);
    let (ok, _, err) = common::setpoint(Some(&env.db.url), &["tokens", "revoke", "999999"]);
    assert!(!ok);
    assert!(
        err.contains("no token with id 999999") && err.contains("tokens list"),
        "{err}"
    );
    env.stop().await;
}

#[tokio::test]
async fn work_service_is_admin_only_and_operates_parked_units() {
    // The first unit of a create is a probe whose spec (the API's) it does not accept: it
    // fails permanently and parks, and the instance shows FAILED.
    let env = Env::start(ApiConfig {
        create_kind: "setpoint.probe".into(),
        ..ApiConfig::default()
    })
    .await;
    let mut c = env.instances().await;
    let mut w = env.work().await;
    let a = c
        .create_instance(authed(&env.acme, create_req("web-1", "r1")))
        .await
        .unwrap()
        .into_inner();
    let e = w
        .list_work(authed(&env.acme, ListWorkRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = w
        .get_work(authed(
            &env.acme,
            GetWorkRequest {
                id: a.active_work_id,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = w
        .list_work(tonic::Request::new(ListWorkRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let list = w
        .list_work(authed(&env.admin, ListWorkRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.units.len(), 1);
    assert_eq!(list.units[0].resource_id, a.uid);
    // Not parked yet: retry is refused.
    let e = w
        .retry_work(authed(
            &env.admin,
            RetryWorkRequest {
                id: a.active_work_id,
                extra_attempts: 0,
                request_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    env.start_workers();
    // The watch may open after the unit has already parked (the workers run meanwhile), so
    // CREATING may or may not be seen; FAILED must be the end of it.
    let seen = follow_until(&env, &a.name, InstanceStatus::Failed).await;
    assert_eq!(
        seen.last(),
        Some(&(InstanceStatus::Failed as i32)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| *s == InstanceStatus::Creating as i32 || *s == InstanceStatus::Failed as i32),
        "{seen:?}"
    );
    let got = get_ok(&mut c, &env.acme, &a.name).await;
    // The tenant reads what happened and which unit; the raw error stays with operators.
    assert_eq!(
        got.last_error,
        format!(
            "provisioning failed and waits for an operator (unit {})",
            a.active_work_id
        )
    );
    let shown = serde_json::to_string(&setpoint::api::convert::struct_to_json(
        got.observed.as_ref().unwrap(),
    ))
    .unwrap();
    assert!(!shown.contains("unknown field"), "{shown}");
    // An admin of the same tenant, and WorkService, read the raw text (here the probe's
    // refusal of the API's spec).
    let operator = create_token(&env.db.pool, "acme", true, None)
        .await
        .unwrap()
        .token;
    let raw = get_ok(&mut c, &operator, &a.name).await.last_error;
    assert!(raw.contains("unknown field"), "{raw}");
    let unit = w
        .get_work(authed(
            &env.admin,
            GetWorkRequest {
                id: a.active_work_id,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unit.last_error, raw);
    // A parked unit blocks changes too (all but a delete, which supersedes it), naming the
    // unit.
    let e = c
        .update_instance(authed(
            &env.acme,
            UpdateInstanceRequest {
                instance: Some(Instance {
                    name: a.name.clone(),
                    spec: Some(InstanceSpec {
                        plan: "kvx.large".into(),
                        ..spec()
                    }),
                    ..Instance::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["spec.plan".into()],
                }),
                request_id: "d1".into(),
                bulk: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.get_details_error_info().unwrap().reason, "WORK_PARKED");
    let unit = w
        .get_work(authed(
            &env.admin,
            GetWorkRequest {
                id: a.active_work_id,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unit.state, "parked");
    let events: Vec<_> = unit.events.iter().map(|e| e.event.as_str()).collect();
    assert!(
        events.contains(&"enqueued") && events.contains(&"parked"),
        "{events:?}"
    );
    let cancelled = w
        .cancel_work(authed(
            &env.admin,
            CancelWorkRequest {
                id: a.active_work_id,
                reason: "bad spec".into(),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, "finished");
    assert!(
        cancelled
            .events
            .iter()
            .any(|e| e.event == "cancelled" && e.message == "bad spec")
    );
    // The answer shows the unit as it was; the instance stays FAILED and says why.
    assert_eq!(
        (cancelled.kind.as_str(), cancelled.resource_id.as_str()),
        ("setpoint.probe", a.uid.as_str())
    );
    assert!(cancelled.attempt >= 1 && !cancelled.last_error.is_empty());
    let got = get_ok(&mut c, &env.acme, &a.name).await;
    assert_eq!(got.status, InstanceStatus::Failed as i32);
    let observed = setpoint::api::convert::struct_to_json(&got.observed.unwrap_or_default());
    let ready = observed["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ready["status"], "False", "{observed}");
    assert_eq!(ready["reason"], "WorkCancelled", "{observed}");
    // Neither the operator's note nor the operator's token is shown to the tenant; the unit's
    // history keeps both (above).
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("unit {} was cancelled", a.active_work_id))
            && !message.contains("bad spec")
            && !message.contains("token"),
        "{observed}"
    );
    let e = w
        .get_work(authed(&env.admin, GetWorkRequest { id: 999_999 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // With the unit gone the user may delete (the delete kind is the noop).
    let d = c
        .delete_instance(authed(
            &env.acme,
            DeleteInstanceRequest {
                name: a.name.clone(),
                request_id: "d2".into(),
                bulk: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.status, InstanceStatus::Deleting as i32);
    env.stop().await;
}

#[tokio::test]
async fn update_delete_and_paged_list_through_the_life_cycle() {
    let env = Env::default().await;
    env.start_workers();
    let mut c = env.instances().await;
    for n in 0..5 {
        c.create_instance(authed(
            &env.acme,
            create_req(&format!("n{n}"), &format!("c{n}")),
        ))
        .await
        .unwrap();
    }
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_instances(authed(
                &env.acme,
                ListInstancesRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        names.extend(page.instances.into_iter().map(|i| i.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 5);
    let name = "tenants/acme/instances/n0".to_owned();
    follow_until(&env, &name, InstanceStatus::Ready).await;
    let u = c
        .update_instance(authed(
            &env.acme,
            UpdateInstanceRequest {
                instance: Some(Instance {
                    name: name.clone(),
                    spec: Some(InstanceSpec {
                        size_gb: 40,
                        ..InstanceSpec::default()
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["spec.size_gb".into()],
                }),
                request_id: "u1".into(),
                bulk: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.generation, 2);
    assert_eq!(u.spec.as_ref().unwrap().size_gb, 40);
    assert_eq!(
        u.spec.as_ref().unwrap().plan,
        "kvx.small",
        "fields outside the mask are kept"
    );
    follow_until(&env, &name, InstanceStatus::Ready).await;
    let ready = get_ok(&mut c, &env.acme, &name).await;
    assert_eq!(ready.observed_generation, 2);
    // Filter by status.
    let ready_list = c
        .list_instances(authed(
            &env.acme,
            ListInstancesRequest {
                status_filter: InstanceStatus::Ready as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        ready_list
            .instances
            .iter()
            .all(|i| i.status == InstanceStatus::Ready as i32)
    );
    let d = c
        .delete_instance(authed(
            &env.acme,
            DeleteInstanceRequest {
                name: name.clone(),
                request_id: "d1".into(),
                bulk: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.status, InstanceStatus::Deleting as i32);
    // The watch ends with DELETED (it may start after the delete finished: then NOT_FOUND).
    match c
        .watch_instance(authed(
            &env.acme,
            WatchInstanceRequest { name: name.clone() },
        ))
        .await
    {
        Ok(s) => {
            let mut s = s.into_inner();
            let mut last = None;
            while let Some(i) = tokio::time::timeout(HUNG, s.message())
                .await
                .expect("hung")
                .unwrap()
            {
                last = Some(i.status);
            }
            assert_eq!(last, Some(InstanceStatus::Deleted as i32));
        }
        Err(e) => assert_eq!(e.code(), Code::NotFound),
    }
    // The watch ended, so the delete chain has ended: the instance is gone, its name free.
    let e = c
        .get_instance(authed(&env.acme, GetInstanceRequest { name: name.clone() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    c.create_instance(authed(&env.acme, create_req("n0", "again")))
        .await
        .unwrap();
    env.stop().await;
}

/// What one concurrent Create of [`concurrent_creates_get_the_answer_each_would_get_alone`]
/// asked and got.
struct Call {
    tenant: &'static str,
    rid: String,
    name: String,
    answer: Result<setpoint::api::proto::Instance, tonic::Status>,
}

/// Fires `reqs` (tenant, name, request id) at once over a few connections.
async fn fire_creates(env: &Env, reqs: Vec<(&'static str, String, String)>) -> Vec<Call> {
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(env.instances().await);
    }
    let mut calls = Vec::new();
    for (i, (tenant, name, rid)) in reqs.into_iter().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        let token = if tenant == "acme" {
            env.acme.clone()
        } else {
            env.globex.clone()
        };
        calls.push(tokio::spawn(async move {
            let answer = c
                .create_instance(authed(&token, create_req(&name, &rid)))
                .await
                .map(|r| r.into_inner());
            Call {
                tenant,
                rid,
                name,
                answer,
            }
        }));
    }
    let mut out = Vec::new();
    for call in calls {
        out.push(call.await.unwrap());
    }
    out
}

/// Group commit: many concurrent Creates — repeats of one request, one name asked for under
/// several request ids, one request id reused with another body, two tenants with the same ids
/// and names — each get the answer they would get alone, and every distinct create makes
/// exactly one instance, one unit and one stored answer. Run with one batch executor (large
/// batches holding duplicates) and with four.
#[tokio::test]
async fn concurrent_creates_get_the_answer_each_would_get_alone() {
    for executors in [1, 4] {
        let env = Env::start(setpoint::api::ApiConfig {
            create_batch_executors: executors,
            ..setpoint::api::ApiConfig::default()
        })
        .await;
        let mut reqs = Vec::new();
        for tenant in ["acme", "globex"] {
            for i in 0..40 {
                // r-0 … r-9 three times each.
                for _ in 0..(if i < 10 { 3 } else { 1 }) {
                    reqs.push((tenant, format!("n-{i}"), format!("r-{i}")));
                }
            }
            for i in 0..6 {
                reqs.push((tenant, "clash".to_owned(), format!("c-{i}")));
            }
            reqs.push((tenant, "reuse-a".to_owned(), "reused".to_owned()));
            reqs.push((tenant, "reuse-b".to_owned(), "reused".to_owned()));
        }
        // Interleave (a fixed permutation: 7919 is prime to the length).
        let n = reqs.len();
        assert_ne!(n % 7919, 0);
        let reqs: Vec<_> = (0..n).map(|i| reqs[(i * 7919) % n].clone()).collect();
        let calls = fire_creates(&env, reqs).await;

        for tenant in ["acme", "globex"] {
            let mine: Vec<&Call> = calls.iter().filter(|c| c.tenant == tenant).collect();
            for i in 0..40 {
                let rid = format!("r-{i}");
                let answers: Vec<_> = mine
                    .iter()
                    .filter(|c| c.rid == rid)
                    .map(|c| c.answer.as_ref().expect("a distinct create succeeds"))
                    .collect();
                assert!(
                    answers.iter().all(|a| *a == answers[0]),
                    "{rid}: one answer"
                );
                assert_eq!(answers[0].name, format!("tenants/{tenant}/instances/n-{i}"));
                assert!(answers[0].active_work_id > 0);
            }
            let clash: Vec<_> = mine.iter().filter(|c| c.name == "clash").collect();
            assert_eq!(clash.iter().filter(|c| c.answer.is_ok()).count(), 1);
            for c in clash.iter().filter(|c| c.answer.is_err()) {
                let e = c.answer.as_ref().unwrap_err();
                assert_eq!(e.code(), Code::AlreadyExists, "{}: {e:?}", c.rid);
            }
            let reuse: Vec<_> = mine.iter().filter(|c| c.rid == "reused").collect();
            assert_eq!(reuse.iter().filter(|c| c.answer.is_ok()).count(), 1);
            let refused = reuse.iter().find(|c| c.answer.is_err()).unwrap();
            let e = refused.answer.as_ref().unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert_eq!(
                e.get_details_error_info().unwrap().reason,
                "REQUEST_ID_REUSED"
            );
        }

        // Exactly one instance, one unit and one stored answer per distinct create: per
        // tenant 40 names, the clash and one of the reused request's two bodies.
        assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 84);
        assert_eq!(count(&env.db, "SELECT count(*) FROM work").await, 84);
        assert_eq!(
            count(
                &env.db,
                "SELECT count(*) FROM work_events WHERE event = 'enqueued'"
            )
            .await,
            84
        );
        assert_eq!(
            count(
                &env.db,
                "SELECT count(*) FROM instances i
                 WHERE (SELECT count(*) FROM work w WHERE w.resource_id = i.id) <> 1"
            )
            .await,
            0
        );
        assert_eq!(
            count(
                &env.db,
                "SELECT count(*) FROM api_requests WHERE response IS NOT NULL"
            )
            .await,
            84
        );
        assert_eq!(
            count(&env.db, "SELECT count(*) FROM api_requests").await,
            84
        );
        // Every answer names the row and the unit that were written, and shows the row as
        // it was written (the batch builds its answers before its statement runs).
        for call in &calls {
            if let Ok(a) = &call.answer {
                assert_eq!(a.status, InstanceStatus::Creating as i32);
                assert_eq!(a.generation, 1);
                assert!(a.has_active_work);
                let created = a.create_time.unwrap();
                assert_eq!(a.update_time, Some(created));
                let ok: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM instances i JOIN work w ON w.resource_id = i.id
                     WHERE i.id::text = $1 AND i.tenant = $2 AND w.id = $3
                       AND i.created_at = to_timestamp($4) + make_interval(secs => $5::float8 / 1e9)
                       AND i.generation = 1)",
                )
                .bind(&a.uid)
                .bind(call.tenant)
                .bind(a.active_work_id)
                .bind(created.seconds as f64)
                .bind(created.nanos as f64)
                .fetch_one(&env.db.pool)
                .await
                .unwrap();
                assert!(
                    ok,
                    "{} {}: the answer names its instance and unit",
                    call.tenant, call.rid
                );
            }
        }
        // Afterwards, on their own: a repeat replays; a loser of the clash left no claim
        // behind, so it runs again and again finds the name taken.
        let first = calls
            .iter()
            .find(|c| c.tenant == "acme" && c.rid == "r-3")
            .unwrap()
            .answer
            .as_ref()
            .unwrap()
            .clone();
        let mut c = env.instances().await;
        let again = c
            .create_instance(authed(&env.acme, create_req("n-3", "r-3")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again, first);
        let loser = calls
            .iter()
            .find(|c| c.tenant == "acme" && c.name == "clash" && c.answer.is_err())
            .unwrap();
        let e = c
            .create_instance(authed(&env.acme, create_req("clash", &loser.rid)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 84);
        env.stop().await;
    }
}

/// A batch whose transaction fails (here: every unit's kind breaks a constraint of the work
/// table) writes nothing; its creates then run one by one and fail alone, and nothing is
/// written either.
#[tokio::test]
async fn a_failed_batch_writes_nothing() {
    let env = Env::start(setpoint::api::ApiConfig {
        create_kind: "k".repeat(200),
        create_batch_executors: 1,
        ..setpoint::api::ApiConfig::default()
    })
    .await;
    let reqs = (0..12)
        .map(|i| ("acme", format!("f-{i}"), format!("f-{i}")))
        .collect();
    for call in fire_creates(&env, reqs).await {
        assert_eq!(call.answer.unwrap_err().code(), Code::Internal);
    }
    for table in ["instances", "work", "work_events", "api_requests"] {
        assert_eq!(
            count(&env.db, &format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    env.stop().await;
}

fn batch_create<'a>(
    request_id: &'a str,
    name: &'a str,
    work_id: i64,
    token: &'a str,
    spec: &'a serde_json::Value,
) -> setpoint::store::create_batch::BatchCreate<'a> {
    setpoint::store::create_batch::BatchCreate {
        tenant: "acme",
        request_id,
        body_hash: &[7; 32],
        response: b"answer",
        id: uuid::Uuid::new_v4(),
        name,
        spec,
        work_id,
        token,
        work_spec: spec,
    }
}

/// The API's create batches place a tenant's units by its weight (`setpoint work weights`), as
/// `work_enqueue` does: weight 4, a quarter of a second apart.
#[tokio::test]
async fn a_create_batch_places_a_tenants_units_by_its_weight() {
    let env = Env::start(ApiConfig::default()).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    setpoint::store::tenant_weights::tenant_weight_set(&mut conn, "acme", 4.0)
        .await
        .unwrap();
    let ids = setpoint::store::work::work_reserve_ids(&mut conn, 3)
        .await
        .unwrap();
    let spec = serde_json::json!({"plan": "kvx.small"});
    let creates = [
        batch_create("w-1", "w-a", ids[0], "weight-token-1", &spec),
        batch_create("w-2", "w-b", ids[1], "weight-token-2", &spec),
        batch_create("w-3", "w-c", ids[2], "weight-token-3", &spec),
    ];
    let written = setpoint::store::create_batch::instances_create_batch(
        &mut conn,
        "CreateInstance",
        "kvx.instance",
        "test.none",
        chrono::Utc::now(),
        &creates,
    )
    .await
    .unwrap();
    assert_eq!(written, vec![true, true, true]);
    let gaps: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM fair_at - lag(fair_at) OVER (ORDER BY fair_at))::float8
         FROM work ORDER BY fair_at OFFSET 1",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(gaps, vec![0.25, 0.25]);
    drop(conn);
    env.stop().await;
}

/// One batch statement of the race test: creates `race-a` (request id `race-1`) and `race-b`
/// (`race-2`) of tenant acme, their units on two newly reserved ids with `tokens`; the ids and
/// what the statement answered.
async fn race_batch(
    conn: &mut sqlx::PgConnection,
    tokens: [&str; 2],
) -> (Vec<i64>, Result<Vec<bool>, setpoint::store::StoreError>) {
    use chrono::SubsecRound;
    let ids = setpoint::store::work::work_reserve_ids(conn, 2)
        .await
        .unwrap();
    let spec = serde_json::json!({"plan": "kvx.small"});
    let creates = [
        batch_create("race-1", "race-a", ids[0], tokens[0], &spec),
        batch_create("race-2", "race-b", ids[1], tokens[1], &spec),
    ];
    let now = chrono::Utc::now().trunc_subsecs(6);
    let written = setpoint::store::create_batch::instances_create_batch(
        conn,
        "CreateInstance",
        "kvx.instance",
        "test.none",
        now,
        &creates,
    )
    .await;
    (ids, written)
}

/// The batch statement meets a request id that another transaction holds: it waits, and when
/// that transaction commits it fails as a whole and writes nothing (the executor then tries
/// once more); tried again, it leaves out just that create.
#[tokio::test]
async fn a_batch_that_loses_a_race_writes_nothing_and_a_second_try_leaves_the_loser_out() {
    let env = Env::start(ApiConfig::default()).await;
    let pool = env.db.pool.clone();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO api_requests (tenant, request_id, method, body_hash, response)
         VALUES ('acme', 'race-1', 'CreateInstance', '\\x07', 'first')",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let batch = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            race_batch(&mut conn, ["race-token-1", "race-token-2"])
                .await
                .1
        }
    });
    // Commit only once the statement waits for the holder's row lock.
    let deadline = std::time::Instant::now() + HUNG;
    while count(
        &env.db,
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .await
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch never waited"
        );
        assert!(
            !batch.is_finished(),
            "the batch did not wait for the holder"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    holder.commit().await.unwrap();
    let err = batch.await.unwrap().unwrap_err();
    assert!(err.is_unique_violation(), "{err}");
    assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 0);
    assert_eq!(count(&env.db, "SELECT count(*) FROM work_events").await, 0);
    assert_eq!(count(&env.db, "SELECT count(*) FROM api_requests").await, 1);

    let mut conn = pool.acquire().await.unwrap();
    let (ids, written) = race_batch(&mut conn, ["race-token-3", "race-token-4"]).await;
    let written = written.unwrap();
    assert_eq!(written, [false, true]);
    assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 1);
    assert_eq!(
        count(
            &env.db,
            &format!("SELECT count(*) FROM work WHERE id = {}", ids[1])
        )
        .await,
        1
    );
    assert_eq!(count(&env.db, "SELECT count(*) FROM work_events").await, 1);
    assert_eq!(count(&env.db, "SELECT count(*) FROM api_requests").await, 2);
    drop(conn);
    env.stop().await;
}

#[tokio::test]
async fn control_characters_are_field_violations_and_limits_count_characters() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let mut w = env.work().await;
    // NUL reached PostgreSQL before (INTERNAL); now each is a violation of its field.
    let e = c
        .list_instances(authed(
            &env.acme,
            ListInstancesRequest {
                page_token: "\0".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), violations(&e)),
        (Code::InvalidArgument, vec!["page_token".to_owned()])
    );
    for (kind, page_token) in [("a\0b", ""), ("x\ny", ""), ("", "1\0")] {
        let e = w
            .list_work(authed(
                &env.admin,
                ListWorkRequest {
                    kind: kind.into(),
                    page_token: page_token.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        let field = if kind.is_empty() {
            "page_token"
        } else {
            "kind"
        };
        assert_eq!(
            (e.code(), violations(&e)),
            (Code::InvalidArgument, vec![field.to_owned()]),
            "{kind:?} {page_token:?}"
        );
    }
    let cancel = |reason: String| CancelWorkRequest {
        id: 1,
        reason,
        request_id: String::new(),
    };
    let e = w
        .cancel_work(authed(&env.admin, cancel("why\0".into())))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), vec!["reason"]);
    // The proto's limits are characters: 128 and 1000 two-byte characters pass validation
    // (the listing is empty; unit 1 does not exist), one more does not.
    w.list_work(authed(
        &env.admin,
        ListWorkRequest {
            kind: "é".repeat(128),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    let e = w
        .list_work(authed(
            &env.admin,
            ListWorkRequest {
                kind: "é".repeat(129),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), vec!["kind"]);
    let e = w
        .cancel_work(authed(&env.admin, cancel("é".repeat(1000))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = w
        .cancel_work(authed(&env.admin, cancel("é".repeat(1001))))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), vec!["reason"]);
    // Fields an update mask leaves out are not used, but control characters are refused.
    let mut bad_region = spec();
    bad_region.region = "eu\0west".into();
    let e = c
        .update_instance(authed(
            &env.acme,
            UpdateInstanceRequest {
                instance: Some(Instance {
                    name: "tenants/acme/instances/web".into(),
                    spec: Some(bad_region),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["spec.plan".into()],
                }),
                request_id: "u1".into(),
                bulk: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), vec!["instance.spec.region"]);
    assert_eq!(count(&env.db, "SELECT count(*) FROM api_requests").await, 0);
    env.stop().await;
}

#[tokio::test]
async fn a_flood_of_update_mask_paths_gets_one_small_error() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let update = |paths: Vec<String>| UpdateInstanceRequest {
        instance: Some(Instance {
            name: "tenants/acme/instances/web".into(),
            spec: Some(spec()),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths }),
        request_id: "u1".into(),
        bulk: false,
    };
    // 32,000 empty paths fit in 64 KB; they made 9.9 MB of trailers before.
    let e = c
        .update_instance(authed(&env.acme, update(vec![String::new(); 32_000])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(violations(&e), vec!["update_mask"]);
    assert!(e.message().len() + e.details().len() < 1024, "{e:?}");
    assert!(e.message().contains("see the BadRequest details"), "{e:?}");
    // Ten bad paths: each is a violation, and the message only summarises them.
    let e = c
        .update_instance(authed(
            &env.acme,
            update((0..10).map(|i| format!("spec.nope{i}")).collect()),
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&e).len(), 10);
    assert_eq!(
        e.message(),
        "invalid request: 10 field violations (update_mask); see the BadRequest details"
    );
    env.stop().await;
}

#[tokio::test]
async fn page_tokens_only_work_for_their_tenant_and_filter() {
    let env = Env::default().await;
    let mut c = env.instances().await;
    let mut w = env.work().await;
    for n in 0..3 {
        for token in [&env.acme, &env.globex] {
            c.create_instance(authed(
                token,
                create_req(&format!("n{n}"), &format!("c{n}")),
            ))
            .await
            .unwrap();
        }
    }
    let list = |page_token: String, status_filter: i32| ListInstancesRequest {
        page_size: 1,
        page_token,
        status_filter,
        ..Default::default()
    };
    let token = c
        .list_instances(authed(&env.acme, list(String::new(), 0)))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!token.is_empty());
    // Another tenant's token, or this tenant's with another filter, is refused.
    let e = c
        .list_instances(authed(&env.globex, list(token.clone(), 0)))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), vec!["page_token"]);
    let e = c
        .list_instances(authed(
            &env.acme,
            list(token.clone(), InstanceStatus::Creating as i32),
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), vec!["page_token"]);
    let page = c
        .list_instances(authed(&env.acme, list(token, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.instances[0].name, "tenants/acme/instances/n1");
    // ListWork's tokens are bound to its filters.
    let page = w
        .list_work(authed(
            &env.admin,
            ListWorkRequest {
                page_size: 2,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.units.len(), 2);
    for (state, kind) in [("pending", ""), ("", "setpoint.noop")] {
        let e = w
            .list_work(authed(
                &env.admin,
                ListWorkRequest {
                    state: state.into(),
                    kind: kind.into(),
                    page_size: 2,
                    page_token: page.next_page_token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(violations(&e), vec!["page_token"]);
    }
    let next = w
        .list_work(authed(
            &env.admin,
            ListWorkRequest {
                page_size: 2,
                page_token: page.next_page_token,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.units.len(), 2);
    assert!(next.units[0].id > page.units[1].id);
    env.stop().await;
}

/// Holds `LOCK TABLE api_requests` until the returned transaction ends: every mutating call
/// then waits in the database. Returns once the lock is held.
async fn block_mutations(env: &Env) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = env.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_requests IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Waits until `n` statements of the test's database wait for a lock.
async fn wait_for_lock_waiters(env: &Env, n: i64) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
        env.db.name
    );
    common::wait_for("calls waiting for the lock", || {
        let sql = sql.clone();
        async move { (count(&env.db, &sql).await == n).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_limit_refuses_at_once_and_the_timeout_ends_a_stuck_call() {
    let env = Env::start(ApiConfig {
        max_in_flight: 2,
        create_batch_executors: 0,
        ..ApiConfig::default()
    })
    .await;
    let lock = block_mutations(&env).await;
    let stuck: Vec<_> = (0..2)
        .map(|n| {
            let addr = env.url();
            let token = env.acme.clone();
            tokio::spawn(async move {
                let mut c =
                    setpoint::api::proto::instance_service_client::InstanceServiceClient::connect(
                        addr,
                    )
                    .await
                    .unwrap();
                c.create_instance(authed(
                    &token,
                    create_req(&format!("s{n}"), &format!("s{n}")),
                ))
                .await
            })
        })
        .collect();
    wait_for_lock_waiters(&env, 2).await;
    // Two calls in progress: the third is refused at once, naming the limit; health is served.
    let mut c = env.instances().await;
    let e = c
        .get_instance(authed(
            &env.acme,
            GetInstanceRequest {
                name: "tenants/acme/instances/s0".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("api.max_in_flight"), "{e:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(env.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    lock.commit().await.unwrap();
    for call in stuck {
        call.await.unwrap().expect("the waiting creates finish");
    }
    get_ok(&mut c, &env.acme, "tenants/acme/instances/s0").await;
    env.stop().await;

    // A call stuck past the timeout is answered DEADLINE_EXCEEDED, and what it began is rolled
    // back: the same request id then works.
    let env = Env::start(ApiConfig {
        request_timeout: std::time::Duration::from_secs(1),
        create_batch_executors: 0,
        ..ApiConfig::default()
    })
    .await;
    let mut c = env.instances().await;
    let lock = block_mutations(&env).await;
    let e = c
        .create_instance(authed(&env.acme, create_req("t1", "t1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("1s (api.request_timeout)") && e.message().contains("request_id"),
        "{e:?}"
    );
    lock.commit().await.unwrap();
    c.create_instance(authed(&env.acme, create_req("t1", "t1")))
        .await
        .unwrap();
    assert_eq!(count(&env.db, "SELECT count(*) FROM instances").await, 1);
    env.stop().await;
}

#[tokio::test]
async fn watch_streams_are_capped_per_tenant() {
    let env = Env::start(ApiConfig {
        max_watches_per_tenant: 2,
        ..ApiConfig::default()
    })
    .await;
    let mut c = env.instances().await;
    for token in [&env.acme, &env.globex] {
        c.create_instance(authed(token, create_req("web-1", "r1")))
            .await
            .unwrap();
    }
    let watch = |token: &str| {
        authed(
            token,
            WatchInstanceRequest {
                name: "tenants/-/instances/web-1".into(),
            },
        )
    };
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = c
            .watch_instance(watch(&env.acme))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().unwrap();
        open.push(s);
    }
    let e = c.watch_instance(watch(&env.acme)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("2 WatchInstance streams")
            && e.message().contains("api.max_watches_per_tenant"),
        "{e:?}"
    );
    assert_eq!(
        e.get_details_quota_failure().unwrap().violations[0].subject,
        "tenants/acme"
    );
    // Another tenant has slots of its own.
    let mut g = c
        .watch_instance(watch(&env.globex))
        .await
        .unwrap()
        .into_inner();
    g.message().await.unwrap().unwrap();
    // A stream the client closes frees its slot (the server notices the closed stream).
    drop(open.pop());
    common::wait_for("a freed watch slot", || {
        let mut c = c.clone();
        let req = watch(&env.acme);
        async move { c.watch_instance(req).await.ok() }
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn unknown_tokens_beyond_the_lookup_budget_are_unavailable_and_known_unknowns_stay_cheap() {
    let env = Env::start(ApiConfig {
        tokens: setpoint::api::token_cache::TokenLimits {
            lookups_per_second: 1,
            lookup_burst: 2,
            ..Default::default()
        },
        ..ApiConfig::default()
    })
    .await;
    let mut c = env.instances().await;
    let get = |token: &str| {
        authed(
            token,
            GetInstanceRequest {
                name: "tenants/-/instances/web".into(),
            },
        )
    };
    let tokens: Vec<String> = (0..30)
        .map(|_| format!("spt_{}", uuid::Uuid::new_v4().simple()))
        .collect();
    let mut looked_up = Vec::new();
    let mut refused = 0;
    for t in &tokens {
        let e = c.get_instance(get(t)).await.unwrap_err();
        match e.code() {
            Code::Unauthenticated => looked_up.push(t.clone()),
            Code::Unavailable => {
                assert!(e.message().contains("try again"), "{e:?}");
                refused += 1;
            }
            other => panic!("{other:?}: {e:?}"),
        }
    }
    assert!(refused > 0 && !looked_up.is_empty(), "{refused}");
    // A token found unknown is refused from the cache: never UNAVAILABLE, however spent the
    // budget is.
    for _ in 0..3 {
        for t in &looked_up {
            let e = c.get_instance(get(t)).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        }
    }
    env.stop().await;
}

/// Acme's instances, units and stored request ids.
async fn acme_written(env: &Env) -> (i64, i64, i64) {
    (
        count(
            &env.db,
            "SELECT count(*) FROM instances WHERE tenant = 'acme'",
        )
        .await,
        count(&env.db, "SELECT count(*) FROM work WHERE tenant = 'acme'").await,
        count(
            &env.db,
            "SELECT count(*) FROM api_requests WHERE tenant = 'acme'",
        )
        .await,
    )
}

#[tokio::test]
async fn a_tenant_at_its_quota_of_changes_in_flight_is_refused_with_a_retry_delay() {
    use setpoint::api::proto::{
        DeleteInstanceRequest, Instance, InstanceSpec, UpdateInstanceRequest,
    };
    let env = Env::start(ApiConfig {
        max_changes_in_flight_per_tenant: 2,
        ..ApiConfig::default()
    })
    .await;
    let mut c = env.instances().await;
    // No workers run: every accepted change stays in flight.
    for (name, rid) in [("web-1", "r1"), ("web-2", "r2")] {
        c.create_instance(authed(&env.acme, create_req(name, rid)))
            .await
            .unwrap();
    }
    let e = c
        .create_instance(authed(&env.acme, create_req("web-3", "r3")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("2 resources with a change in progress")
            && e.message().contains("api.max_changes_in_flight_per_tenant")
            && e.message().contains("retry in 5s"),
        "{e:?}"
    );
    assert_eq!(
        e.get_details_quota_failure().unwrap().violations[0].subject,
        "tenants/acme"
    );
    assert_eq!(
        e.get_details_retry_info().unwrap().retry_delay,
        Some(std::time::Duration::from_secs(5))
    );
    assert_eq!(
        acme_written(&env).await,
        (2, 2, 2),
        "nothing of the refused create"
    );
    // The quota is per tenant.
    c.create_instance(authed(&env.globex, create_req("web-3", "r3")))
        .await
        .unwrap();
    // A repeat of an accepted create still gets its first answer.
    let again = c
        .create_instance(authed(&env.acme, create_req("web-1", "r1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.name, "tenants/acme/instances/web-1");

    // web-1's chain ends (as a worker would end it): one change in flight, room for one.
    sqlx::query("UPDATE instances SET has_active_work = false WHERE name = 'web-1'")
        .execute(&env.db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM work WHERE tenant = 'acme' AND resource_id = (SELECT id FROM instances WHERE name = 'web-1' AND tenant = 'acme')")
        .execute(&env.db.pool)
        .await
        .unwrap();
    c.create_instance(authed(&env.acme, create_req("web-3", "r4")))
        .await
        .unwrap();
    // At the quota again: changing or deleting the idle web-1 would add a change in flight.
    let update = UpdateInstanceRequest {
        instance: Some(Instance {
            name: "tenants/-/instances/web-1".into(),
            spec: Some(InstanceSpec {
                plan: "kvx.large".into(),
                ..spec()
            }),
            ..Instance::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["spec.plan".into()],
        }),
        request_id: "r5".into(),
        bulk: false,
    };
    let e = c
        .update_instance(authed(&env.acme, update))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let delete = |name: &str, rid: &str| DeleteInstanceRequest {
        name: format!("tenants/-/instances/{name}"),
        request_id: rid.into(),
        bulk: false,
    };
    let e = c
        .delete_instance(authed(&env.acme, delete("web-1", "r6")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(
        count(
            &env.db,
            "SELECT count(*) FROM instances WHERE tenant = 'acme' AND name = 'web-1' \
             AND generation = 1 AND operation IS NULL AND status = 'READY'"
        )
        .await,
        1,
        "the refused update and delete wrote nothing"
    );
    // Deleting a resource whose change is in flight adds nothing: it is taken.
    c.delete_instance(authed(&env.acme, delete("web-2", "r7")))
        .await
        .unwrap();
    // Once the chains finish, changes are taken again.
    env.start_workers();
    common::wait_for("room under the quota", || {
        let mut c = c.clone();
        let req = authed(&env.acme, delete("web-1", "r8"));
        async move { c.delete_instance(req).await.ok() }
    })
    .await;
    env.stop().await;
}
