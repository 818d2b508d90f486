//! The objects of an instance, built as server-side apply intents.
//!
//! Each builder returns the *fully specified intent* setpoint has for one object: only the
//! fields setpoint cares about, nothing the server fills in (status, defaults, cluster IPs).
//! The same spec, token and generation always build the same intent, so applying it twice is a
//! no-op. The token (a label) and the generation (annotation `setpoint.dev/generation`) are on
//! each object's metadata only — never on the pod template, so a new unit re-labelling the
//! Deployment does not restart its pods.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvFromSource, EnvVar, Namespace, PodSpec, PodTemplateSpec, Secret,
    SecretEnvSource, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use setpoint_adapter::{ClusterInstanceSpec, IdempotencyToken};

use crate::names;

/// The names and labels every object of one instance shares.
#[derive(Debug, Clone)]
pub struct InstanceIdentity {
    /// The tenant's namespace.
    pub namespace: String,
    /// The name of each object (Deployment, Service and Secret share it).
    pub name: String,
    /// The label selecting everything of the instance: `setpoint.dev/instance=<uuid>`.
    pub selector: String,
}

impl InstanceIdentity {
    /// The identity of the instance `resource_id` of `tenant`.
    pub fn new(resource_id: uuid::Uuid, tenant: &str) -> Self {
        Self {
            namespace: names::namespace_name(tenant),
            name: names::object_name(resource_id),
            selector: format!("{}={}", names::LABEL_INSTANCE, resource_id.hyphenated()),
        }
    }
}

/// What the builders need besides the spec and the token: which generation the objects are
/// recorded for. `None` records none (a spec of unknown generation over objects that carry
/// none either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(pub Option<i64>);

/// What the builders need besides the spec: the workload settings of the configuration.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The container image.
    pub image: String,
    /// The container and service port.
    pub port: u16,
}

fn owner_labels(tenant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            names::LABEL_MANAGED_BY.to_owned(),
            names::FIELD_MANAGER.to_owned(),
        ),
        (names::LABEL_TENANT.to_owned(), names::label_value(tenant)),
    ])
}

fn pod_labels(spec: &ClusterInstanceSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            names::LABEL_INSTANCE.to_owned(),
            spec.resource_id.hyphenated().to_string(),
        ),
        (names::LABEL_NAME.to_owned(), "kvx".to_owned()),
        (
            names::LABEL_MANAGED_BY.to_owned(),
            names::FIELD_MANAGER.to_owned(),
        ),
    ])
}

fn instance_meta(
    id: &InstanceIdentity,
    spec: &ClusterInstanceSpec,
    token: &IdempotencyToken,
    generation: Generation,
) -> ObjectMeta {
    let mut labels = owner_labels(&spec.tenant);
    labels.extend(pod_labels(spec));
    labels.insert(
        names::LABEL_TOKEN.to_owned(),
        names::label_value(token.as_str()),
    );
    let mut annotations = BTreeMap::from([
        (names::ANNOTATION_TENANT.to_owned(), spec.tenant.clone()),
        (
            names::ANNOTATION_TOKEN.to_owned(),
            token.as_str().to_owned(),
        ),
        (names::ANNOTATION_NAME.to_owned(), spec.name.clone()),
        (names::ANNOTATION_PLAN.to_owned(), spec.plan.clone()),
    ]);
    if let Generation(Some(g)) = generation {
        annotations.insert(names::ANNOTATION_GENERATION.to_owned(), g.to_string());
    }
    ObjectMeta {
        name: Some(id.name.clone()),
        namespace: Some(id.namespace.clone()),
        labels: Some(labels),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    }
}

/// The generation recorded on `meta` (annotation `setpoint.dev/generation`), if it holds a
/// number.
pub fn recorded_generation(meta: &ObjectMeta) -> Option<i64> {
    meta.annotations
        .as_ref()?
        .get(names::ANNOTATION_GENERATION)?
        .trim()
        .parse()
        .ok()
}

