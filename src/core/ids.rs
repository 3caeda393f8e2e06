//! Ids that may go into a legacy URL path as they are: the rule the conversation bridge builds
//! its URLs by, and the config checks `runtime.default_agent_id` against.

/// Longest id accepted into a URL path.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` may be put into a legacy URL path as is: 1 to [`MAX_ID_LEN`] characters of
/// `A-Z a-z 0-9 _ -`. UUIDs, cuids and nanoids pass; `.`, `..`, `/`, `%` (so no percent-encoded
/// traversal such as `%2F..%2F`), spaces, `?` and `#` never do, so nothing needs escaping and no
/// id can change which route is called.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_ids_are_a_strict_charset() {
        for good in [
            "a",
            "s-1",
            "6f1c2d3e-0000-4abc-8def-0123456789ab",
            "clx9_ab-Z",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert!(is_safe_id(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a.b",
            "a/b",
            "a%2Fb",
            "%2F..%2F..%2Fadmin",
            "../admin",
            "a b",
            "a?x=1",
            "a#f",
            "a\\b",
            "a\nb",
            "é",
            "a\0",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(!is_safe_id(bad), "{bad:?}");
        }
    }
}
