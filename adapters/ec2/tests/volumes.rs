//! The data volume against a real moto server (started by this test binary): made with the
//! launch (size, encrypted, deleted with the instance, tagged like it), grown by a resize and
//! never shrunk, gone after terminate.
//!
//! moto (5.2) applies `ModifyVolume` at once and has no limit on modifications, so EBS's
//! 6-hour rule is unit-tested on the error codes (`classify.rs`); moto also defaults
//! `DeleteOnTermination` to false where AWS defaults it to true, which is why the adapter sets
//! it explicitly and these tests check it.

mod common;

use std::sync::OnceLock;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, Volume, VolumeType};
use common::*;
use setpoint_adapter::{
    CODE_VOLUME_SHRINK, Compute, ErrorClass, Fence, IdempotencyToken, InstanceObservation,
    InstanceState, ResizeRequest, TerminateRequest,
};
use setpoint_ec2::{
    CODE_NO_DATA_VOLUME, Ec2Compute, TAG_MANAGED, TAG_RESOURCE, TAG_TENANT, TAG_TOKEN,
};

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| Moto::start(&[]))
}

async fn ec2() -> Ec2Compute {
    compute(config(&moto().url())).await
}

/// Launches a machine with a `gb` GiB data volume (or none) and a fresh token.
async fn launch(
    ec2: &Ec2Compute,
    gb: Option<u32>,
) -> (
    IdempotencyToken,
    setpoint_adapter::InstanceRequest,
    InstanceObservation,
) {
    let token = IdempotencyToken::generate();
    let mut req = request("acme");
    req.data_volume_gb = gb;
    let obs = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(obs.state, InstanceState::Running);
    (token, req, obs)
}

/// The volume `id` as moto reports it, if it still exists.
async fn volume(client: &Client, id: &str) -> Option<Volume> {
    let out = client
        .describe_volumes()
        .filters(Filter::builder().name("volume-id").values(id).build())
        .send()
        .await
        .unwrap();
    out.volumes().first().cloned()
}

fn resize_to(req: &setpoint_adapter::InstanceRequest, gb: Option<u32>) -> ResizeRequest {
    ResizeRequest {
        resource_id: req.resource_id,
        plan: req.plan.clone(),
        instance_type: None,
        data_volume_gb: gb,
    }
}

