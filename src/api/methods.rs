//! The gRPC methods this server serves, read from the same file descriptor sets that server
//! reflection serves: the one place that knows a request path is a real method. Metric labels
//! and the per-method rules of [`super::gate`] come from here, so a path a client makes up
//! never becomes a label (each new label value is a new time series, kept for the life of the
//! process) and a service added to the .proto files is known without a list to update.

use std::collections::HashMap;

use prost::Message;
use prost_types::FileDescriptorSet;

/// The metric label of every path that is not a known method.
pub const UNKNOWN_LABEL: &str = "unknown";

/// One method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    /// `/package.Service/Method`, the request path (and the metric label).
    pub path: String,
    /// The client sends a stream of messages (reflection's calls).
    pub client_streaming: bool,
    /// The server answers with a stream (WatchInstance, health's Watch).
    pub server_streaming: bool,
}

impl Method {
    /// Whether the method belongs to `grpc.health.v1` (served without a token).
    pub fn is_health(&self) -> bool {
        self.path.starts_with("/grpc.health.v1.")
    }
}

/// The methods of a set of services.
#[derive(Debug, Clone, Default)]
pub struct Methods {
    by_path: HashMap<String, Method>,
}

impl Methods {
    /// The methods of every service in the encoded file descriptor sets `sets`. A set that
    /// does not decode contributes nothing (they are compiled into the binary, so that would
    /// be a build fault; its methods then count as unknown, which is safe).
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Self {
        let mut by_path = HashMap::new();
        for set in sets {
            let Ok(set) = FileDescriptorSet::decode(*set) else {
                tracing::error!("a compiled-in file descriptor set does not decode");
                continue;
            };
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        let path = if package.is_empty() {
                            format!("/{}/{}", service.name(), method.name())
                        } else {
                            format!("/{package}.{}/{}", service.name(), method.name())
                        };
                        by_path.insert(
                            path.clone(),
                            Method {
                                path,
                                client_streaming: method.client_streaming(),
                                server_streaming: method.server_streaming(),
                            },
                        );
                    }
                }
            }
        }
        Self { by_path }
    }

    /// The method of request path `path`, if it is one.
    pub fn get(&self, path: &str) -> Option<&Method> {
        self.by_path.get(path)
    }

    /// The metric label of `path`: the path of a known method, else [`UNKNOWN_LABEL`].
    pub fn label(&self, path: &str) -> &str {
        self.get(path).map_or(UNKNOWN_LABEL, |m| m.path.as_str())
    }

    /// How many methods there are.
    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_paths_are_their_own_label_and_anything_else_is_unknown() {
        let m = Methods::from_descriptor_sets(&[
            crate::api::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            b"not a descriptor set",
        ]);
        let create = "/setpoint.v1.InstanceService/CreateInstance";
        assert_eq!(m.label(create), create);
        assert_eq!(
            m.label("/setpoint.v1.WorkService/CancelWork"),
            "/setpoint.v1.WorkService/CancelWork"
        );
        let watch = m.get("/setpoint.v1.InstanceService/WatchInstance").unwrap();
        assert!(watch.server_streaming && !watch.client_streaming);
        assert!(m.get("/grpc.health.v1.Health/Check").unwrap().is_health());
        for junk in [
            "/x",
            "/setpoint.v1.InstanceService/Nope",
            "",
            "/setpoint.v1.InstanceService/CreateInstance/",
        ] {
            assert_eq!(m.label(junk), UNKNOWN_LABEL, "{junk}");
        }
        // InstanceService (6), WorkService (4) and health (2), at least.
        assert!(m.len() >= 12, "{}", m.len());
    }
}
