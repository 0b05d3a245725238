//! The one integration-test binary: the real server over real HTTP, against SQLite and
//! PostgreSQL. Modules per area.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent_binary;
mod agents;
mod assets;
mod audit;
mod auth;
mod change_requests;
mod cli;
mod connectors;
mod crash;
mod errors;
mod execution;
mod harness;
mod invariants;
mod jobs;
mod limits;
mod openapi;
mod outage;
mod roles;
mod smoke;
mod transitions;
mod users;
