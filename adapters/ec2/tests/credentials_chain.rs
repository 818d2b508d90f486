//! The standard AWS credential chain (environment variables) reaches moto: the engine's path,
//! which takes no credentials from its own configuration. A binary of its own because it sets
//! environment variables, which must not race with other tests' threads.

mod common;

use common::*;
use setpoint_adapter::Fence;
use setpoint_adapter::{Compute, IdempotencyToken};
use setpoint_ec2::Ec2Compute;

#[test]
fn the_default_chain_reads_credentials_from_the_environment() {
    let moto = Moto::start(&[]);
    // SAFETY: this binary has one test and sets the variables before any other thread
    // (the tokio runtime below, the SDK) exists.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ec2 = Ec2Compute::connect(config(&moto.url())).await.unwrap();
        let token = IdempotencyToken::generate();
        let obs = ec2
            .ensure_instance(&token, &request("acme"), deadline(), &Fence::unbounded())
            .await
            .unwrap();
        assert_eq!(tagged(ec2.client(), &token).await.len(), 1);
        assert!(obs.instance_id.starts_with("i-"));
    });
}
