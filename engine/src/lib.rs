//! deltaback's engine: everything the agent, process server, master target and operator CLI
//! share. The binaries only parse their command lines and call in here.
//!
//! See ARCHITECTURE.md at the repository root for how the parts fit together.

pub mod agent;
pub mod direct;
pub mod durable;
pub mod encoding;
pub mod error;
pub mod geometry;
pub mod manifest;
pub mod nbd;
pub mod pki;
pub mod protocol;
pub mod qmp;
pub mod relay;
pub mod retention;
pub mod sample;
pub mod scan;
pub mod service;
pub mod sparse;
pub mod spool;
pub mod status;
pub mod target;
pub mod throttle;
pub mod tls;
pub mod transport;
pub mod vmdk;

pub use error::{Error, ErrorCode, Result};
