//! How the process server reaches the master target: the address, the client TLS
//! configuration, and the bandwidth limit shared by everything it forwards. Conversations
//! with it are the engine's one conversation client ([`Conversation`]).

use std::sync::Arc;

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
use engine::wire::client::{self, Conversation};
use engine::wire::throttle::Throttle;
use engine::wire::tls::Role;
use engine::wire::transport::{self, Conn};

/// Where and how to reach the master target.
#[derive(Clone)]
pub struct MasterTarget {
    /// `HOST:PORT`.
    pub address: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// Shared by everything the process server forwards.
    pub throttle: Option<Arc<Throttle>>,
}

impl MasterTarget {
    /// Opens a conversation about `machine` (the spool's live and replayed conversations).
    pub async fn open(&self, machine: &SafeName) -> Result<Conversation> {
        Conversation::open(
            &self.address,
            self.tls.clone(),
            Role::MasterTarget,
            machine,
            self.throttle.clone(),
        )
        .await
        .map_err(|e| self.unreachable(e))
    }

    /// Connects and introduces `machine`, for the plain relay, which then passes frames
    /// both ways (throttled by the caller).
    pub async fn introduce(&self, machine: &SafeName) -> Result<Conn> {
        let mut conn = transport::connect(&self.address, self.tls.clone(), Role::MasterTarget)
            .await
            .map_err(|e| self.unreachable(e))?;
        client::introduce(&mut conn, Role::MasterTarget, machine)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(conn)
    }

    /// Failing to reach the master target is [`Error::Unavailable`]: the agent retries, or
    /// the spool takes the conversation. What the master target answered passes as it is.
    fn unreachable(&self, e: Error) -> Error {
        match e {
            Error::Remote { .. } => e,
            other => Error::Unavailable(format!(
                "master target at {} is unreachable: {}",
                self.address,
                other.chain()
            )),
        }
    }
}
