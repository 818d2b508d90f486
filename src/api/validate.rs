//! Input rules of the API. Each check adds [`Violation`]s instead of failing at the first, so a
//! client learns every problem of a request at once; a request with any violation is refused
//! with `INVALID_ARGUMENT` before anything is written.

use super::auth::Caller;
use super::errors::{ApiError, Violation};
use super::proto::InstanceSpec;

/// The plans an instance may have.
pub const PLANS: &[&str] = &["kvx.small", "kvx.medium", "kvx.large"];
/// The regions an instance may live in.
pub const REGIONS: &[&str] = &[
    "eu-west-1",
    "eu-central-1",
    "us-east-1",
    "us-west-2",
    "ap-southeast-1",
];
/// Smallest and largest storage size (GiB).
pub const SIZE_GB: std::ops::RangeInclusive<i32> = 1..=16384;
/// Largest page.
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Longest request id.
pub const MAX_REQUEST_ID: usize = 128;
/// Most paths in an update mask (there are four fields to name; repeats are allowed).
pub const MAX_MASK_PATHS: usize = 10;
/// Longest path of an update mask (characters).
pub const MAX_MASK_PATH_CHARS: usize = 64;
/// Longest work kind in a filter (characters).
pub const MAX_KIND_CHARS: usize = 128;
/// Longest reason of an operator's cancel (characters).
pub const MAX_REASON_CHARS: usize = 1000;

/// Checks a free-text field: at most `max_chars` characters (Unicode scalar values, as the
/// proto documents limits), none of them a control character (NUL, line breaks, escapes:
/// PostgreSQL refuses NUL in text, and the others have no place in a name, a filter or a
/// one-line note). Returns whether it passed.
pub fn text(field: &str, s: &str, max_chars: usize, out: &mut Vec<Violation>) -> bool {
    if s.chars().nth(max_chars).is_some() {
        out.push(Violation::new(
            field,
            format!("at most {max_chars} characters"),
        ));
        return false;
    }
    if s.chars().any(char::is_control) {
        out.push(Violation::new(
            field,
            "must not contain control characters (NUL, line breaks, tabs, escapes)",
        ));
        return false;
    }
    true
}

pub use crate::names::is_dns_label;

/// Checks a DNS-label-like name.
pub fn dns_label(field: &str, s: &str, out: &mut Vec<Violation>) {
    if !is_dns_label(s) {
        out.push(Violation::new(
            field,
            "must be 1 to 63 lower-case letters, digits or '-', start with a letter and not end \
             with '-'",
        ));
    }
}

/// True for a plausible e-mail address (`local@domain.tld`, at most 254 characters).
pub fn is_email(s: &str) -> bool {
    if s.chars().nth(254).is_some() {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    local_ok && domain_ok
}

/// Which spec fields a request sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecFields {
    /// `plan`.
    pub plan: bool,
    /// `region`.
    pub region: bool,
    /// `size_gb`.
    pub size_gb: bool,
    /// `owner_email`.
    pub owner_email: bool,
}

impl SpecFields {
    /// Every field.
    pub const ALL: SpecFields = SpecFields {
        plan: true,
        region: true,
        size_gb: true,
        owner_email: true,
    };
}

/// Checks the fields of `spec` named by `which`, as `{prefix}.plan` etc. The string fields not
/// named (an update mask leaves them out) are only checked as text: they are not used, but
/// a request with control characters anywhere is refused all the same.
pub fn spec(prefix: &str, spec: &InstanceSpec, which: SpecFields, out: &mut Vec<Violation>) {
    for (named, field, value) in [
        (which.plan, "plan", &spec.plan),
        (which.region, "region", &spec.region),
        (which.owner_email, "owner_email", &spec.owner_email),
    ] {
        if !named {
            text(&format!("{prefix}.{field}"), value, 254, out);
        }
    }
    if which.plan && !PLANS.contains(&spec.plan.as_str()) {
        out.push(Violation::new(
            format!("{prefix}.plan"),
            format!("must be one of {}", PLANS.join(", ")),
        ));
    }
    if which.region && !REGIONS.contains(&spec.region.as_str()) {
        out.push(Violation::new(
            format!("{prefix}.region"),
            format!("must be one of {}", REGIONS.join(", ")),
        ));
    }
    if which.size_gb && !SIZE_GB.contains(&spec.size_gb) {
        out.push(Violation::new(
            format!("{prefix}.size_gb"),
            format!(
                "must be between {} and {} (GiB)",
                SIZE_GB.start(),
                SIZE_GB.end()
            ),
        ));
    }
    if which.owner_email && !is_email(&spec.owner_email) {
        out.push(Violation::new(
            format!("{prefix}.owner_email"),
            "must be an e-mail address such as ops@example.com (at most 254 characters)",
        ));
    }
}