/// The tenant's namespace: labelled with the tenant only (it is shared by the tenant's
/// instances, so no instance or token label).
pub fn namespace(id: &InstanceIdentity, tenant: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(id.namespace.clone()),
            labels: Some(owner_labels(tenant)),
            annotations: Some(BTreeMap::from([(
                names::ANNOTATION_TENANT.to_owned(),
                tenant.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// The instance's credentials as an `Opaque` Secret (values base64 in `data`).
pub fn secret(
    id: &InstanceIdentity,
    spec: &ClusterInstanceSpec,
    token: &IdempotencyToken,
    generation: Generation,
) -> Secret {
    Secret {
        metadata: instance_meta(id, spec, token, generation),
        type_: Some("Opaque".to_owned()),
        data: Some(
            spec.credentials
                .0
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// A ClusterIP Service in front of the instance's pods.
pub fn service(
    id: &InstanceIdentity,
    spec: &ClusterInstanceSpec,
    token: &IdempotencyToken,
    generation: Generation,
    workload: &Workload,
) -> Service {
    Service {
        metadata: instance_meta(id, spec, token, generation),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(BTreeMap::from([(
                names::LABEL_INSTANCE.to_owned(),
                spec.resource_id.hyphenated().to_string(),
            )])),
            ports: Some(vec![ServicePort {
                name: Some("kvx".to_owned()),
                port: i32::from(workload.port),
                target_port: Some(IntOrString::String("kvx".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Deployment running the instance: its backend address and plan as environment, its
/// credentials from the Secret.
pub fn deployment(
    id: &InstanceIdentity,
    spec: &ClusterInstanceSpec,
    token: &IdempotencyToken,
    generation: Generation,
    workload: &Workload,
) -> Deployment {
    let mut env = vec![
        EnvVar {
            name: "KVX_INSTANCE_ID".to_owned(),
            value: Some(spec.resource_id.hyphenated().to_string()),
            ..EnvVar::default()
        },
        EnvVar {
            name: "KVX_PLAN".to_owned(),
            value: Some(spec.plan.clone()),
            ..EnvVar::default()
        },
    ];
    if let Some(ip) = &spec.backend.private_ip {
        env.push(EnvVar {
            name: "KVX_BACKEND_IP".to_owned(),
            value: Some(ip.clone()),
            ..EnvVar::default()
        });
    }
    if let Some(endpoint) = &spec.backend.endpoint {
        env.push(EnvVar {
            name: "KVX_BACKEND_ENDPOINT".to_owned(),
            value: Some(endpoint.clone()),
            ..EnvVar::default()
        });
    }
    Deployment {
        metadata: instance_meta(id, spec, token, generation),
        spec: Some(DeploymentSpec {
            replicas: Some(i32::try_from(spec.replicas).unwrap_or(i32::MAX)),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    names::LABEL_INSTANCE.to_owned(),
                    spec.resource_id.hyphenated().to_string(),
                )])),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(spec)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "kvx".to_owned(),
                        image: Some(workload.image.clone()),
                        ports: Some(vec![ContainerPort {
                            name: Some("kvx".to_owned()),
                            container_port: i32::from(workload.port),
                            protocol: Some("TCP".to_owned()),
                            ..ContainerPort::default()
                        }]),
                        env: Some(env),
                        env_from: Some(vec![EnvFromSource {
                            secret_ref: Some(SecretEnvSource {
                                name: id.name.clone(),
                                optional: Some(false),
                            }),
                            ..EnvFromSource::default()
                        }]),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use setpoint_adapter::{BackendAddress, SecretData};

    use super::*;

    #[test]
    fn the_generation_is_on_metadata_only_never_on_the_pod_template() {
        let spec = ClusterInstanceSpec {
            resource_id: uuid::Uuid::new_v4(),
            tenant: "acme".into(),
            name: "cache".into(),
            plan: "small".into(),
            replicas: 1,
            backend: BackendAddress::default(),
            credentials: SecretData::default(),
            generation: 7,
        };
        let id = InstanceIdentity::new(spec.resource_id, &spec.tenant);
        let token = IdempotencyToken::parse("t-1").unwrap();
        let workload = Workload {
            image: "i".into(),
            port: 1,
        };
        let g = Generation(Some(7));
        let d = deployment(&id, &spec, &token, g, &workload);
        assert_eq!(recorded_generation(&d.metadata), Some(7));
        let template = d.spec.unwrap().template.metadata.unwrap();
        assert!(template.annotations.is_none(), "{template:?}");
        assert!(
            !template
                .labels
                .unwrap_or_default()
                .keys()
                .any(|k| k == names::LABEL_TOKEN)
        );
        assert_eq!(
            recorded_generation(&secret(&id, &spec, &token, g).metadata),
            Some(7)
        );
        let none = service(&id, &spec, &token, Generation(None), &workload);
        assert_eq!(recorded_generation(&none.metadata), None);
    }
}
