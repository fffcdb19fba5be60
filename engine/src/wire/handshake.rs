//! The one server handshake: how a service takes a conversation's opening `Hello`.
//!
//! The process server (for agents) and the master target (for process servers) both read
//! `Hello(min version, max version, machine)`, refuse a version range they do not speak
//! with `Error(Version)` and a machine name that is not a [`SafeName`], and answer
//! `Welcome(version)` once they are ready to carry the conversation on. A client whose
//! certificate is bound to one machine (`pki issue --role agent --name M`) may speak only
//! as that machine; the process server then forwards only the name it checked.

use crate::block::geometry::SafeName;
use crate::error::{Error, Result};
use crate::wire::transport::Conn;
use crate::wire::{Message, PROTOCOL_VERSION};

/// What a client said in its `Hello`.
#[derive(Debug, Clone)]
pub struct Hello {
    /// The machine the conversation is about.
    pub machine: SafeName,
}

/// Reads and checks the opening `Hello`; `this_service` names us in the refusal
/// ("process server", "master target").
pub async fn read_hello(conn: &mut Conn, this_service: &str) -> Result<Hello> {
    let Message::Hello {
        min_version,
        max_version,
        machine,
    } = conn.recv().await?
    else {
        return Err(Error::Protocol(
            "the conversation must start with Hello".into(),
        ));
    };
    if !(min_version..=max_version).contains(&PROTOCOL_VERSION) {
        return Err(Error::Version(format!(
            "the client speaks protocol versions {min_version} to {max_version}, \
             this {this_service} speaks {PROTOCOL_VERSION}"
        )));
    }
    if let Some(bound) = conn.bound_machine() {
        if bound != machine {
            return Err(Error::Forbidden(format!(
                "this agent certificate belongs to machine {bound}; it cannot replicate \
                 machine {machine} (issue one per machine with deltaback pki issue --role \
                 agent --name {machine})"
            )));
        }
    }
    Ok(Hello {
        machine: SafeName::new("machine name", &machine)?,
    })
}

/// Accepts the conversation.
pub async fn welcome(conn: &mut Conn) -> Result<()> {
    conn.send(&Message::Welcome {
        version: PROTOCOL_VERSION,
    })
    .await
}
