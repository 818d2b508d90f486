//! `list_managed_machines` against a real moto server: live managed machines only, by
//! resource or all of them, page by page. Each test uses a region of its own (moto keeps
//! regions apart), so tests running at once do not see each other's machines.

mod common;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use common::*;
use setpoint_adapter::{
    Compute, Fence, IdempotencyToken, InstanceState, ListMachinesRequest, ManagedMachine,
    TerminateRequest,
};
use setpoint_ec2::{Ec2Compute, TAG_MANAGED, TAG_RESOURCE};
use uuid::Uuid;

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| Moto::start(&[]))
}

async fn ec2_in(region: &str) -> Ec2Compute {
    compute(config_in(region, &moto().url())).await
}

/// Launches a managed machine for `resource` with a fresh token.
async fn launch(ec2: &Ec2Compute, resource: Uuid, tenant: &str) -> (IdempotencyToken, String) {
    let token = IdempotencyToken::generate();
    let mut req = request(tenant);
    req.resource_id = resource;
    let obs = ec2
        .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
        .await
        .unwrap();
    (token, obs.instance_id)
}

/// Every page of the listing, with the number of pages it took.
async fn list_all(
    ec2: &Ec2Compute,
    resource: Option<Uuid>,
    page_size: Option<u32>,
) -> (Vec<ManagedMachine>, usize) {
    let mut req = ListMachinesRequest {
        resource_id: resource,
        page_token: None,
        page_size,
    };
    let (mut all, mut pages) = (Vec::new(), 0);
    loop {
        let page = ec2.list_managed_machines(&req).await.unwrap();
        pages += 1;
        if let Some(size) = page_size {
            // EC2's MaxResults bounds: 5 to 1000.
            let limit = size.clamp(5, 1000) as usize;
            assert!(
                page.machines.len() <= limit,
                "a page holds at most its size"
            );
        }
        all.extend(page.machines);
        match page.next_page_token {
            Some(t) => req.page_token = Some(t),
            None => return (all, pages),
        }
    }
}

fn ids(machines: &[ManagedMachine]) -> BTreeSet<String> {
    machines.iter().map(|m| m.instance_id.clone()).collect()
}

#[tokio::test]
async fn lists_live_managed_machines_with_their_tags_by_resource_or_all() {
    let ec2 = ec2_in("eu-central-1").await;
    let (resource, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut mine = BTreeSet::new();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let (token, id) = launch(&ec2, resource, "acme").await;
        mine.insert(id);
        tokens.push(token);
    }
    let (_, others_id) = launch(&ec2, other, "globex").await;

    // One of the resource's machines terminated, one stopped: the stopped one is still live.
    let (gone_token, gone_id) = launch(&ec2, resource, "acme").await;
    ec2.terminate_instance(
        &IdempotencyToken::generate(),
        &TerminateRequest {
            launch_token: Some(gone_token),
            ..TerminateRequest::default()
        },
        &Fence::unbounded(),
    )
    .await
    .unwrap();
    let stopped = mine.iter().next().unwrap().clone();
    ec2.client()
        .stop_instances()
        .instance_ids(&stopped)
        .send()
        .await
        .unwrap();
    // A machine without setpoint:managed=true (tagged with the resource all the same).
    let unmanaged = ec2
        .client()
        .run_instances()
        .image_id(ANY_AMI)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(
                    Tag::builder()
                        .key(TAG_RESOURCE)
                        .value(resource.to_string())
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let unmanaged_id = unmanaged.instances()[0].instance_id().unwrap().to_owned();

    let (by_resource, _) = list_all(&ec2, Some(resource), None).await;
    assert_eq!(ids(&by_resource), mine);
    for m in &by_resource {
        assert_eq!(m.resource_id, Some(resource));
        assert_eq!(m.tenant.as_deref(), Some("acme"));
        assert!(tokens.contains(m.launch_token.as_ref().unwrap()), "{m:?}");
        assert!(m.launch_time.is_some());
        assert!(!m.state.is_gone());
    }
    let stopped_state = by_resource
        .iter()
        .find(|m| m.instance_id == stopped)
        .unwrap()
        .state;
    assert!(
        matches!(
            stopped_state,
            InstanceState::Stopped | InstanceState::Stopping
        ),
        "{stopped_state}"
    );

    let (all, _) = list_all(&ec2, None, None).await;
    let mut expected = mine.clone();
    expected.insert(others_id.clone());
    assert_eq!(ids(&all), expected);
    assert!(!ids(&all).contains(&gone_id) && !ids(&all).contains(&unmanaged_id));
    let theirs = all.iter().find(|m| m.instance_id == others_id).unwrap();
    assert_eq!(
        (theirs.resource_id, theirs.tenant.as_deref()),
        (Some(other), Some("globex"))
    );
    // The managed tag is what the listing goes by.
    let _ = TAG_MANAGED;
}

#[tokio::test]
async fn pages_through_many_machines_with_a_small_page_size() {
    let ec2 = ec2_in("ap-southeast-2").await;
    let resource = Uuid::new_v4();
    let mut launched = BTreeSet::new();
    for i in 0..12 {
        // Two resources, so the filter has something to leave out.
        let r = if i < 11 { resource } else { Uuid::new_v4() };
        let (_, id) = launch(&ec2, r, "acme").await;
        if i < 11 {
            launched.insert(id);
        }
    }
    // 5 is EC2's smallest page: 11 machines take 3 pages, and each machine comes once.
    let (listed, pages) = list_all(&ec2, Some(resource), Some(5)).await;
    assert_eq!(listed.len(), 11, "no machine twice");
    assert_eq!(ids(&listed), launched);
    assert_eq!(pages, 3);
    // A page size below EC2's minimum is raised to it, above its maximum lowered to it.
    let (listed, pages) = list_all(&ec2, Some(resource), Some(1)).await;
    assert_eq!((listed.len(), pages), (11, 3));
    let (listed, pages) = list_all(&ec2, None, Some(5000)).await;
    assert_eq!((listed.len(), pages), (12, 1));
}
