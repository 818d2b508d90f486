//! Two regions against one moto server: each `Ec2Compute` launches into, finds, and lists only
//! its own region. moto answers every region from one server and keeps each region's state
//! apart; the region comes from the request's signature (SigV4 scope), which the client takes
//! from `Ec2Config::region`.

mod common;

use std::sync::OnceLock;

use common::*;
use setpoint_adapter::{Compute, Fence, IdempotencyToken, ListMachinesRequest};
use setpoint_ec2::Ec2Regions;

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| Moto::start(&[]))
}

#[tokio::test]
async fn each_region_launches_into_itself_from_one_configuration() {
    let url = moto().url();
    let text = format!(
        r#"
        [regions.eu-west-1]
        endpoint_url = "{url}"
        default_image_id = "{ANY_AMI}"
        max_attempts = 1
        [regions.us-west-2]
        endpoint_url = "{url}"
        default_image_id = "{ANY_AMI}"
        max_attempts = 1
        "#
    );
    let regions: Ec2Regions = toml::from_str(&text).unwrap();
    regions.validate().unwrap();
    let mut computes = Vec::new();
    for mut config in regions.into_configs() {
        // Fast polling for the test; everything else as parsed.
        config.timeouts = config_in(&config.region, &url).timeouts;
        computes.push((config.region.clone(), compute(config).await));
    }
    assert_eq!(computes.len(), 2);

    let mut launched = Vec::new();
    for (region, ec2) in &computes {
        let token = IdempotencyToken::generate();
        let req = request("acme");
        let obs = ec2
            .ensure_instance(&token, &req, deadline(), &Fence::unbounded())
            .await
            .unwrap();
        let az = obs.availability_zone.clone().unwrap();
        assert!(
            az.starts_with(region.as_str()),
            "{region}: launched in {az}"
        );
        launched.push((region.clone(), token, req.resource_id, obs.instance_id));
    }

    // Each region sees its own machine and not the other's.
    for (region, ec2) in &computes {
        for (launched_in, token, resource, id) in &launched {
            let mine = launched_in == region;
            let seen = ec2.describe_instance(token).await.unwrap();
            assert_eq!(
                seen.map(|o| o.instance_id),
                mine.then(|| id.clone()),
                "{region}"
            );
            let page = ec2
                .list_managed_machines(&ListMachinesRequest {
                    resource_id: Some(*resource),
                    ..ListMachinesRequest::default()
                })
                .await
                .unwrap();
            let ids: Vec<String> = page.machines.into_iter().map(|m| m.instance_id).collect();
            assert_eq!(
                ids,
                if mine { vec![id.clone()] } else { vec![] },
                "{region}"
            );
        }
    }
}
