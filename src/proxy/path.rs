//! The one reading of a `/v1/*` path.
//!
//! HTTP clients, proxies and servers disagree about paths: one resolves
//! `x/../`, one decodes `%2e` or `%2F`, one treats `\` as `/`, one merges
//! `//`. If quotawatch classified the path as sent while the client library
//! or the upstream read it another way, a request could be priced as
//! "other" (nothing) and served as a chat completion, or leave the
//! upstream's `/v1` base while carrying the operator's key. So the path is
//! normalised once, here, the strictest way any of them could read it, and
//! that one result is classified, priced and forwarded. What cannot be read
//! unambiguously is refused.

use std::fmt;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// A percent escape that is not two hex digits, or decodes to something
    /// other than UTF-8 text.
    BadEscape,
    /// After decoding, a character no OpenAI path uses (controls, spaces,
    /// quotes, `%`, `?`, `#`, `;`, non-ASCII and the like).
    BadCharacter(char),
    /// A segment of three or more dots, which some servers read as `..`.
    DotSegment,
    /// After resolving `.` and `..`, the path is not under `/v1/`.
    OutsideV1,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::BadEscape => {
                f.write_str("the path has a percent escape that is not UTF-8 text")
            }
            PathError::BadCharacter(c) => {
                write!(
                    f,
                    "the path contains the character {c:?}, which no OpenAI path uses"
                )
            }
            PathError::DotSegment => f.write_str("the path has a segment made only of dots"),
            PathError::OutsideV1 => f.write_str("the path leads outside /v1/"),
        }
    }
}

/// Characters allowed in a segment once decoded: letters, digits and the
/// punctuation OpenAI's ids and model names use (`ft:gpt-4o:org:x:id`,
/// `file-…`, `resp_…`). Everything else in a path is either a separator in
/// disguise or something the upstream would read differently.
fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | ':' | '@' | '+' | '=')
}

