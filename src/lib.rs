//! quotawatch: watches and enforces OpenAI API quotas for many workspaces.
//! ARCHITECTURE.md has the map of this crate; in short, imports point inward:
//! `domain` <- `store` <- `engine` <- `admin` / `api` <- `app` <- `cli`.

pub mod admin;
pub mod alerts;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod domain;
pub mod edge;
pub mod engine;
pub mod history;
pub mod keys;
pub mod mail;
pub mod metrics;
pub mod mock;
pub mod openai;
pub mod prices;
pub mod proxy;
pub mod redis;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod tokens;
