//! How the process server reaches the master target: the address, the client TLS
//! configuration, and the bandwidth limit shared by everything it forwards. Conversations
//! with it are the engine's one conversation client ([`Conversation`]).

use std::sync::Arc;

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
use engine::wire::client::Conversation;
use engine::wire::throttle::Throttle;
use engine::wire::tls::Role;

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
    /// Opens a conversation about `machine`. Failing to reach the master target is
    /// [`Error::Unavailable`]: the agent retries, or the spool takes the conversation.
    pub async fn open(&self, machine: &SafeName) -> Result<Conversation> {
        Conversation::open(
            &self.address,
            self.tls.clone(),
            Role::MasterTarget,
            machine,
            self.throttle.clone(),
        )
        .await
        .map_err(|e| match e {
            Error::Remote { .. } => e,
            other => Error::Unavailable(format!(
                "master target at {} is unreachable: {}",
                self.address,
                other.chain()
            )),
        })
    }
}
