//! Naming rules shared by every layer: what a tenant, a resource name, a collection, a kind and
//! a region may look like.

/// True for a DNS label: 1–63 of `a-z0-9-`, starting with a letter, not ending with `-`.
/// Tenants, resource names and collections are DNS labels.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// True for a kind name: lower-case words of `a-z0-9` (each starting with a letter) joined by
/// single dots, at most 63 characters (`kvx.instance`, `dns.zone`).
pub fn is_kind_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.split('.').all(|w| {
            w.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// True for a cloud region name: lower-case words and a number joined by `-`, at least three
/// parts (`eu-west-1`, `us-gov-west-1`), as AWS names regions.
pub fn is_region_name(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && region.len() <= 32
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_kind_names() {
        assert!(is_dns_label("web-1"));
        assert!(!is_dns_label("1web") && !is_dns_label("web-") && !is_dns_label("Web"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_kind_name("kvx.instance") && is_kind_name("dns.zone"));
        assert!(!is_kind_name("DNS.zone") && !is_kind_name("dns..zone") && !is_kind_name("dns."));
        assert!(is_region_name("eu-west-1") && is_region_name("us-gov-west-1"));
        assert!(
            !is_region_name("mars") && !is_region_name("eu-west") && !is_region_name("EU-west-1")
        );
    }
}
