//! DNS names: checking and normalising the names a spec gives, and reading the names Route 53
//! returns.
//!
//! Inside this crate every name is *absolute, lowercase and ends with a dot*
//! (`www.example.com.`), the form Route 53 answers with, so names compare as plain strings.
//! Route 53 returns some characters as octal escapes (`*` as `\052`); [`from_route53`] undoes
//! them.

/// Longest domain name, in characters without the final dot (RFC 1035: 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a name is not acceptable; the text completes "the name … ".
pub(crate) type NameProblem = String;

/// A zone name as a spec gives it (`example.com` or `example.com.`), normalised to
/// `example.com.`.
///
/// A zone name has at least two labels of letters, digits and hyphens (no hyphen first or
/// last), since Route 53 public zones are registrable domains or below them.
pub(crate) fn zone_name(raw: &str) -> Result<String, NameProblem> {
    let name = absolute(raw)?;
    let labels = labels(&name);
    if labels.len() < 2 {
        return Err(format!(
            "{raw:?} has a single label; a hosted zone is a domain such as \"example.com\""
        ));
    }
    for label in labels {
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "{raw:?} has the label {label:?}: zone labels hold only letters, digits and '-'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "{raw:?} has the label {label:?}, which starts or ends with '-'"
            ));
        }
    }
    Ok(name)
}

/// A record name as a spec gives it, normalised to an absolute name inside `zone` (itself
/// normalised by [`zone_name`]).
///
/// `"@"` and `""` are the apex. A name ending with `.` is absolute; so is a name that equals
/// the zone's name or ends with `.<zone>` (as Terraform's `aws_route53_record` reads them);
/// any other name is relative to the zone (`"www"` → `www.example.com.`). Labels hold letters,
/// digits, `-` and `_` (for `_dmarc` and the like); the leftmost label may be `*` (a wildcard).
pub(crate) fn record_name(raw: &str, zone: &str) -> Result<String, NameProblem> {
    let trimmed = raw.trim();
    let bare_zone = zone.trim_end_matches('.');
    let name = if trimmed.is_empty() || trimmed == "@" {
        zone.to_owned()
    } else if trimmed.ends_with('.') {
        absolute(trimmed)?
    } else {
        let lower = trimmed.to_ascii_lowercase();
        if lower == bare_zone || lower.ends_with(&format!(".{bare_zone}")) {
            absolute(trimmed)?
        } else {
            absolute(&format!("{trimmed}.{bare_zone}"))?
        }
    };
    if name != zone && !name.ends_with(&format!(".{zone}")) {
        return Err(format!("{raw:?} is not inside the zone {zone}"));
    }
    for (i, label) in labels(&name).into_iter().enumerate() {
        if label == "*" {
            if i != 0 {
                return Err(format!(
                    "{raw:?} has '*' in a label other than the leftmost; only a leading \"*.\" \
                     (a wildcard) is allowed"
                ));
            }
            continue;
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{raw:?} has the label {label:?}: labels hold only letters, digits, '-' and '_' \
                 (and a leading \"*.\" for a wildcard)"
            ));
        }
    }
    Ok(name)
}

/// A host name as a record value names it (a CNAME target, an MX exchange), normalised to
/// `host.example.net.`. Values are always absolute: a trailing dot is added if missing.
pub(crate) fn host_name(raw: &str) -> Result<String, NameProblem> {
    let name = absolute(raw)?;
    for label in labels(&name) {
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{raw:?} has the label {label:?}: host names hold only letters, digits, '-' and \
                 '_'"
            ));
        }
    }
    Ok(name)
}

/// A name as Route 53 returns it, in this crate's form: octal escapes (`\052`) decoded,
/// lowercase, with the final dot.
pub(crate) fn from_route53(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len() + 1);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|d| (b'0'..=b'7').contains(d))
        {
            let code = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(char::from_u32(code).unwrap_or('?'));
            i += 4;
        } else {
            out.push(char::from(b));
            i += 1;
        }
    }
    let mut out = out.to_ascii_lowercase();
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// The labels of an absolute name, leftmost first.
pub(crate) fn labels(name: &str) -> Vec<&str> {
    name.trim_end_matches('.').split('.').collect()
}

