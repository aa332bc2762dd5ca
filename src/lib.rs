//! quotawatch: watches and enforces OpenAI API quotas for many workspaces.
//! See ARCHITECTURE.md for the map of this crate.

pub mod domain;
