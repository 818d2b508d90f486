//! TXT record values between a spec's plain text and Route 53's quoted form.
//!
//! Route 53 wants each TXT value as one or more double-quoted character strings of at most
//! 255 characters each, with `"` and `\` escaped (`"v=spf1 -all"`). A spec holds the plain
//! text; [`render`] splits and quotes it, [`parse`] joins a value read back from Route 53 (as
//! resolvers join the strings of one TXT record).

/// Longest character string inside one TXT value (RFC 1035).
pub const MAX_STRING_LEN: usize = 255;

/// `text` in Route 53's form: quoted strings of at most [`MAX_STRING_LEN`] characters,
/// separated by one space. `text` must be printable ASCII (the spec checks it).
pub(crate) fn render(text: &str) -> String {
    if text.is_empty() {
        return "\"\"".to_owned();
    }
    let bytes = text.as_bytes();
    bytes
        .chunks(MAX_STRING_LEN)
        .map(|chunk| {
            let mut s = String::with_capacity(chunk.len() + 2);
            s.push('"');
            for &b in chunk {
                if b == b'"' || b == b'\\' {
                    s.push('\\');
                }
                s.push(char::from(b));
            }
            s.push('"');
            s
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The strings of a TXT value as Route 53 returns it, unquoted and unescaped (`\"`, `\\`, and
/// `\ddd`, which Route 53 writes in octal). Unquoted words (which Route 53 also accepts)
/// count as strings too.
pub(crate) fn strings(wire: &str) -> Vec<String> {
    let bytes = wire.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let quoted = bytes[i] == b'"';
        if quoted {
            i += 1;
        }
        let mut s = Vec::new();
        while i < bytes.len() {
            let b = bytes[i];
            if quoted && b == b'"' {
                i += 1;
                break;
            }
            if !quoted && b.is_ascii_whitespace() {
                break;
            }
            if b == b'\\' && i + 1 < bytes.len() {
                let digits = &bytes[i + 1..bytes.len().min(i + 4)];
                if digits.len() == 3 && digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                    let code = digits
                        .iter()
                        .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                    s.push(u8::try_from(code).unwrap_or(b'?'));
                    i += 4;
                } else {
                    s.push(bytes[i + 1]);
                    i += 2;
                }
                continue;
            }
            s.push(b);
            i += 1;
        }
        out.push(String::from_utf8_lossy(&s).into_owned());
    }
    out
}

/// The text of a TXT value as Route 53 returns it: its strings joined.
pub(crate) fn parse(wire: &str) -> String {
    strings(wire).concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_quoted_string() {
        assert_eq!(render("v=spf1 -all"), "\"v=spf1 -all\"");
        assert_eq!(render(""), "\"\"");
        assert_eq!(render("say \"hi\" \\o/"), "\"say \\\"hi\\\" \\\\o/\"");
    }

    #[test]
    fn long_text_is_split_and_round_trips() {
        let text = "k=".to_owned() + &"a".repeat(600);
        let wire = render(&text);
        assert_eq!(wire.matches("\" \"").count(), 2, "three strings");
        assert_eq!(parse(&wire), text);
        for s in strings(&wire) {
            assert!(s.len() <= MAX_STRING_LEN);
        }
    }

    #[test]
    fn parse_reads_escapes_and_bare_words() {
        assert_eq!(parse("\"a\\\"b\" \"c\\\\d\""), "a\"bc\\d");
        assert_eq!(parse("\"x\\101y\""), "xAy");
        assert_eq!(strings("plain words"), vec!["plain", "words"]);
        let tricky = "quote \" and backslash \\ at the end\\";
        assert_eq!(parse(&render(tricky)), tricky);
    }
}
