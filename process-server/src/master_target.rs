//! How the process server reaches the master target: the address, the client TLS
//! configuration, and the bandwidth limit shared by everything it forwards. Conversations
//! with it are the engine's one conversation client ([`Conversation`]).

use std::sync::{Arc, RwLock};

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
use engine::wire::client::{self, Conversation};
use engine::wire::throttle::Throttle;
use engine::wire::tls::{Identity, Role};
use engine::wire::transport::{self, Conn};

/// The client TLS configuration towards the master target. SIGHUP reloads the PKI folder
/// and replaces it, so a new `crl.pem` reaches every later connection (open ones keep the
/// configuration they started with); a folder that no longer loads keeps the old one.
#[derive(Clone)]
pub struct ClientTls(Arc<RwLock<Arc<rustls::ClientConfig>>>);

impl ClientTls {
    /// The configuration of `identity`, replaced on every SIGHUP. Must be called inside the
    /// tokio runtime.
    pub fn new(identity: &Identity) -> Result<Self> {
        let tls = Self(Arc::new(RwLock::new(identity.client_config()?)));
        if let Some(mut reloads) = engine::service::reloads() {
            let mut current = identity.reload()?;
            let slot = tls.clone();
            tokio::spawn(async move {
                while reloads.changed().await.is_ok() {
                    let reloaded = current.reload().and_then(|new| {
                        let config = new.client_config()?;
                        Ok((new, config))
                    });
                    match reloaded {
                        Ok((new, config)) => {
                            current = new;
                            if let Ok(mut in_use) = slot.0.write() {
                                *in_use = config;
                            }
                            tracing::info!("reloaded the PKI folder: new connections to the master target use its CRL");
                        }
                        Err(e) => tracing::error!(error = %e.chain(),
                            "cannot reload the PKI folder; connections to the master target keep the certificates and CRL in use"),
                    }
                }
            });
        }
        Ok(tls)
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<rustls::ClientConfig> {
        match self.0.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Where and how to reach the master target.
#[derive(Clone)]
pub struct MasterTarget {
    /// `HOST:PORT`.
    pub address: String,
    pub tls: ClientTls,
    /// Shared by everything the process server forwards.
    pub throttle: Option<Arc<Throttle>>,
}

impl MasterTarget {
    /// Opens a conversation about `machine` (the spool's live and replayed conversations).
    pub async fn open(&self, machine: &SafeName) -> Result<Conversation> {
        Conversation::open(
            &self.address,
            self.tls.current(),
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
        let mut conn = transport::connect(&self.address, self.tls.current(), Role::MasterTarget)
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
