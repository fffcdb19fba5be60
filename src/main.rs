//! deltaback: the operator's command line.

mod demo;
mod points;

use std::path::PathBuf;
use std::process::ExitCode;

use bytesize::ByteSize;
use clap::{Parser, Subcommand};

/// deltaback replicates disks block by block for disaster-recovery failback: a machine
/// that failed over to the cloud comes home with only its changed blocks travelling.
///
/// Roles: deltaback-agent (on the source machine) -> deltaback-process-server (TLS :9443)
/// -> deltaback-master-target (writes VMDKs on premises). This command sets up certificates
/// and shows the whole path working.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Certificates for mutual TLS between the roles.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Runs a whole failback on loopback in a temporary folder: a full failback of a
    /// mixed-content disk image, then a delta failback after changing ~1% of its blocks,
    /// verified byte for byte.
    Demo(demo::DemoArgs),
    /// Lists a machine's recovery points, newest first (read from the master target's
    /// datastore and retention folders).
    Points(points::Where),
    /// Writes a machine's VMDKs as they were at a recovery point into an empty folder; the
    /// replica is left untouched so replication goes on.
    Recover(points::RecoverArgs),
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Creates a CA and a certificate and key for each role (agent, process-server,
    /// master-target) in DIR. Copy ca.pem and the role's pair to each machine; keep
    /// ca-key.pem offline.
    Init {
        /// Folder to write the PKI into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing PKI in DIR (invalidates every certificate issued from it).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    engine::service::init_logging("warn");
    let result = match Cli::parse().command {
        Command::Pki(PkiCommand::Init { dir, force }) => pki_init(&dir, force),
        Command::Demo(args) => demo::run(args),
        Command::Points(args) => points::list(args),
        Command::Recover(args) => points::recover_point(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn pki_init(dir: &std::path::Path, force: bool) -> anyhow::Result<()> {
    engine::pki::init(dir, force)?;
    println!(
        "wrote a CA and certificates for agent, process-server and master-target to {}",
        dir.display()
    );
    Ok(())
}

/// Formats a byte count for people.
fn human(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}
