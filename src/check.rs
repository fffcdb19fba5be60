//! `deltaback check`: what the master target would do with each disk of a machine (create,
//! resync its own replica, adopt a VMware flat disk, or refuse and why), without writing.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use engine::block::geometry::SafeName;
use master_target::ownership::inspect;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The master target's datastore folder.
    #[arg(long)]
    pub datastore: PathBuf,
    /// The machine, as the agent names it (--machine).
    #[arg(long)]
    pub machine: String,
    /// Disk ids, as the agent names them (the part after `=` in --disk PATH=ID).
    #[arg(long = "disk", required = true, num_args = 1..)]
    pub disks: Vec<String>,
}

/// Prints one line per disk; fails when any disk would be refused.
pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.datastore.is_dir(),
        "datastore {} is not a folder",
        args.datastore.display()
    );
    let machine = SafeName::new("machine name", &args.machine)?;
    let mut refused = 0;
    for disk in &args.disks {
        let id = SafeName::new("disk id", disk)?;
        match inspect(&args.datastore, &machine, &id) {
            Ok(verdict) => {
                let word = verdict.word();
                engine::say!("{machine}/{id}: {word}: {}", verdict.explain());
            }
            Err(engine::Error::Refused { path, reason, fix }) => {
                refused += 1;
                engine::say!(
                    "{machine}/{id}: refuse: {}: {reason}\n    fix: {fix}",
                    path.display()
                );
            }
            Err(other) => {
                return Err(other).with_context(|| format!("checking {machine}/{id}"));
            }
        }
    }
    anyhow::ensure!(
        refused == 0,
        "{refused} of {} disks would be refused",
        args.disks.len()
    );
    Ok(())
}
