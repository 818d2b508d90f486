//! Basic validation of stored objects: what the real API server answers with 422 Invalid.
//!
//! Covers what an adapter bug would most likely produce: bad names, bad labels, bad Secret
//! keys, Services without ports, Deployments whose selector does not match their pod template
//! (or changes after creation), containers without a name or an image.

use serde_json::Value;

/// One reason an object is invalid: the field (as the API renders it) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `FieldValueInvalid`, `FieldValueRequired`, …
    pub reason: &'static str,
    /// E.g. `metadata.labels`.
    pub field: String,
    /// E.g. `Invalid value: "A B": a valid label must be …`.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Violation {
    Violation {
        reason: "FieldValueInvalid",
        field: field.into(),
        message: message.into(),
    }
}

fn required(field: impl Into<String>) -> Violation {
    Violation {
        reason: "FieldValueRequired",
        field: field.into(),
        message: "Required value".to_owned(),
    }
}

/// A DNS-1123 label: lower-case alphanumerics and '-', alphanumeric at both ends, ≤ 63.
pub fn dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A DNS-1123 subdomain: dot-separated labels, ≤ 253.
pub fn dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns1123_label)
}

fn label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn label_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => dns1123_subdomain(prefix) && label_name(name),
        None => label_name(k),
    }
}

fn label_value(v: &str) -> bool {
    v.is_empty() || label_name(v)
}

/// Validates `obj` of `kind` (`Deployment`, `Service`, …); `old` is the stored object on an
/// update. Returns every violation found (empty when valid).
pub fn validate(kind: &str, obj: &Value, old: Option<&Value>) -> Vec<Violation> {
    let mut out = Vec::new();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let name_ok = match kind {
        "Namespace" | "Service" => dns1123_label(name),
        _ => dns1123_subdomain(name),
    };
    if !name_ok {
        out.push(invalid(
            "metadata.name",
            format!("Invalid value: {name:?}: a lowercase RFC 1123 name must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"),
        ));
    }
    labels(&obj["metadata"]["labels"], "metadata.labels", &mut out);
    match kind {
        "Secret" => {
            if let Some(data) = obj["data"].as_object() {
                for (k, v) in data {
                    let key_ok = !k.is_empty()
                        && k.len() <= 253
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                    if !key_ok {
                        out.push(invalid(
                            format!("data[{k}]"),
                            format!("Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"),
                        ));
                    }
                    if !v.is_string() {
                        out.push(invalid(format!("data[{k}]"), "must be a base64 string"));
                    }
                }
            }
        }
        "Service" => {
            let external = obj["spec"]["type"].as_str() == Some("ExternalName");
            match obj["spec"]["ports"].as_array() {
                Some(ports) if !ports.is_empty() => {
                    for (i, port) in ports.iter().enumerate() {
                        let n = port["port"].as_i64().unwrap_or(0);
                        if !(1..=65535).contains(&n) {
                            out.push(invalid(
                                format!("spec.ports[{i}].port"),
                                format!(
                                    "Invalid value: {n}: must be between 1 and 65535, inclusive"
                                ),
                            ));
                        }
                    }
                }
                _ if external => {}
                _ => out.push(required("spec.ports")),
            }
        }
        "Deployment" | "StatefulSet" => workload(obj, old, &mut out),
        _ => {}
    }
    out
}

fn labels(labels: &Value, field: &str, out: &mut Vec<Violation>) {
    let Some(map) = labels.as_object() else {
        return;
    };
    for (k, v) in map {
        if !label_key(k) {
            out.push(invalid(
                field,
                format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"),
            ));
        }
        let value_ok = v.as_str().is_some_and(label_value);
        if !value_ok {
            out.push(invalid(
                field,
                format!("Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"),
            ));
        }
    }
}

fn workload(obj: &Value, old: Option<&Value>, out: &mut Vec<Violation>) {
    let spec = &obj["spec"];
    if let Some(r) = spec["replicas"].as_i64()
        && r < 0
    {
        out.push(invalid(
            "spec.replicas",
            format!("Invalid value: {r}: must be greater than or equal to 0"),
        ));
    }
    let selector = &spec["selector"]["matchLabels"];
    let template_labels = &spec["template"]["metadata"]["labels"];
    match selector.as_object() {
        None => out.push(required("spec.selector")),
        Some(sel) if sel.is_empty() => out.push(invalid(
            "spec.selector",
            "Invalid value: {}: empty selector is invalid for deployment",
        )),
        Some(sel) => {
            let matches = sel.iter().all(|(k, v)| template_labels.get(k) == Some(v));
            if !matches {
                out.push(invalid(
                    "spec.template.metadata.labels",
                    format!("Invalid value: {template_labels}: `selector` does not match template `labels`"),
                ));
            }
        }
    }
    labels(template_labels, "spec.template.metadata.labels", out);
    if let Some(old) = old
        && old["spec"]["selector"] != spec["selector"]
    {
        out.push(invalid(
            "spec.selector",
            format!("Invalid value: {}: field is immutable", spec["selector"]),
        ));
    }
    match spec["template"]["spec"]["containers"].as_array() {
        Some(cs) if !cs.is_empty() => {
            for (i, c) in cs.iter().enumerate() {
                match c["name"].as_str() {
                    Some(n) if dns1123_label(n) => {}
                    Some(n) => out.push(invalid(
                        format!("spec.template.spec.containers[{i}].name"),
                        format!("Invalid value: {n:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"),
                    )),
                    None => out.push(required(format!(
                        "spec.template.spec.containers[{i}].name"
                    ))),
                }
                if c["image"].as_str().is_none_or(str::is_empty) {
                    out.push(required(format!(
                        "spec.template.spec.containers[{i}].image"
                    )));
                }
            }
        }
        _ => out.push(required("spec.template.spec.containers")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment(selector: Value, labels: Value) -> Value {
        json!({
            "metadata": {"name": "d"},
            "spec": {"selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}},
        })
    }

    #[test]
    fn accepts_a_good_deployment_and_rejects_a_mismatched_selector() {
        assert!(
            validate(
                "Deployment",
                &deployment(json!({"a": "1"}), json!({"a": "1"})),
                None
            )
            .is_empty()
        );
        let v = validate(
            "Deployment",
            &deployment(json!({"a": "1"}), json!({"a": "2"})),
            None,
        );
        assert_eq!(v[0].field, "spec.template.metadata.labels");
        let old = deployment(json!({"b": "1"}), json!({"b": "1"}));
        let v = validate(
            "Deployment",
            &deployment(json!({"a": "1"}), json!({"a": "1"})),
            Some(&old),
        );
        assert_eq!(v[0].field, "spec.selector");
    }

    #[test]
    fn rejects_bad_names_labels_and_secret_keys() {
        let v = validate(
            "Service",
            &json!({"metadata": {"name": "Bad_Name"}, "spec": {"ports": [{"port": 80}]}}),
            None,
        );
        assert_eq!(v[0].field, "metadata.name");
        let v = validate(
            "Secret",
            &json!({"metadata": {"name": "s", "labels": {"a": "-x"}}, "data": {"a b": "eA=="}}),
            None,
        );
        assert_eq!(v.len(), 2, "{v:?}");
        let v = validate(
            "Service",
            &json!({"metadata": {"name": "s"}, "spec": {}}),
            None,
        );
        assert_eq!(v[0].field, "spec.ports");
    }
}
