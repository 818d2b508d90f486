//! The wording of each [`Template`]: a subject line and a plain-text body, made with plain Rust
//! string formatting.
//!
//! Values from the request are single-lined (control characters become spaces) before they go
//! into a subject, so no field can add a header or break the layout.

use setpoint_adapter::Template;

/// A rendered message: what the recipient sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The `Subject` header.
    pub subject: String,
    /// The plain-text body (lines end with `\n`; the SMTP layer makes them CRLF).
    pub body: String,
}

const FOOTER: &str = "\n-- \nThis message was sent by setpoint. Please do not reply to it.\n";

/// Renders `template`; `token` is quoted at the bottom so a person can find the unit behind the
/// message.
pub fn render(template: &Template, token: &str) -> Rendered {
    let (subject, mut body) = match template {
        Template::InstanceReady {
            instance_id,
            instance_name,
            endpoint,
        } => {
            let name = one_line(instance_name);
            let mut body = format!(
                "Hello,\n\nyour instance \"{name}\" is ready to use.\n\n  Instance:  {name}\n  \
                 Id:        {instance_id}\n"
            );
            if let Some(endpoint) = endpoint {
                body.push_str(&format!("  Endpoint:  {}\n", one_line(endpoint)));
            }
            (format!("Your instance \"{name}\" is ready"), body)
        }
        Template::InstanceDeleted {
            instance_id,
            instance_name,
        } => {
            let name = one_line(instance_name);
            let body = format!(
                "Hello,\n\nyour instance \"{name}\" has been deleted, together with everything \
                 setpoint created for it.\n\n  Instance:  {name}\n  Id:        {instance_id}\n"
            );
            (format!("Your instance \"{name}\" has been deleted"), body)
        }
        Template::WorkParked {
            instance_id,
            instance_name,
            work_id,
            kind,
            reason,
        } => {
            let what = match instance_name {
                Some(name) => format!("your instance \"{}\"", one_line(name)),
                None => "one of your resources".to_owned(),
            };
            let mut body = format!(
                "Hello,\n\nsetpoint stopped working on {what} because a step failed in a way \
                 that retrying cannot fix. An operator has to look at it; until then no change \
                 to it goes ahead.\n\n  Step:      {kind} (work unit {work_id})\n",
                kind = one_line(kind),
            );
            if let Some(id) = instance_id {
                body.push_str(&format!("  Instance:  {id}\n"));
            }
            body.push_str(&format!(
                "  Reason:    {reason}\n\nOperators: `setpoint work show {work_id}`, then retry \
                 or cancel the unit.\n",
                reason = reason.trim(),
            ));
            (format!("Action needed: work on {what} is on hold"), body)
        }
    };
    body.push_str(&format!("\nReference: {token}\n"));
    body.push_str(FOOTER);
    Rendered { subject, body }
}

/// `s` on one line: every control character (CR, LF, tab, …) becomes a space, and runs of
/// spaces are kept as they are.
fn one_line(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_say_what_happened() {
        let ready: Template = serde_json::from_value(serde_json::json!({
            "template": "instance-ready",
            "instance_id": "6f1c1b2e-8a9d-4c1e-9f5e-3a2b1c0d9e8f",
            "instance_name": "db-1",
            "endpoint": "10.0.0.7:5432",
        }))
        .unwrap();
        let r = render(&ready, "tok-1");
        assert_eq!(r.subject, "Your instance \"db-1\" is ready");
        assert!(r.body.contains("10.0.0.7:5432"));
        assert!(r.body.contains("Reference: tok-1"));

        let parked: Template = serde_json::from_value(serde_json::json!({
            "template": "work-parked",
            "instance_name": "db-1\r\nBcc: evil@example.com",
            "work_id": 42,
            "kind": "ec2.ensure-instance",
            "reason": "AMI ami-1 does not exist",
        }))
        .unwrap();
        let r = render(&parked, "tok-2");
        assert!(!r.subject.contains('\n') && !r.subject.contains('\r'));
        assert!(r.subject.starts_with("Action needed"));
        assert!(r.body.contains("setpoint work show 42"));
    }
}
