//! Where every operator command asks: the master target's folders on this host
//! (`--datastore`), or a running master target over mutual TLS (`--master-target
//! HOST:PORT --pki DIR`, an operator certificate). Both answer the same requests
//! (`master_target::operator`), so the commands print the same either way.

use std::path::PathBuf;

use anyhow::Context as _;
use master_target::operator::{execute, Context, Request};
use serde::de::DeserializeOwned;

use crate::remote::Remote;

#[derive(clap::Args, Debug, Clone)]
pub struct Folders {
    /// The master target's datastore folder, on the master target's host.
    #[arg(
        long,
        required_unless_present = "master_target",
        conflicts_with = "master_target"
    )]
    pub datastore: Option<PathBuf>,
    /// The master target's retention folder [default: DATASTORE/.retention].
    #[arg(long, conflicts_with = "master_target")]
    retention: Option<PathBuf>,
    /// Ask a running master target instead, from any host: HOST:PORT (its --listen port).
    /// Jobs then run on the master target, and it logs every request with the name in
    /// your operator certificate.
    #[arg(long, value_name = "HOST:PORT", requires = "pki")]
    pub master_target: Option<String>,
    /// With --master-target: the PKI folder holding ca.pem and an operator certificate
    /// (operator.pem and operator-key.pem, from `deltaback pki init` or `pki issue --role
    /// operator --name YOU`).
    #[arg(long, requires = "master_target")]
    pub pki: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The master target's connection settings, loaded once (a job is followed by many
    /// requests).
    #[arg(skip)]
    remote: std::sync::OnceLock<Remote>,
}

impl Folders {
    /// The retention folder given, or the master target's default (local only).
    pub fn retention(&self) -> Option<PathBuf> {
        let datastore = self.datastore.as_ref()?;
        Some(
            self.retention
                .clone()
                .unwrap_or_else(|| master_target::datastore::default_retention(datastore)),
        )
    }

    /// The local context, when the folders are on this host.
    pub fn local(&self) -> Option<Context> {
        Some(Context {
            datastore: self.datastore.clone()?,
            retention: self.retention()?,
            nbd: None,
            plan_scripts: true,
        })
    }

    /// The running master target asked, if any.
    pub fn remote(&self) -> anyhow::Result<Option<&Remote>> {
        if let Some(remote) = self.remote.get() {
            return Ok(Some(remote));
        }
        match (&self.master_target, &self.pki) {
            (Some(addr), Some(pki)) => {
                let _ = self.remote.set(Remote::new(addr, pki)?);
                Ok(self.remote.get())
            }
            _ => Ok(None),
        }
    }

    /// What is asked, for messages: the datastore, or the master target.
    pub fn describe(&self) -> String {
        match (&self.master_target, &self.datastore) {
            (Some(addr), _) => format!("the master target at {addr}"),
            (None, Some(datastore)) => format!("datastore {}", datastore.display()),
            (None, None) => "nothing".to_owned(),
        }
    }

    /// Asks `request`, locally or of the master target, and reads the answer as `T`.
    pub fn ask<T: DeserializeOwned>(&self, request: &Request) -> anyhow::Result<T> {
        let value = match (self.local(), self.remote()?) {
            (_, Some(remote)) => remote.call(request)?,
            (Some(ctx), None) => execute(&ctx, request, &operator())?,
            (None, None) => anyhow::bail!("give --datastore, or --master-target and --pki"),
        };
        serde_json::from_value(value)
            .context("the answer is not what this deltaback expects (are the versions the same?)")
    }
}

/// Who runs this command on this host, for the job record: the user behind sudo, else
/// the user. (Over TLS the master target takes the name from the operator certificate.)
pub fn operator() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".to_owned())
}
