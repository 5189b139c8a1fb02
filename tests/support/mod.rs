//! Helpers shared by the integration tests. Each test binary uses a subset, hence the allow.
#![allow(dead_code)]

pub mod browser;
pub mod chaos;
pub mod connect;
pub mod harness;
pub mod inproc;
pub mod pg;
pub mod pki;
pub mod python;
pub mod raw;
pub mod standin;
