//! The standard AWS credential chain (environment variables) reaches moto: the engine's path,
//! which takes no credentials from its own configuration. A binary of its own because it sets
//! environment variables, which must not race with other tests' threads.

mod common;

use common::*;
use setpoint_adapter::{Fence, IdempotencyToken};
use setpoint_route53::Route53Dns;

#[test]
fn the_default_chain_reads_credentials_from_the_environment() {
    let moto = Moto::start();
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
        let dns = Route53Dns::connect(config(&moto.url())).await.unwrap();
        let zone = unique_zone();
        let info = dns
            .ensure_zone(
                &IdempotencyToken::generate(),
                &request(&zone, vec![]),
                &Fence::unbounded(),
            )
            .await
            .unwrap();
        assert_eq!(zones_named(dns.client(), &zone).await, vec![info.id]);
    });
}
