//! Which headers cross the proxy, in each direction.
//!
//! Towards the upstream only a fixed list passes (the policy is written out
//! in README.md, "Security"): a client must not choose which of the
//! operator's OpenAI organizations or projects is billed, send cookies, or
//! reach the upstream with anything quotawatch does not know the meaning of.
//! quotawatch then adds the upstream key and asks for plain bodies, which
//! it reads for usage.
//!
//! Towards the client everything of the message passes except what belongs
//! to one connection and what would tell a tenant about the operator's
//! account or set state in the tenant's browser.

use axum::http::header::{self, HeaderMap};

/// Headers that describe one connection, not the message, and so are never
/// forwarded in either direction (RFC 9110 section 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the upstream receives as the client sent them.
const FROM_CLIENT: &[&str] = &[
    "accept",
    "content-type",
    "user-agent",
    "openai-beta",
    "idempotency-key",
    "x-client-request-id",
];

/// Request headers the upstream receives by prefix: the OpenAI SDKs'
/// description of themselves (language, version, retry count, timeout).
const FROM_CLIENT_PREFIXES: &[&str] = &["x-stainless-"];

/// Response headers the client never receives.
const NOT_TO_CLIENT: &[&str] = &["set-cookie", "openai-organization", "openai-project"];

/// The names the `Connection` headers of `headers` list beyond
/// [`HOP_BY_HOP`], which never passes anyway: usually none, so that the
/// common `Connection: keep-alive` costs no allocation.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !HOP_BY_HOP.iter().any(|hop| hop.eq_ignore_ascii_case(token)))
        .map(str::to_ascii_lowercase)
        .collect()
}

/// The client's headers that go upstream (see [`FROM_CLIENT`]), less those
/// of one connection ([`HOP_BY_HOP`] and those its `Connection` header
/// names), in a map with room for the proxy's own: the upstream's key,
/// content type, encoding and accepted types, the account, and the host and
/// length the HTTP client adds.
pub fn to_upstream(client: &HeaderMap) -> HeaderMap {
    let named = connection_tokens(client);
    let mut kept = HeaderMap::with_capacity(client.len() + 8);
    for (name, value) in client {
        let name_str = name.as_str();
        let wanted = FROM_CLIENT.contains(&name_str)
            || FROM_CLIENT_PREFIXES
                .iter()
                .any(|prefix| name_str.starts_with(prefix));
        let of_the_connection =
            HOP_BY_HOP.contains(&name_str) || named.iter().any(|token| token == name_str);
        if wanted && !of_the_connection {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// The upstream's headers that go to the client: all of the message but
/// [`NOT_TO_CLIENT`], in the upstream's own map with room for the proxy's
/// headers. The few that do not pass are taken out of it, which costs far
/// less than copying the many that do into a new map, one by one.
pub fn to_client(mut upstream: HeaderMap) -> HeaderMap {
    for name in connection_tokens(&upstream) {
        upstream.remove(name);
    }
    for name in HOP_BY_HOP.iter().chain(NOT_TO_CLIENT) {
        upstream.remove(*name);
    }
    // The workspace's six x-ratelimit-* headers, the upstream's six renamed,
    // and the overhead.
    upstream.reserve(13);
    upstream
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::try_from(*name).expect("name"),
                    HeaderValue::from_str(value).expect("value"),
                )
            })
            .collect()
    }

    #[test]
    fn only_listed_request_headers_go_upstream() {
        let sent = to_upstream(&headers(&[
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
            ("user-agent", "OpenAI/Python 1.50.0"),
            ("openai-beta", "assistants=v2"),
            ("x-stainless-retry-count", "0"),
            ("idempotency-key", "abc"),
            ("openai-organization", "org-other"),
            ("openai-project", "proj_other"),
            ("cookie", "session=1"),
            ("authorization", "Bearer qw_tenant"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-http-method-override", "DELETE"),
            ("host", "quotawatch"),
            ("proxy-authorization", "Basic x"),
        ]));
        let mut names: Vec<&str> = sent.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "content-type",
                "idempotency-key",
                "openai-beta",
                "user-agent",
                "x-stainless-retry-count"
            ]
        );
    }

    #[test]
    fn a_header_the_clients_connection_header_names_does_not_go_upstream() {
        // Names in any case and spacing, beside hop-by-hop ones, which are
        // dropped anyway.
        let sent = to_upstream(&headers(&[
            ("connection", "Keep-Alive,  User-Agent ,x-stainless-os"),
            ("user-agent", "OpenAI/Python 1.50.0"),
            ("x-stainless-os", "Linux"),
            ("x-stainless-lang", "python"),
            ("accept", "*/*"),
        ]));
        let mut names: Vec<&str> = sent.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "x-stainless-lang"]);
    }

    #[test]
    fn the_upstreams_account_and_cookies_do_not_reach_the_client() {
        let back = to_client(headers(&[
            ("content-type", "application/json"),
            ("x-request-id", "req_1"),
            ("openai-processing-ms", "12"),
            ("openai-organization", "org-operator"),
            ("openai-project", "proj_operator"),
            ("set-cookie", "__cf_bm=1"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
        ]));
        let mut names: Vec<&str> = back.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["content-type", "openai-processing-ms", "x-request-id"]
        );
    }

    proptest! {
        /// Whatever a client sends, nothing outside the list goes upstream.
        #[test]
        fn nothing_unlisted_goes_upstream(
            names in proptest::collection::vec("[a-z][a-z0-9-]{0,24}", 0..12),
        ) {
            let mut client = HeaderMap::new();
            for name in &names {
                client.append(
                    HeaderName::try_from(name.as_str()).expect("a valid name"),
                    HeaderValue::from_static("v"),
                );
            }
            for name in to_upstream(&client).keys() {
                prop_assert!(
                    FROM_CLIENT.contains(&name.as_str())
                        || name.as_str().starts_with("x-stainless-")
                );
            }
        }
    }
}