async fn modifications(client: &Client, volume_id: &str) -> usize {
    client
        .describe_volumes_modifications()
        .filters(
            Filter::builder()
                .name("volume-id")
                .values(volume_id)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .volumes_modifications()
        .len()
}

#[tokio::test]
async fn a_launch_makes_an_encrypted_tagged_data_volume_deleted_with_the_instance() {
    let ec2 = ec2().await;
    let (token, req, obs) = launch(&ec2, Some(24)).await;
    let data = obs
        .data_volume
        .clone()
        .expect("the observation has the data volume");
    assert_eq!(data.size_gb, 24);
    assert_eq!(data.modification, None, "never modified");

    let v = volume(ec2.client(), &data.volume_id).await.unwrap();
    assert_eq!(v.size(), Some(24));
    assert_eq!(v.encrypted(), Some(true));
    assert_eq!(v.volume_type(), Some(&VolumeType::Gp3));
    let attachment = &v.attachments()[0];
    assert_eq!(attachment.instance_id(), Some(obs.instance_id.as_str()));
    assert_eq!(attachment.device(), Some("/dev/sdf"));
    // moto leaves DeleteOnTermination out of DescribeVolumes' attachments; the instance's block
    // device mapping below carries it, and the terminate at the end proves it.
    let tag = |k: &str| {
        v.tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    assert_eq!(tag(TAG_TOKEN).as_deref(), Some(token.as_str()));
    assert_eq!(tag(TAG_RESOURCE), Some(req.resource_id.to_string()));
    assert_eq!(tag(TAG_TENANT).as_deref(), Some("acme"));
    assert_eq!(tag(TAG_MANAGED).as_deref(), Some("true"));

    // The instance's own mapping says the same; describe and a rerun report the volume too.
    let out = ec2
        .client()
        .describe_instances()
        .instance_ids(&obs.instance_id)
        .send()
        .await
        .unwrap();
    let mapping = out.reservations()[0].instances()[0]
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some("/dev/sdf"))
        .cloned()
        .unwrap();
    assert_eq!(mapping.ebs().unwrap().delete_on_termination(), Some(true));
    let seen = ec2.describe_instance(&token).await.unwrap().unwrap();
    assert_eq!(seen.data_volume, Some(data.clone()));
    let again = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    assert!(again.adopted);
    assert_eq!(again.data_volume, Some(data.clone()));

    // Terminate: the volume goes with the instance.
    let out = ec2
        .terminate_instance(
            &IdempotencyToken::generate(),
            &TerminateRequest {
                instance_id: Some(obs.instance_id.clone()),
                ..TerminateRequest::default()
            },
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(out.terminated, vec![obs.instance_id.clone()]);
    assert!(
        volume(ec2.client(), &data.volume_id).await.is_none(),
        "no volume left behind"
    );
}

#[tokio::test]
async fn a_resize_grows_the_volume_once_and_never_shrinks_it() {
    let ec2 = ec2().await;
    let (token, req, obs) = launch(&ec2, Some(10)).await;
    let volume_id = obs.data_volume.as_ref().unwrap().volume_id.clone();

    let grown = ec2
        .resize_instance(
            &token,
            &resize_to(&req, Some(30)),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(grown.state, InstanceState::Running);
    let data = grown.data_volume.clone().unwrap();
    assert_eq!(data.volume_id, volume_id);
    assert_eq!(data.effective_size_gb(), 30);
    assert_eq!(data.modification.as_ref().unwrap().target_size_gb, Some(30));
    assert_eq!(
        volume(ec2.client(), &volume_id).await.unwrap().size(),
        Some(30)
    );
    assert_eq!(modifications(ec2.client(), &volume_id).await, 1);

    // The same size again: observed, nothing sent.
    let same = ec2
        .resize_instance(
            &token,
            &resize_to(&req, Some(30)),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(same.data_volume.unwrap().size_gb, 30);
    assert_eq!(modifications(ec2.client(), &volume_id).await, 1);

    // Smaller: refused before anything changes (the instance keeps running, same type).
    let e = ec2
        .resize_instance(
            &token,
            &resize_to(&req, Some(20)),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert_eq!(e.code.as_deref(), Some(CODE_VOLUME_SHRINK));
    assert!(
        e.message.contains("30 GiB") && e.message.contains("20 GiB"),
        "{e}"
    );
    assert_eq!(
        volume(ec2.client(), &volume_id).await.unwrap().size(),
        Some(30)
    );
    assert_eq!(modifications(ec2.client(), &volume_id).await, 1);
    let seen = ec2.describe_instance(&token).await.unwrap().unwrap();
    assert_eq!(seen.state, InstanceState::Running);

    // No size in the request: the volume is left alone.
    let untouched = ec2
        .resize_instance(
            &token,
            &resize_to(&req, None),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(untouched.data_volume.unwrap().size_gb, 30);
    assert_eq!(modifications(ec2.client(), &volume_id).await, 1);

    // A lost fence stops the grow before ModifyVolume.
    let fence = Fence::unbounded();
    fence.lose("test: the lease was lost");
    let e = ec2
        .resize_instance(&token, &resize_to(&req, Some(50)), deadline(), &fence)
        .await
        .unwrap_err();
    assert_eq!(
        e.code.as_deref(),
        Some(setpoint_adapter::CODE_LEASE_LOST),
        "{e}"
    );
    assert_eq!(modifications(ec2.client(), &volume_id).await, 1);
}

#[tokio::test]
async fn a_machine_without_a_data_volume_cannot_grow_one() {
    let ec2 = ec2().await;
    let (token, req, obs) = launch(&ec2, None).await;
    assert_eq!(obs.data_volume, None);
    let e = ec2
        .resize_instance(
            &token,
            &resize_to(&req, Some(10)),
            deadline(),
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert_eq!(e.code.as_deref(), Some(CODE_NO_DATA_VOLUME));
    assert!(e.message.contains("/dev/sdf"), "{e}");
}

#[tokio::test]
async fn the_data_volume_settings_come_from_the_config() {
    let mut cfg = config(&moto().url());
    cfg.data_volume.device_name = "/dev/sdh".into();
    cfg.data_volume.volume_type = "gp2".into();
    cfg.data_volume.encrypted = false;
    let ec2 = compute(cfg).await;
    let (_, _, obs) = launch(&ec2, Some(8)).await;
    let v = volume(ec2.client(), &obs.data_volume.unwrap().volume_id)
        .await
        .unwrap();
    assert_eq!(v.encrypted(), Some(false));
    assert_eq!(v.volume_type(), Some(&VolumeType::Gp2));
    assert_eq!(v.attachments()[0].device(), Some("/dev/sdh"));
}

#[tokio::test]
async fn a_batched_describe_answers_each_token_as_a_describe_of_its_own() {
    let ec2 = ec2().await;
    let (plain, _, _) = launch(&ec2, Some(10)).await;
    let (grown, req, _) = launch(&ec2, Some(10)).await;
    ec2.resize_instance(
        &grown,
        &resize_to(&req, Some(20)),
        deadline(),
        &Fence::unbounded(),
    )
    .await
    .unwrap();
    let (bare, _, _) = launch(&ec2, None).await;
    let (gone, gone_req, gone_obs) = launch(&ec2, Some(5)).await;
    ec2.terminate_instance(
        &gone,
        &TerminateRequest {
            instance_id: Some(gone_obs.instance_id.clone()),
            resource_id: Some(gone_req.resource_id),
            launch_token: Some(gone.clone()),
        },
        &Fence::unbounded(),
    )
    .await
    .unwrap();
    let unknown = IdempotencyToken::generate();

    // Twice the same token, and more tokens than one filter takes, in any order.
    let mut tokens = vec![
        grown.clone(),
        unknown.clone(),
        plain.clone(),
        bare.clone(),
        gone.clone(),
        grown.clone(),
    ];
    tokens.extend((0..250).map(|_| IdempotencyToken::generate()));
    let batch = ec2.describe_instances(&tokens).await.unwrap();
    assert_eq!(batch.len(), tokens.len());
    for (token, seen) in tokens.iter().zip(&batch).take(6) {
        assert_eq!(
            seen,
            &ec2.describe_instance(token).await.unwrap(),
            "{token}"
        );
    }
    assert_eq!(
        batch[0]
            .as_ref()
            .unwrap()
            .data_volume
            .as_ref()
            .unwrap()
            .effective_size_gb(),
        20
    );
    assert!(batch[2].as_ref().unwrap().data_volume.is_some());
    assert!(batch[3].as_ref().unwrap().data_volume.is_none());
    assert!(batch[1].is_none() && batch[4].is_none());
    assert!(batch[6..].iter().all(Option::is_none));
}
