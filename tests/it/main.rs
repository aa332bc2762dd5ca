//! Integration tests: the real server on 127.0.0.1:0 with real SQLite files
//! (and PostgreSQL and Redis where `QUOTAWATCH_TEST_DATABASE_URL` and
//! `QUOTAWATCH_TEST_REDIS_URL` are set).

mod accuracy;
mod alerts;
mod alerts_delivery;
mod api;
mod auth;
mod bad_input;
mod cli;
mod conformance;
mod cors;
mod counters;
mod credentials;
mod dashboard;
mod deploy;
mod durability;
mod held;
mod hostile;
mod instances;
mod keys;
mod mail;
mod nextjs;
mod packages;
mod prices;
mod proxy;
mod python_client;
mod redis_script;
mod schema;
mod scopes;
mod sdk;
mod store;
mod support;
mod upstream_proxy;
mod upstream_tls;
mod websocket;
