//! `Compute::resize_instance` on EC2 against a real moto server (started by this test binary):
//! stop → change the type → start, a rerun that changes nothing, a retry from every state a
//! crash can leave behind, a deadline that runs out mid-way, and only the token's machine
//! touched.
//!
//! moto reports the new `InstanceType` after `ModifyInstanceAttribute`, and its stop/start
//! settle at once (`stopping` → `stopped`, `pending` → `running` on the next describe). Unlike
//! AWS it also lets a running instance change type, so these tests check the order of steps
//! through the states the adapter returns, not through moto refusing.

mod common;

use setpoint_adapter::Fence;
use std::sync::OnceLock;
use std::time::Instant;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::AttributeValue;
use common::*;
use setpoint_adapter::{
    CODE_MACHINE_NOT_FOUND, Compute, ErrorClass, IdempotencyToken, InstanceObservation,
    InstanceState, ResizeRequest,
};
use setpoint_ec2::{Ec2Compute, PlanConfig};

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| Moto::start(&[]))
}

/// An adapter whose plans map `kvx.small` → `t3.small` and `kvx.medium` → `t3.medium`.
async fn ec2() -> Ec2Compute {
    let mut cfg = config(&moto().url());
    for (plan, ty) in [("kvx.small", "t3.small"), ("kvx.medium", "t3.medium")] {
        cfg.plans.insert(
            plan.into(),
            PlanConfig {
                image_id: None,
                instance_type: Some(ty.into()),
            },
        );
    }
    compute(cfg).await
}

/// Launches a `kvx.small` machine with a fresh token.
async fn launch(ec2: &Ec2Compute) -> (IdempotencyToken, ResizeRequest, InstanceObservation) {
    let token = IdempotencyToken::generate();
    let req = request("acme");
    let obs = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(obs.instance_type.as_deref(), Some("t3.small"));
    let resize = ResizeRequest {
        resource_id: req.resource_id,
        plan: "kvx.medium".into(),
        instance_type: None,
        data_volume_gb: None,
    };
    (token, resize, obs)
}

/// (state, instance type) of `id` as moto reports it.
async fn seen(client: &Client, id: &str) -> (String, String) {
    let out = client
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    let i = &out.reservations()[0].instances()[0];
    (
        i.state().unwrap().name().unwrap().as_str().to_owned(),
        i.instance_type().unwrap().as_str().to_owned(),
    )
}

/// The error of a resize that must fail.
async fn refused(
    ec2: &Ec2Compute,
    token: &IdempotencyToken,
    req: &ResizeRequest,
) -> setpoint_adapter::AdapterError {
    ec2.resize_instance(token, req, deadline(), &Fence::unbounded())
        .await
        .expect_err("the resize is refused")
}

fn running(ty: &str) -> (String, String) {
    ("running".to_owned(), ty.to_owned())
}