/// `raw` made absolute and lowercase, with the length rules of every DNS name checked.
fn absolute(raw: &str) -> Result<String, NameProblem> {
    let trimmed = raw.trim();
    if trimmed.is_empty() || trimmed == "." {
        return Err("is empty".to_owned());
    }
    if let Some(c) = trimmed.chars().find(|c| !c.is_ascii()) {
        return Err(format!(
            "{raw:?} holds {c:?}; write internationalised names in their ASCII (punycode, \
             \"xn--…\") form"
        ));
    }
    if let Some(c) = trimmed.chars().find(|c| c.is_ascii_whitespace()) {
        return Err(format!("{raw:?} holds the space character {c:?}"));
    }
    let bare = trimmed.strip_suffix('.').unwrap_or(trimmed);
    if bare.len() > MAX_NAME_LEN {
        return Err(format!(
            "{raw:?} has {} characters; a domain name has at most {MAX_NAME_LEN}",
            bare.len()
        ));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err(format!("{raw:?} has an empty label (\"..\")"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "{raw:?} has a label of {} characters; a label has at most {MAX_LABEL_LEN}",
                label.len()
            ));
        }
    }
    Ok(format!("{}.", bare.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_names_are_normalised_and_checked() {
        assert_eq!(zone_name("Example.COM").unwrap(), "example.com.");
        assert_eq!(zone_name("example.com.").unwrap(), "example.com.");
        assert!(zone_name("com").unwrap_err().contains("single label"));
        assert!(zone_name("-bad.example.com").unwrap_err().contains("'-'"));
        assert!(zone_name("a_b.example.com").unwrap_err().contains("label"));
        assert!(zone_name("a..com").unwrap_err().contains("empty label"));
        assert!(zone_name("exämple.com").unwrap_err().contains("punycode"));
        assert!(zone_name("").is_err());
        let long = format!("{}.com", "a".repeat(64));
        assert!(zone_name(&long).unwrap_err().contains("63"));
        let too_long = format!("{}com", "abcdefghi.".repeat(26));
        assert!(zone_name(&too_long).unwrap_err().contains("253"));
    }

    #[test]
    fn record_names_resolve_against_the_zone() {
        let zone = "example.com.";
        assert_eq!(record_name("@", zone).unwrap(), zone);
        assert_eq!(record_name("", zone).unwrap(), zone);
        assert_eq!(record_name("www", zone).unwrap(), "www.example.com.");
        assert_eq!(
            record_name("WWW.example.com", zone).unwrap(),
            "www.example.com."
        );
        assert_eq!(
            record_name("www.example.com.", zone).unwrap(),
            "www.example.com."
        );
        assert_eq!(record_name("example.com", zone).unwrap(), zone);
        assert_eq!(record_name("*.apps", zone).unwrap(), "*.apps.example.com.");
        assert_eq!(record_name("_dmarc", zone).unwrap(), "_dmarc.example.com.");
        assert!(
            record_name("www.other.org.", zone)
                .unwrap_err()
                .contains("not inside")
        );
        assert!(record_name("a.*.b", zone).unwrap_err().contains("leftmost"));
        assert!(record_name("a b", zone).unwrap_err().contains("space"));
        assert!(record_name("a!b", zone).unwrap_err().contains("label"));
        // "notexample.com" is relative, not the zone itself.
        assert_eq!(
            record_name("notexample.com", zone).unwrap(),
            "notexample.com.example.com."
        );
    }

    #[test]
    fn route53_names_are_decoded() {
        assert_eq!(from_route53("\\052.Example.com."), "*.example.com.");
        assert_eq!(from_route53("example.com"), "example.com.");
        assert_eq!(from_route53("a\\\\b.com."), "a\\\\b.com.");
    }

    #[test]
    fn host_names_become_absolute() {
        assert_eq!(host_name("Mail.Example.NET").unwrap(), "mail.example.net.");
        assert!(host_name("mail server.net").is_err());
    }
}
