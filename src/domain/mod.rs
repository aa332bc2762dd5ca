//! The pure core of quotawatch: limits, counting windows, admission, the
//! status machine and notifications.
//!
//! Architecture invariant: nothing in `domain` performs IO, reads a clock,
//! draws randomness or knows a wire format. Time arrives as a `now`
//! argument and fresh ids through a caller-supplied function, so every rule
//! here can be tested by table with exact instants.

pub mod limits;
pub mod notification;
pub mod status;
pub mod time;
pub mod upstream;
pub mod window;
pub mod workspace;

#[cfg(test)]
mod tests;
