//! The one integration-test binary: the real server over real HTTP, against SQLite and
//! PostgreSQL. Modules per area.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;
mod invariants;
mod smoke;
mod users;