/// Checks a client request id (required on mutating calls).
pub fn request_id(id: &str, out: &mut Vec<Violation>) {
    let ok = !id.is_empty()
        && id.chars().nth(MAX_REQUEST_ID).is_none()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    if !ok {
        out.push(Violation::new(
            "request_id",
            "required: 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-' (a UUID is \
             best); repeat it only to retry the same request",
        ));
    }
}

/// Checks a page size and returns the effective one (`default` for 0).
pub fn page_size(n: i32, default: i32, out: &mut Vec<Violation>) -> i64 {
    if !(0..=MAX_PAGE_SIZE).contains(&n) {
        out.push(Violation::new(
            "page_size",
            format!("must be between 0 and {MAX_PAGE_SIZE} (0 means {default})"),
        ));
        return i64::from(default);
    }
    i64::from(if n == 0 { default } else { n })
}

/// The parent of a listing of every tenant's resources: admins only (`tenants/-` keeps
/// meaning the caller's own tenant, for admins too).
pub const ALL_TENANTS: &str = "tenants/*";

/// What a call does with the tenant a `parent` or a name names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads it (Get, List, Watch, history): an admin may name any tenant.
    Read,
    /// Changes it, or reads its secrets: only the caller's own tenant, admins included.
    Change,
}

/// The tenants a listing covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenants {
    /// One tenant's resources.
    One(String),
    /// Every tenant's ([`ALL_TENANTS`], admins only).
    All,
}

impl Tenants {
    /// The parent naming these tenants (`tenants/acme`, `tenants/*`).
    pub fn parent(&self) -> String {
        match self {
            Tenants::One(t) => format!("tenants/{t}"),
            Tenants::All => ALL_TENANTS.to_owned(),
        }
    }
}

/// The tenant a name's tenant segment `named` (a DNS label or `-`) stands for, for `caller`
/// doing `access`; `full` is the name as given, for the error. Another tenant is `NOT_FOUND`
/// for a tenant's token (it learns nothing about tenants that are not its own); an admin may
/// read any tenant's, and is told plainly that it changes only its own.
fn tenant_of(named: &str, full: &str, caller: &Caller, access: Access) -> Result<String, ApiError> {
    if named == "-" || named == caller.tenant {
        return Ok(caller.tenant.clone());
    }
    if !caller.admin {
        return Err(ApiError::NotFound(full.to_owned()));
    }
    match access {
        Access::Read => Ok(named.to_owned()),
        Access::Change => Err(ApiError::PermissionDenied(
            "an admin token reads every tenant's resources but changes only its own tenant's \
             (and reads only its own connection details); use a token of that tenant",
        )),
    }
}

/// Checks `parent` (`tenants/{tenant}`; empty or `tenants/-` for the caller's own; for an
/// admin reading, any tenant, or [`ALL_TENANTS`] for every tenant) and returns the tenants it
/// covers. Another tenant is `NOT_FOUND` for a tenant's token; `tenants/*` is
/// `PERMISSION_DENIED` for it.
pub fn parent(
    parent: &str,
    caller: &Caller,
    access: Access,
    out: &mut Vec<Violation>,
) -> Result<Tenants, ApiError> {
    let own = Tenants::One(caller.tenant.clone());
    if parent.is_empty() {
        return Ok(own);
    }
    match parent.strip_prefix("tenants/") {
        Some("*") if access == Access::Read => {
            if caller.admin {
                Ok(Tenants::All)
            } else {
                Err(ApiError::PermissionDenied(
                    "tenants/* lists every tenant's resources and needs an admin token \
                     (tenants/- or an empty parent is your own tenant)",
                ))
            }
        }
        Some(t) if t == "-" || is_dns_label(t) => {
            tenant_of(t, parent, caller, access).map(Tenants::One)
        }
        _ => {
            out.push(Violation::new(
                "parent",
                match access {
                    Access::Read => {
                        "must be tenants/{tenant} (tenants/- or empty for the caller's tenant; \
                         tenants/* for every tenant, admins only)"
                    }
                    Access::Change => {
                        "must be tenants/{tenant} (tenants/- or empty for the caller's tenant)"
                    }
                },
            ));
            Ok(own)
        }
    }
}

/// Parses `tenants/{tenant}/instances/{instance}` of field `field` (`tenants/-/…` means the
/// caller's tenant). Returns the instance's tenant and short name, or `None` after recording
/// a violation. Another tenant is `NOT_FOUND` for a tenant's token; an admin may name any
/// tenant's instance to read it ([`Access::Read`]).
pub fn instance_name(
    field: &str,
    name: &str,
    caller: &Caller,
    access: Access,
    out: &mut Vec<Violation>,
) -> Result<Option<(String, String)>, ApiError> {
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        ["tenants", t, "instances", n] if (*t == "-" || is_dns_label(t)) && is_dns_label(n) => {
            let tenant = tenant_of(t, name, caller, access)?;
            Ok(Some((tenant, (*n).to_owned())))
        }
        _ => {
            out.push(Violation::new(
                field,
                "must be tenants/{tenant}/instances/{instance}, both DNS labels",
            ));
            Ok(None)
        }
    }
}