#[tokio::test]
async fn a_plan_change_stops_retypes_and_starts_the_same_machine_once() {
    let ec2 = ec2().await;
    let (token, req, launched) = launch(&ec2).await;

    let got = ec2
        .resize_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(got.instance_id, launched.instance_id);
    assert_eq!(got.state, InstanceState::Running);
    assert_eq!(got.instance_type.as_deref(), Some("t3.medium"));
    assert_eq!(
        got.private_ip, launched.private_ip,
        "the machine keeps its IP"
    );
    assert_eq!(
        seen(ec2.client(), &launched.instance_id).await,
        running("t3.medium"),
        "moto reports the new type"
    );
    assert_eq!(
        tagged(ec2.client(), &token).await,
        vec![(launched.instance_id.clone(), "running".to_owned())],
        "still exactly one machine for the token"
    );

    // At the target state a rerun changes nothing: even with its deadline already passed it
    // answers `running`, which it could not if it had sent StopInstances (that answers
    // `stopping`).
    let again = ec2
        .resize_instance(&token, &req, Instant::now(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(again.state, InstanceState::Running);
    assert_eq!(again.instance_type.as_deref(), Some("t3.medium"));
    assert!(again.adopted);

    // The spec's instance type wins over the plan, as for a launch.
    let explicit = ResizeRequest {
        instance_type: Some("t3.large".into()),
        ..req.clone()
    };
    let got = ec2
        .resize_instance(&token, &explicit, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(got.instance_type.as_deref(), Some("t3.large"));
    assert_eq!(
        seen(ec2.client(), &launched.instance_id).await,
        running("t3.large")
    );
}

#[tokio::test]
async fn a_retry_converges_from_every_state_a_crash_leaves() {
    let ec2 = ec2().await;
    let client = ec2.client().clone();
    let stop = |id: String| {
        let client = client.clone();
        async move {
            client
                .stop_instances()
                .instance_ids(id)
                .send()
                .await
                .unwrap();
        }
    };

    // Crashed after StopInstances: stopped, old type.
    let (token, req, obs) = launch(&ec2).await;
    stop(obs.instance_id.clone()).await;
    assert_eq!(seen(&client, &obs.instance_id).await.0, "stopped");
    let got = ec2
        .resize_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(
        (got.state, got.instance_type.as_deref()),
        (InstanceState::Running, Some("t3.medium"))
    );
    assert_eq!(seen(&client, &obs.instance_id).await, running("t3.medium"));

    // Crashed after ModifyInstanceAttribute: stopped, new type; only the start is left.
    let (token, req, obs) = launch(&ec2).await;
    stop(obs.instance_id.clone()).await;
    client
        .modify_instance_attribute()
        .instance_id(&obs.instance_id)
        .instance_type(AttributeValue::builder().value("t3.medium").build())
        .send()
        .await
        .unwrap();
    let got = ec2
        .resize_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(got.state, InstanceState::Running);
    assert_eq!(seen(&client, &obs.instance_id).await, running("t3.medium"));

    // A machine of the right size stopped behind setpoint's back is started again.
    let (token, mut req, obs) = launch(&ec2).await;
    req.plan = "kvx.small".into();
    stop(obs.instance_id.clone()).await;
    let got = ec2
        .resize_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(got.state, InstanceState::Running);
    assert_eq!(seen(&client, &obs.instance_id).await, running("t3.small"));
    assert_eq!(tagged(&client, &token).await.len(), 1);
}

#[tokio::test]
async fn a_deadline_that_runs_out_returns_the_state_reached_and_the_retry_finishes() {
    let ec2 = ec2().await;
    let (token, req, obs) = launch(&ec2).await;

    // No time at all: one step (StopInstances), then it reports where the machine is.
    let first = ec2
        .resize_instance(&token, &req, Instant::now(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(first.state, InstanceState::Stopping, "{first:?}");
    assert_eq!(first.instance_type.as_deref(), Some("t3.small"));

    let second = ec2
        .resize_instance(&token, &req, Instant::now(), &Fence::unbounded())
        .await
        .unwrap();
    assert_ne!(second.state, InstanceState::Running, "{second:?}");

    let done = ec2
        .resize_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(done.state, InstanceState::Running);
    assert_eq!(done.instance_type.as_deref(), Some("t3.medium"));
    assert_eq!(
        seen(ec2.client(), &obs.instance_id).await,
        running("t3.medium")
    );
    assert_eq!(tagged(ec2.client(), &token).await.len(), 1);
}

#[tokio::test]
async fn only_the_tokens_managed_machine_is_touched_and_a_missing_one_is_permanent() {
    let ec2 = ec2().await;
    let (token, req, obs) = launch(&ec2).await;
    let (_other_token, _, other) = launch(&ec2).await;

    ec2.resize_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(
        seen(ec2.client(), &obs.instance_id).await,
        running("t3.medium")
    );
    assert_eq!(
        seen(ec2.client(), &other.instance_id).await,
        running("t3.small"),
        "another token's machine keeps its size"
    );

    // A token that launched nothing: permanent, nothing launched.
    let nobody = IdempotencyToken::generate();
    let e = refused(&ec2, &nobody, &req).await;
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert_eq!(e.code.as_deref(), Some(CODE_MACHINE_NOT_FOUND));
    assert!(tagged(ec2.client(), &nobody).await.is_empty());

    // A terminated machine is not brought back (moto would even start a terminated one).
    ec2.client()
        .terminate_instances()
        .instance_ids(&obs.instance_id)
        .send()
        .await
        .unwrap();
    let e = refused(&ec2, &token, &req).await;
    assert_eq!(e.code.as_deref(), Some(CODE_MACHINE_NOT_FOUND), "{e}");
    assert_eq!(seen(ec2.client(), &obs.instance_id).await.0, "terminated");

    // An instance carrying the token tag but not setpoint:managed=true is not setpoint's.
    let token = IdempotencyToken::generate();
    ec2.client()
        .run_instances()
        .image_id(ANY_AMI)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(setpoint_ec2::TAG_TOKEN)
                        .value(token.as_str())
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let e = refused(&ec2, &token, &req).await;
    assert_eq!(e.code.as_deref(), Some(CODE_MACHINE_NOT_FOUND), "{e}");
}
