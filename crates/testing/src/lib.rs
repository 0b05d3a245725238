//! Test support shared by the Nexplane crates' integration tests: the local AWS emulator
//! (`moto_server`), taken one test at a time, and a rusoto client that seeds and inspects it
//! ([`moto`]).
//!
//! A dev-dependency only: no binary links it (checked by the architecture invariant tests), so
//! rusoto here does not reach the server.
#![deny(missing_docs)]
// Test support: a failed setup or seeding call must fail the test loudly, at the spot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod moto;

/// A loopback port that nothing listens on at the moment of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}