/// Decodes every percent escape. Decoding once and refusing a `%` that
/// remains makes double encoding (`%252e`) an error rather than a second
/// reading.
fn percent_decode(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = bytes.get(at + 1..at + 3).ok_or(PathError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEscape)?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
            out.push(byte);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

/// The canonical form of a request path that the router matched under
/// `/v1/`: escapes decoded, `\` read as `/`, empty and `.` segments dropped,
/// `..` resolved (never above the root). The result starts with `/v1/` and
/// has no trailing slash; anything else is an error.
pub fn normalise(raw: &str) -> Result<String, PathError> {
    let decoded = percent_decode(raw)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ if segment.bytes().all(|b| b == b'.') => return Err(PathError::DotSegment),
            _ => {
                if let Some(bad) = segment.chars().find(|c| !allowed(*c)) {
                    return Err(PathError::BadCharacter(bad));
                }
                segments.push(segment);
            }
        }
    }
    match segments.split_first() {
        Some((&"v1", rest)) if !rest.is_empty() => {
            // Written into one string: every proxied call comes through here.
            let mut path = String::with_capacity(decoded.len() + 1);
            path.push_str("/v1");
            for segment in rest {
                path.push('/');
                path.push_str(segment);
            }
            Ok(path)
        }
        _ => Err(PathError::OutsideV1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aliases_of_an_endpoint_become_the_endpoint() {
        for alias in [
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/x/../chat/completions",
            "/v1/./chat/completions",
            "/v1/%2e/chat/completions",
            "/v1/%2E/chat/./completions",
            "/v1//chat//completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1/chat\\completions",
            "/v1/chat%5Ccompletions",
            "/v1/x/%2e%2e/chat/completions",
            "/v1/x/.%2E/chat/completions",
            "/v1/../v1/chat/completions",
            "/%76%31/chat/completions",
        ] {
            assert_eq!(
                normalise(alias).as_deref(),
                Ok("/v1/chat/completions"),
                "{alias}"
            );
        }
    }

    #[test]
    fn paths_leaving_v1_are_refused() {
        for path in [
            "/v1/../mock/stats",
            "/v1/%2e%2e/mock/stats",
            "/v1/%2E%2E/%2E%2E/etc/passwd",
            "/v1/./../../etc/passwd",
            "/v1/..\\mock",
            "/v1/",
            "/v1/..",
            "/v1/chat/../..",
        ] {
            assert_eq!(normalise(path), Err(PathError::OutsideV1), "{path}");
        }
    }

    #[test]
    fn paths_that_cannot_be_read_one_way_are_refused() {
        assert_eq!(normalise("/v1/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalise("/v1/%2"), Err(PathError::BadEscape));
        assert_eq!(normalise("/v1/%ff%fe"), Err(PathError::BadEscape));
        assert_eq!(
            normalise("/v1/%252e%252e/x"),
            Err(PathError::BadCharacter('%'))
        );
        assert_eq!(normalise("/v1/.../x"), Err(PathError::DotSegment));
        assert_eq!(
            normalise("/v1/chat%3Fx/completions"),
            Err(PathError::BadCharacter('?'))
        );
        assert_eq!(
            normalise("/v1/chat%00/completions"),
            Err(PathError::BadCharacter('\0'))
        );
        assert_eq!(
            normalise("/v1/chat;x/completions"),
            Err(PathError::BadCharacter(';'))
        );
        assert_eq!(
            normalise("/v1/caf%C3%A9"),
            Err(PathError::BadCharacter('é'))
        );
    }

    #[test]
    fn ids_and_model_names_pass_unchanged() {
        for path in [
            "/v1/models/ft:gpt-4o-mini-2024-07-18:acme:support:9x8y7z",
            "/v1/files/file-abc123/content",
            "/v1/responses/resp_67ccd2bed1ec8190/input_items",
            "/v1/vector_stores/vs_1.2~x@y+z=w",
        ] {
            assert_eq!(normalise(path).as_deref(), Ok(path));
        }
    }

    /// A path built from segments (some of them dot segments), with any of
    /// its characters percent-encoded and any separator written another way.
    fn disguised_path() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            4 => "[a-z0-9_-]{1,8}",
            1 => Just(".".to_owned()),
            1 => Just("..".to_owned()),
            1 => Just(String::new()),
        ];
        (
            proptest::collection::vec(segment, 0..8),
            proptest::collection::vec(0u8..4, 64),
        )
            .prop_map(|(segments, disguises)| {
                let mut path = String::from("/v1");
                let mut disguise = disguises.iter().cycle();
                for segment in segments {
                    path.push_str(match disguise.next() {
                        Some(0) => "%2F",
                        Some(1) => "\\",
                        _ => "/",
                    });
                    for c in segment.chars() {
                        match disguise.next() {
                            Some(0) => path.push_str(&format!("%{:02X}", c as u32)),
                            Some(1) => path.push_str(&format!("%{:02x}", c as u32)),
                            _ => path.push(c),
                        }
                    }
                }
                path
            })
    }

    proptest! {
        /// Whatever the disguise, the result is canonical: under `/v1/`,
        /// nothing left to resolve or decode, and normalising it again
        /// changes nothing.
        #[test]
        fn normalising_is_idempotent_and_canonical(path in disguised_path()) {
            if let Ok(canonical) = normalise(&path) {
                prop_assert!(canonical.starts_with("/v1/"));
                prop_assert!(!canonical.ends_with('/'));
                prop_assert!(!canonical.contains("//"));
                prop_assert!(!canonical.contains('%') && !canonical.contains('\\'));
                prop_assert!(canonical.split('/').all(|s| s != "." && s != ".."));
                prop_assert_eq!(normalise(&canonical), Ok(canonical.clone()));
            }
        }

        /// What is forwarded is what arrives: a URL library (the upstream's
        /// client) finds nothing left to resolve, decode or merge.
        #[test]
        fn a_client_library_sends_the_result_unchanged(path in disguised_path()) {
            if let Ok(canonical) = normalise(&path) {
                let url = reqwest::Url::parse(&format!("http://upstream{canonical}"))
                    .expect("a URL");
                prop_assert_eq!(url.path(), canonical.as_str());
            }
        }

        /// Where the URL library resolves the decoded path within `/v1/`,
        /// the result is the same endpoint, except that empty segments are
        /// merged first here.
        #[test]
        fn without_empty_segments_the_url_library_agrees(path in disguised_path()) {
            let plain = percent_decode(&path).expect("decodes").replace('\\', "/");
            prop_assume!(!plain.contains("//") && !plain.ends_with('/'));
            let url = reqwest::Url::parse(&format!("http://upstream{plain}")).expect("a URL");
            let theirs = url.path().trim_end_matches('/');
            match normalise(&path) {
                Ok(ours) => prop_assert_eq!(ours.as_str(), theirs),
                Err(error) => {
                    prop_assert_eq!(error, PathError::OutsideV1);
                    prop_assert!(!theirs.starts_with("/v1/"));
                }
            }
        }

        /// Arbitrary input never panics, and what passes is canonical.
        #[test]
        fn any_input_is_refused_or_canonical(raw in "/v1/[ -~]{0,40}") {
            if let Ok(canonical) = normalise(&raw) {
                prop_assert_eq!(normalise(&canonical), Ok(canonical.clone()));
            }
        }
    }
}
