//! What every local operator command reads: the master target's datastore and retention
//! folders, and whether to print JSON.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Folders {
    /// The master target's datastore folder.
    #[arg(long)]
    pub datastore: PathBuf,
    /// The master target's retention folder [default: DATASTORE/.retention].
    #[arg(long)]
    retention: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Folders {
    /// The retention folder given, or the master target's default.
    pub fn retention(&self) -> PathBuf {
        self.retention
            .clone()
            .unwrap_or_else(|| master_target::datastore::default_retention(&self.datastore))
    }
}
