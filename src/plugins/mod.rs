//! The plugins that come with setpoint, each behind a Cargo feature (all on by default):
//!
//! | plugin       | feature      | provides / registers                                        |
//! |--------------|--------------|-------------------------------------------------------------|
//! | `ec2`        | `ec2`        | a compute per served region (`[ec2]`); the orphan sweep (`[orphans]`) |
//! | `kubernetes` | `kubernetes` | a cluster (`[kubernetes]`)                                  |
//! | `email`      | `email`      | a mailer (`[smtp]`)                                         |
//! | `kvx`        | (always)     | the `kvx.instance` kind over a compute, a cluster, a mailer |
//! | `dns`        | `dns`        | the `dns.zone` kind on Route 53 (`[plugins.dns]`)           |
//!
//! A plugin whose table and variables are absent is not configured and registers nothing; the
//! KVX kind is declared only when a compute, a cluster and a mailer are all there.

#[cfg(feature = "dns")]
pub mod dns;
#[cfg(feature = "ec2")]
pub mod ec2;
#[cfg(feature = "email")]
pub mod email;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod kvx;
pub mod orphans;

use setpoint_adapter::ResourceKind;

use crate::plugin::Plugin;

/// The kinds the built-in plugins declare, without configuring them: for tools that only
/// need the declarations (an operator's `work retry`, which says on the resource how it went).
#[allow(unused_mut)] // mutated only with the dns feature
pub fn builtin_kinds() -> Vec<ResourceKind> {
    let mut kinds = vec![kvx::kind()];
    #[cfg(feature = "dns")]
    kinds.push(dns::kind());
    kinds
}

/// The plugins compiled into this build, in the order they must be set up (providers first),
/// with the KVX kind's settings.
#[allow(clippy::vec_init_then_push)] // each push is behind its own feature
pub fn builtin(kvx: kvx::KvxConfig) -> Vec<Box<dyn Plugin>> {
    let mut plugins: Vec<Box<dyn Plugin>> = Vec::new();
    #[cfg(feature = "ec2")]
    plugins.push(Box::new(ec2::Ec2Plugin::new()));
    #[cfg(feature = "kubernetes")]
    plugins.push(Box::new(kubernetes::KubernetesPlugin::new()));
    #[cfg(feature = "email")]
    plugins.push(Box::new(email::EmailPlugin::new()));
    plugins.push(Box::new(kvx::KvxPlugin::new(kvx)));
    #[cfg(feature = "dns")]
    plugins.push(Box::new(dns::DnsPlugin::new()));
    plugins
}
