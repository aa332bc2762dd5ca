//! A request's values for scoped limits, read the same way by the proxy and
//! the REST API: the end user a tenant names for a call, from its header
//! first and then from the body's fields, in [`ScopeKind::source`]'s order.
//! A value is checked and hashed here, before it reaches the engine (and its
//! lock); only its fingerprint is counted, and it is never logged. (A
//! model's value is the request's model, which the engine reads where a
//! rule needs it.)

use axum::http::HeaderMap;

use super::error::ApiError;
use crate::domain::scope::{PerScope, ScopeKind, ScopeValue, ScopeValues, Source};

/// The values of a request whose body gave `named` for the kinds read from
/// named fields (by [`ScopeKind::index`]: the first of the kind's body fields
/// that the body has).
pub fn values(
    headers: &HeaderMap,
    named: &PerScope<Option<String>>,
) -> Result<ScopeValues, ApiError> {
    let mut values = ScopeValues::default();
    for kind in ScopeKind::ALL {
        let value = match kind.source() {
            // Read from the request's model where a rule needs it (see
            // `ScopeValues::key`): nothing to check or fingerprint here.
            Source::Model => None,
            Source::Named {
                header,
                param,
                code,
                ..
            } => {
                let invalid = |message| ApiError::bad_request(code, message).with_param(param);
                // Two values would leave which one counts to whoever reads
                // first: refused, as a body field given twice is.
                if headers.get_all(header).iter().nth(1).is_some() {
                    return Err(invalid(format!(
                        "the {header} header is sent more than once"
                    )));
                }
                let sent = match headers.get(header) {
                    Some(value) => Some(
                        std::str::from_utf8(value.as_bytes())
                            .map_err(|_| invalid(format!("the {header} header must be UTF-8")))?,
                    ),
                    None => named[kind.index()].as_deref(),
                };
                sent.map(|text| ScopeValue::parse(kind, text))
                    .transpose()
                    .map_err(invalid)?
            }
        };
        values.set(kind, value);
    }
    Ok(values)
}
