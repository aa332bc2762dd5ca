//! Integration tests: the real server on 127.0.0.1:0 with real SQLite files
//! (and PostgreSQL where `QUOTAWATCH_TEST_DATABASE_URL` is set).

mod api;
mod auth;
mod bad_input;
mod cli;
mod concurrency;
mod dashboard;
mod durability;
mod proxy;
mod sdk;
mod store;
mod support;
mod websocket;
