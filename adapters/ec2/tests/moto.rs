//! The EC2 adapter against a real moto server (started by this test binary): no duplicate
//! instances on retries, idempotent terminate, and each error class from a real peer.
//!
//! moto does not honour `ClientToken` (the same token launches a second instance), so these
//! tests prove the tag lookup (`setpoint:token`) is what keeps retries from duplicating.

mod common;

use setpoint_adapter::Fence;
use std::sync::{Arc, OnceLock};

use common::*;
use serde_json::json;
use setpoint_adapter::{
    Compute, ErrorClass, Handler, IdempotencyToken, InstanceState, MemoryJournal, TerminateRequest,
    WorkContext, typed,
};
use setpoint_ec2::{
    EnsureInstance, TAG_MANAGED, TAG_RESOURCE, TAG_TENANT, TAG_TOKEN, TerminateInstance,
};

/// One moto for the binary, plain settings (AMIs not validated).
fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| Moto::start(&[]))
}

/// A second moto that validates AMIs and instance types, for real permanent errors.
fn strict_moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        Moto::start(&[
            ("MOTO_ENABLE_AMI_VALIDATION", "true"),
            ("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true"),
        ])
    })
}

#[tokio::test]
async fn ensure_launches_one_tagged_instance_and_a_rerun_adopts_it() {
    let ec2 = compute(config(&moto().url())).await;
    let token = IdempotencyToken::generate();
    let req = request("acme");

    let first = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert!(!first.adopted);
    assert_eq!(first.state, InstanceState::Running);
    assert!(first.private_ip.is_some() && first.availability_zone.is_some());

    let second = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert!(second.adopted);
    assert_eq!(second.instance_id, first.instance_id);
    assert_eq!(
        tagged(ec2.client(), &token).await,
        vec![(first.instance_id.clone(), "running".to_owned())]
    );

    // Tags and client token as launched.
    let out = ec2
        .client()
        .describe_instances()
        .instance_ids(&first.instance_id)
        .send()
        .await
        .unwrap();
    let instance = &out.reservations()[0].instances()[0];
    let tag = |k: &str| {
        instance
            .tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    assert_eq!(tag(TAG_TOKEN).as_deref(), Some(token.as_str()));
    assert_eq!(tag(TAG_RESOURCE), Some(req.resource_id.to_string()));
    assert_eq!(tag(TAG_TENANT).as_deref(), Some("acme"));
    assert_eq!(tag(TAG_MANAGED).as_deref(), Some("true"));
    assert_eq!(tag("Name"), Some(format!("setpoint-{}", req.resource_id)));
    assert_eq!(instance.client_token(), Some(token.as_str()));
    assert_eq!(instance.image_id(), Some(ANY_AMI));

    let seen = ec2.describe_instance(&token).await.unwrap().unwrap();
    assert_eq!(seen.instance_id, first.instance_id);
    assert!(
        ec2.describe_instance(&IdempotencyToken::generate())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_crash_right_after_run_instances_is_adopted_not_duplicated() {
    let ec2 = compute(config(&moto().url())).await;
    let token = IdempotencyToken::generate();
    let req = request("acme");

    // What an attempt that died right after RunInstances returned left behind.
    let launched = ec2
        .client()
        .run_instances()
        .image_id(ANY_AMI)
        .min_count(1)
        .max_count(1)
        .client_token(token.as_str())
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(tag(TAG_TOKEN, token.as_str()))
                .tags(tag(TAG_RESOURCE, &req.resource_id.to_string()))
                .tags(tag(TAG_TENANT, "acme"))
                .tags(tag(TAG_MANAGED, "true"))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let crashed_id = launched.instances()[0].instance_id().unwrap().to_owned();

    let retry = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert!(retry.adopted);
    assert_eq!(retry.instance_id, crashed_id);
    assert_eq!(tagged(ec2.client(), &token).await.len(), 1);
}

#[tokio::test]
async fn terminate_twice_succeeds_twice_and_terminates_once() {
    let ec2 = compute(config(&moto().url())).await;
    let token = IdempotencyToken::generate();
    let obs = ec2
        .ensure_instance(&token, &request("acme"), deadline(), &Fence::unbounded())
        .await
        .unwrap();
    let by_id = TerminateRequest {
        instance_id: Some(obs.instance_id.clone()),
        ..TerminateRequest::default()
    };
    let del = IdempotencyToken::generate();

    let first = ec2
        .terminate_instance(&del, &by_id, &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(first.terminated, vec![obs.instance_id.clone()]);
    assert!(first.already_gone.is_empty());

    let second = ec2
        .terminate_instance(&del, &by_id, &Fence::unbounded())
        .await
        .unwrap();
    assert!(second.terminated.is_empty());
    assert_eq!(second.already_gone, vec![obs.instance_id.clone()]);

    assert_eq!(
        tagged(ec2.client(), &token).await,
        vec![(obs.instance_id.clone(), "terminated".to_owned())]
    );
    // Gone for ensure's lookup too.
    assert!(ec2.describe_instance(&token).await.unwrap().is_none());

    // An id EC2 never knew is "already gone", not an error.
    let unknown = TerminateRequest {
        instance_id: Some("i-0123456789abcdef0".into()),
        ..TerminateRequest::default()
    };
    let out = ec2
        .terminate_instance(&del, &unknown, &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(out.already_gone, vec!["i-0123456789abcdef0".to_owned()]);
}

#[tokio::test]
async fn terminate_without_an_id_finds_by_launch_token_or_resource() {
    let ec2 = compute(config(&moto().url())).await;
    let del = IdempotencyToken::generate();

    let token = IdempotencyToken::generate();
    let obs = ec2
        .ensure_instance(&token, &request("acme"), deadline(), &Fence::unbounded())
        .await
        .unwrap();
    let by_token = TerminateRequest {
        launch_token: Some(token.clone()),
        ..TerminateRequest::default()
    };
    let out = ec2
        .terminate_instance(&del, &by_token, &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(out.terminated, vec![obs.instance_id.clone()]);
    let again = ec2
        .terminate_instance(&del, &by_token, &Fence::unbounded())
        .await
        .unwrap();
    assert!(again.terminated.is_empty() && again.already_gone.is_empty());
    assert_eq!(tagged(ec2.client(), &token).await[0].1, "terminated");

    let token = IdempotencyToken::generate();
    let req = request("acme");
    let obs = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    let by_resource = TerminateRequest {
        resource_id: Some(req.resource_id),
        ..TerminateRequest::default()
    };
    let out = ec2
        .terminate_instance(&del, &by_resource, &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(out.terminated, vec![obs.instance_id]);

    let e = ec2
        .terminate_instance(&del, &TerminateRequest::default(), &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
}

#[tokio::test]
async fn terminate_refuses_an_instance_setpoint_did_not_launch() {
    let ec2 = compute(config(&moto().url())).await;
    let out = ec2
        .client()
        .run_instances()
        .image_id(ANY_AMI)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let id = out.instances()[0].instance_id().unwrap().to_owned();
    let req = TerminateRequest {
        instance_id: Some(id),
        ..TerminateRequest::default()
    };
    let e = ec2
        .terminate_instance(&IdempotencyToken::generate(), &req, &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert_eq!(e.code.as_deref(), Some("ec2-unmanaged"));
}

#[tokio::test]
async fn a_token_always_launches_in_its_own_subnet() {
    let mut cfg = config(&moto().url());
    let probe = compute(cfg.clone()).await;
    let subnets = probe.client().describe_subnets().send().await.unwrap();
    let ids: Vec<String> = subnets
        .subnets()
        .iter()
        .filter_map(|s| s.subnet_id().map(str::to_owned))
        .collect();
    assert!(ids.len() >= 2, "moto's default VPC has a subnet per AZ");
    cfg.subnet_ids = ids;
    let ec2 = compute(cfg.clone()).await;
    let token = IdempotencyToken::generate();
    let expected = cfg.subnet_for(token.as_str(), None);
    let obs = ec2
        .ensure_instance(&token, &request("acme"), deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(obs.subnet_id, expected);
}

#[tokio::test]
async fn handlers_record_observed_state_and_never_duplicate() {
    let ec2 = compute(config(&moto().url())).await;
    let ensure = typed(EnsureInstance::new(ec2.clone()));
    let terminate = typed(TerminateInstance::new(ec2.clone()));
    let resource = uuid::Uuid::new_v4();
    let token = IdempotencyToken::generate();
    let ctx = |token: &IdempotencyToken, attempt| {
        WorkContext::new(
            1,
            "ec2.ensure-instance",
            token.clone(),
            attempt,
            deadline(),
            Arc::new(MemoryJournal::default()),
        )
        .with_resource(resource, Some("acme".into()))
    };
    let spec = json!({"plan": "kvx.medium", "instance_type": "t3.medium"});

    let first = ensure.handle(&ctx(&token, 1), &spec).await.unwrap();
    let observed = first.observed.unwrap();
    let id = observed["ec2_instance_id"].as_str().unwrap().to_owned();
    assert_eq!(observed["ec2_state"], "running");
    assert!(observed["private_ip"].is_string());
    assert!(observed["availability_zone"].is_string());
    assert_eq!(observed["ec2_adopted"], false);

    let second = ensure.handle(&ctx(&token, 2), &spec).await.unwrap();
    let observed = second.observed.unwrap();
    assert_eq!(observed["ec2_instance_id"], id.as_str());
    assert_eq!(observed["ec2_adopted"], true);
    assert_eq!(tagged(ec2.client(), &token).await.len(), 1);

    // Delete by resource (the spec need not know the id).
    let del = IdempotencyToken::generate();
    for _ in 0..2 {
        let out = terminate.handle(&ctx(&del, 1), &json!({})).await.unwrap();
        assert_eq!(out.observed.unwrap()["ec2_state"], "terminated");
    }
    assert_eq!(tagged(ec2.client(), &token).await[0].1, "terminated");
}

#[tokio::test]
async fn a_bad_ami_is_permanent_with_an_actionable_message() {
    let ec2 = compute(config(&strict_moto().url())).await;
    let token = IdempotencyToken::generate();
    let mut req = request("acme");
    req.image_id = Some("ami-00000000deadbeef".into());
    let e = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert_eq!(e.code.as_deref(), Some("InvalidAMIID.NotFound"));
    assert!(e.message.contains("image_id"), "{e}");
    assert!(tagged(ec2.client(), &token).await.is_empty());
}

#[tokio::test]
async fn a_bad_instance_type_is_permanent() {
    let ec2 = compute(config(&strict_moto().url())).await;
    let images = ec2.client().describe_images().send().await.unwrap();
    let ami = images.images()[0].image_id().unwrap().to_owned();
    let token = IdempotencyToken::generate();
    let mut req = request("acme");
    req.image_id = Some(ami.clone());
    req.instance_type = Some("t9.enormous".into());
    let e = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert!(
        e.code
            .as_deref()
            .unwrap()
            .starts_with("InvalidInstanceType"),
        "{e}"
    );
    assert!(e.message.contains("instance_type"), "{e}");

    // The same server launches a valid request: the failure was the type, not the setup.
    req.instance_type = Some("t3.small".into());
    ec2.ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transient() {
    let ec2 = compute(config(&format!("http://127.0.0.1:{}", free_port()))).await;
    let e = ec2
        .ensure_instance(
            &IdempotencyToken::generate(),
            &request("acme"),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert_eq!(e.code.as_deref(), Some("ec2-dispatch"), "{e}");
    assert!(
        !e.message.contains("testing"),
        "no credentials in messages: {e}"
    );
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out_transiently() {
    let mut cfg = config(&fake_endpoint(0, ""));
    cfg.timeouts.attempt_ms = 300;
    cfg.timeouts.operation_ms = 600;
    let ec2 = compute(cfg).await;
    let e = ec2
        .ensure_instance(
            &IdempotencyToken::generate(),
            &request("acme"),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert_eq!(e.code.as_deref(), Some("ec2-timeout"), "{e}");
}

#[tokio::test]
async fn real_throttling_and_server_error_responses_are_transient() {
    const THROTTLED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
        <Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error>\
        </Errors><RequestID>r-1</RequestID></Response>";
    const UNAVAILABLE: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
        <Code>Unavailable</Code><Message>The service is unavailable.</Message></Error>\
        </Errors><RequestID>r-2</RequestID></Response>";
    let ec2 = compute(config(&fake_endpoint(503, THROTTLED))).await;
    let e = ec2
        .ensure_instance(
            &IdempotencyToken::generate(),
            &request("acme"),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert_eq!(e.code.as_deref(), Some("RequestLimitExceeded"));
    assert!(e.retry_after.is_some());
    // A throttle is a wait, never a failed attempt (docs/budgets.md).
    assert!(e.throttled && e.waiting, "{e:?}");

    let ec2 = compute(config(&fake_endpoint(500, UNAVAILABLE))).await;
    let e = ec2
        .ensure_instance(
            &IdempotencyToken::generate(),
            &request("acme"),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
}

#[tokio::test]
async fn ensure_fails_transiently_while_the_peer_is_down_then_succeeds_once() {
    let port = free_port();
    let ec2 = compute(config(&format!("http://127.0.0.1:{port}"))).await;
    let token = IdempotencyToken::generate();
    let req = request("acme");

    let e = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");

    let _peer = Moto::start_on(port, &[]);
    let obs = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    let again = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(obs.instance_id, again.instance_id);
    assert_eq!(tagged(ec2.client(), &token).await.len(), 1);
}

/// What an attempt of a unit launches, tagged as setpoint tags (moto ignores the client
/// token, so every call launches).
async fn launch_tagged(
    ec2: &setpoint_ec2::Ec2Compute,
    token: &IdempotencyToken,
    req: &setpoint_adapter::InstanceRequest,
) -> String {
    let launched = ec2
        .client()
        .run_instances()
        .image_id(ANY_AMI)
        .min_count(1)
        .max_count(1)
        .client_token(token.as_str())
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(tag(TAG_TOKEN, token.as_str()))
                .tags(tag(TAG_RESOURCE, &req.resource_id.to_string()))
                .tags(tag(TAG_TENANT, &req.tenant))
                .tags(tag(TAG_MANAGED, "true"))
                .build(),
        )
        .send()
        .await
        .unwrap();
    launched.instances()[0].instance_id().unwrap().to_owned()
}

/// Live (not shutting down or terminated) ids among `tagged`.
fn live(tagged: &[(String, String)]) -> Vec<String> {
    tagged
        .iter()
        .filter(|(_, state)| !["shutting-down", "terminated"].contains(&state.as_str()))
        .map(|(id, _)| id.clone())
        .collect()
}

/// Two live machines carry one launch token: a stale attempt (past its lease) and the live
/// one both launched, which moto allows since it ignores `ClientToken`. The stale attempt
/// terminates nothing (its fence is lost); describe changes nothing; the live attempt's ensure
/// adopts the oldest, terminates the other and names only the adopted one, and a rerun
/// changes nothing more. Resize, the other fenced lookup, does the same.
#[tokio::test]
async fn two_machines_with_one_token_ensure_adopts_the_oldest_and_terminates_the_other() {
    let ec2 = compute(config(&moto().url())).await;
    let token = IdempotencyToken::generate();
    let req = request("acme");
    let first = launch_tagged(&ec2, &token, &req).await;
    // A later launch time whatever moto's clock resolution.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = launch_tagged(&ec2, &token, &req).await;
    assert_eq!(live(&tagged(ec2.client(), &token).await).len(), 2);

    let stale = Fence::unbounded();
    stale.lose("test: the lease ran out");
    let e = ec2
        .ensure_instance(&token, &req, deadline(), &stale)
        .await
        .unwrap_err();
    assert_eq!(
        e.code.as_deref(),
        Some(setpoint_adapter::CODE_LEASE_LOST),
        "{e}"
    );
    let seen = ec2.describe_instance(&token).await.unwrap().unwrap();
    assert_eq!(seen.instance_id, first, "describe names the oldest");
    assert_eq!(
        live(&tagged(ec2.client(), &token).await).len(),
        2,
        "a stale attempt and describe terminate nothing"
    );

    let obs = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert!(obs.adopted);
    assert_eq!(obs.instance_id, first, "the oldest is adopted");
    assert_eq!(obs.state, InstanceState::Running);
    let now = tagged(ec2.client(), &token).await;
    assert_eq!(live(&now), vec![first.clone()], "{now:?}");
    assert!(now.iter().any(|(id, _)| *id == second), "{now:?}");

    let again = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(again.instance_id, first);
    assert_eq!(
        live(&tagged(ec2.client(), &token).await),
        vec![first.clone()]
    );

    // Resize looks the machine up by its launch token the same way.
    let third = launch_tagged(&ec2, &token, &req).await;
    assert_eq!(live(&tagged(ec2.client(), &token).await).len(), 2);
    let resize = setpoint_adapter::ResizeRequest {
        resource_id: req.resource_id,
        plan: req.plan.clone(),
        instance_type: None,
        data_volume_gb: None,
    };
    let resized = ec2
        .resize_instance(&token, &resize, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(resized.instance_id, first);
    let now = tagged(ec2.client(), &token).await;
    assert_eq!(
        live(&now),
        vec![first.clone()],
        "{third} terminated: {now:?}"
    );
}

/// The race itself: between the live attempt's lookup by tag (nothing found) and its own
/// `RunInstances`, another launch with the same token lands (a proxy sends each
/// `RunInstances` to moto twice). The attempt looks again after its launch, keeps the one
/// machine every attempt would pick (the oldest; ties by id) and terminates the other.
#[tokio::test]
async fn a_launch_that_raced_another_with_its_token_keeps_one_machine() {
    let proxy = duplicating_proxy(&format!("127.0.0.1:{}", moto().port), "Action=RunInstances");
    let ec2 = compute(config(&proxy)).await;
    let token = IdempotencyToken::generate();
    let req = request("acme");

    let obs = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    let all = tagged(ec2.client(), &token).await;
    assert_eq!(all.len(), 2, "the proxy launched twice: {all:?}");
    assert_eq!(live(&all), vec![obs.instance_id.clone()], "{all:?}");
    assert_eq!(obs.state, InstanceState::Running);

    // The kept machine is the one a rerun (a later attempt) adopts, without launching.
    let again = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert!(again.adopted);
    assert_eq!(again.instance_id, obs.instance_id);
    assert_eq!(tagged(ec2.client(), &token).await.len(), 2);
}

fn tag(k: &str, v: &str) -> aws_sdk_ec2::types::Tag {
    aws_sdk_ec2::types::Tag::builder().key(k).value(v).build()
}
