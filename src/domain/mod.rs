//! The pure core of quotawatch: limits, counting windows, admission, the
//! status machine and notifications.
//!
//! Architecture invariant: nothing in `domain` performs IO, reads a clock,
//! draws randomness or knows a wire format. Time arrives as a `now`
//! argument and fresh ids through a caller-supplied function, so every rule
//! here can be tested by table with exact instants.

pub mod alert;
pub mod credential;
pub mod forecast;
pub mod limits;
pub mod model;
pub mod notification;
pub mod price;
pub mod scope;
pub mod spend;
pub mod status;
pub mod threshold;
pub mod time;
pub mod upstream;
pub mod window;
pub mod workspace;

#[cfg(test)]
mod tests;

/// A file of OpenAI's wire format from `tests/fixtures/openai/`, for unit
/// tests anywhere in the crate.
#[cfg(test)]
pub(crate) fn openai_fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/openai/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|error| panic!("fixture {path}: {error}"))
}
