//! One page of a List call over the resources of one kind: one tenant's, or every tenant's
//! (an admin's `tenants/*`, [`super::validate::ALL_TENANTS`]), shared by ListInstances and
//! ListResources.
//!
//! A page token is bound to the call, the caller's tenant and the filters, as before admins
//! could list other tenants; a listing of another tenant, or of every tenant, also binds the
//! parent, so a token never carries over from one listing to another. Across tenants the
//! cursor is the last row's tenant and name (`acme/db-1`), the listing's order.

use sqlx::PgConnection;

use super::page_token::{self, Scope};
use super::validate::{Tenants, is_dns_label};
use crate::store::StoreError;
use crate::store::instances::{InstanceRow, instance_list, instance_list_all_tenants};

/// The scope of a listing's page tokens: `call`, the caller's tenant, the `filters` in order
/// and, unless the listing is the caller's own tenant, the parent.
pub fn scope(call: &str, caller_tenant: &str, tenants: &Tenants, filters: &[&str]) -> Scope {
    let parent = tenants.parent();
    let mut parts = Vec::with_capacity(filters.len() + 2);
    parts.push(caller_tenant);
    parts.extend_from_slice(filters);
    let own = matches!(tenants, Tenants::One(t) if t == caller_tenant);
    if !own {
        parts.push(&parent);
    }
    Scope::new(call, &parts)
}

/// Where a page starts: after this row of the page before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The row's tenant (listings across tenants only).
    tenant: Option<String>,
    /// The row's name.
    name: String,
}

/// The cursor of `token` in `scope`, or `None` when it is no page token of this listing.
pub fn cursor(scope: &Scope, tenants: &Tenants, token: &str) -> Option<Cursor> {
    let raw = page_token::decode(scope, token)?;
    match tenants {
        Tenants::One(_) => is_dns_label(&raw).then_some(Cursor {
            tenant: None,
            name: raw,
        }),
        Tenants::All => {
            let (tenant, name) = raw.split_once('/')?;
            (is_dns_label(tenant) && is_dns_label(name)).then(|| Cursor {
                tenant: Some(tenant.to_owned()),
                name: name.to_owned(),
            })
        }
    }
}

/// At most `limit` live resources of `kind` of `tenants` (with `status` when given), after
/// `after`, and the next page's token when there are more.
///
/// # Errors
/// Database errors.
pub async fn page(
    conn: &mut PgConnection,
    scope: &Scope,
    tenants: &Tenants,
    kind: &str,
    status: Option<&str>,
    after: Option<&Cursor>,
    limit: i64,
) -> Result<(Vec<InstanceRow>, String), StoreError> {
    let mut rows = match tenants {
        Tenants::One(tenant) => {
            let after = after.map(|c| c.name.as_str());
            instance_list(conn, tenant, kind, status, after, limit + 1).await?
        }
        Tenants::All => {
            let after = after.map(|c| (c.tenant.as_deref().unwrap_or_default(), c.name.as_str()));
            instance_list_all_tenants(conn, kind, status, after, limit + 1).await?
        }
    };
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let next = match (more, rows.last()) {
        (true, Some(last)) => match tenants {
            Tenants::One(_) => page_token::encode(scope, &last.name),
            Tenants::All => page_token::encode(scope, &format!("{}/{}", last.tenant, last.name)),
        },
        _ => String::new(),
    };
    Ok((rows, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_own_listing_keeps_its_scope_and_others_bind_the_parent() {
        let own = Tenants::One("acme".into());
        let before = Scope::new("ListResources", &["acme", "dns.zone", "0"]);
        assert_eq!(
            scope("ListResources", "acme", &own, &["dns.zone", "0"]),
            before,
            "tokens made before admins could list other tenants still work"
        );
        let other = scope(
            "ListResources",
            "ops",
            &Tenants::One("acme".into()),
            &["dns.zone", "0"],
        );
        let all = scope("ListResources", "ops", &Tenants::All, &["dns.zone", "0"]);
        let ops_own = scope(
            "ListResources",
            "ops",
            &Tenants::One("ops".into()),
            &["dns.zone", "0"],
        );
        assert_ne!(other, all);
        assert_ne!(all, ops_own);
        assert_ne!(other, ops_own);
        let token = page_token::encode(&all, "acme/db-1");
        assert_eq!(
            cursor(&all, &Tenants::All, &token),
            Some(Cursor {
                tenant: Some("acme".into()),
                name: "db-1".into()
            })
        );
        assert_eq!(cursor(&other, &Tenants::One("acme".into()), &token), None);
        let bad = page_token::encode(&all, "db-1");
        assert_eq!(cursor(&all, &Tenants::All, &bad), None);
    }
}