/// The tenant segment of a resource name, checked for `caller` doing `access` (see
/// [`instance_name`]); `full` is the whole name, for the error.
///
/// # Errors
/// `NOT_FOUND` (a tenant naming another), `PERMISSION_DENIED` (an admin changing another's).
pub fn name_tenant(
    named: &str,
    full: &str,
    caller: &Caller,
    access: Access,
) -> Result<String, ApiError> {
    tenant_of(named, full, caller, access)
}

/// `Err(Invalid)` when `out` holds violations.
pub fn finish(out: Vec<Violation>) -> Result<(), ApiError> {
    if out.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_emails() {
        assert!(is_dns_label("web-1"));
        assert!(!is_dns_label("1web"));
        assert!(!is_dns_label("web-"));
        assert!(!is_dns_label("Web"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_email("ops@example.com"));
        assert!(is_email("a.b+c@mail.example.co"));
        assert!(!is_email("ops@example"));
        assert!(!is_email("ops.example.com"));
        assert!(!is_email("a@@example.com"));
        assert!(!is_email(&format!("{}@example.com", "a".repeat(250))));
    }

    #[test]
    fn text_counts_characters_and_refuses_control_characters() {
        let mut v = Vec::new();
        assert!(text("kind", &"é".repeat(128), 128, &mut v));
        assert!(text("kind", "", 128, &mut v));
        assert!(v.is_empty(), "{v:?}");
        assert!(!text("kind", &"é".repeat(129), 128, &mut v));
        for bad in ["a\0b", "\n", "tab\there", "\u{1b}[31m", "\u{7f}", "\u{85}"] {
            assert!(!text("reason", bad, 1000, &mut v), "{bad:?}");
        }
        assert_eq!(v.len(), 7);
        assert!(v.iter().skip(1).all(|x| x.description.contains("control")));
    }

    #[test]
    fn parents_name_the_callers_tenant() {
        let acme = caller("acme", false);
        let mut v = Vec::new();
        for own in ["", "tenants/acme", "tenants/-"] {
            for access in [Access::Read, Access::Change] {
                assert_eq!(
                    parent(own, &acme, access, &mut v).ok(),
                    Some(Tenants::One("acme".into())),
                    "{own}"
                );
            }
        }
        assert!(v.is_empty(), "{v:?}");
        assert!(matches!(
            parent("tenants/other", &acme, Access::Read, &mut v),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            parent("tenants/*", &acme, Access::Read, &mut v),
            Err(ApiError::PermissionDenied(_))
        ));
        for bad in ["acme", "tenants/", "tenants/Acme", "tenants/acme/x"] {
            parent(bad, &acme, Access::Read, &mut v).ok();
        }
        assert_eq!(v.len(), 4, "{v:?}");
    }

    #[test]
    fn an_admin_reads_any_tenant_but_changes_only_its_own() {
        let ops = caller("ops", true);
        let mut v = Vec::new();
        assert_eq!(
            parent("tenants/-", &ops, Access::Read, &mut v).ok(),
            Some(Tenants::One("ops".into())),
            "tenants/- stays the caller's own tenant"
        );
        assert_eq!(
            parent("tenants/acme", &ops, Access::Read, &mut v).ok(),
            Some(Tenants::One("acme".into()))
        );
        assert_eq!(
            parent(ALL_TENANTS, &ops, Access::Read, &mut v).ok(),
            Some(Tenants::All)
        );
        assert!(v.is_empty(), "{v:?}");
        assert!(matches!(
            parent("tenants/acme", &ops, Access::Change, &mut v),
            Err(ApiError::PermissionDenied(_))
        ));
        parent(ALL_TENANTS, &ops, Access::Change, &mut v).ok();
        assert_eq!(v.len(), 1, "a create names one tenant: {v:?}");
        let mut v = Vec::new();
        assert_eq!(
            instance_name(
                "name",
                "tenants/acme/instances/db",
                &ops,
                Access::Read,
                &mut v
            )
            .ok()
            .flatten(),
            Some(("acme".into(), "db".into()))
        );
        assert!(matches!(
            instance_name(
                "name",
                "tenants/acme/instances/db",
                &ops,
                Access::Change,
                &mut v
            ),
            Err(ApiError::PermissionDenied(_))
        ));
        assert!(matches!(
            instance_name(
                "name",
                "tenants/acme/instances/db",
                &caller("globex", false),
                Access::Read,
                &mut v
            ),
            Err(ApiError::NotFound(_))
        ));
        assert!(v.is_empty(), "{v:?}");
    }

    fn caller(tenant: &str, admin: bool) -> Caller {
        Caller {
            tenant: tenant.into(),
            admin,
            token_id: 1,
            kinds: None,
        }
    }
}
