//! deltaback: the operator's command line.

mod check;
mod demo;
mod failover;
mod folders;
mod jobs;
mod points;
mod remote;
mod status;

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

// The help texts show TOML tables (`[[group]]`), which rustdoc would take for links.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Certificates for mutual TLS between the roles.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Runs a whole failback on loopback in a temporary folder: a full failback of a
    /// mixed-content disk image, then a delta failback after changing ~1% of its blocks,
    /// verified byte for byte.
    Demo(demo::DemoArgs),
    /// Lists a machine's recovery points, newest first (from the master target's folders
    /// with --datastore, or from the running master target with --master-target).
    Points(points::Where),
    /// Writes a machine's VMDKs as they were at a recovery point into an empty folder; the
    /// replica is left untouched so replication goes on. With --master-target the point's
    /// blocks travel over TLS into a folder on this machine, each checked against its
    /// blake3.
    Recover(points::RecoverArgs),
    /// Fails a machine over in place: its replicas become the live disks of the
    /// on-premises VM, rolled back to a recovery point (the cost follows what changed
    /// since the point, not the disk size), and its agents are fenced: every later session
    /// is refused with when and to which point it was failed over. Run it with the cloud
    /// VM shut down (or let the agent's --on-failover hook shut it down). An interrupted
    /// failover is finished by running it again. --planned asks the still-running agent
    /// for a final app-consistent point (its --pre-hook) and to stop, then fails over to
    /// it. --group fails every member of a consistency group over to the group's common
    /// point; --plan runs a recovery plan (TOML: ordered groups of machines, a script and
    /// a timeout after each). --test serves the point over NBD for a test VM while
    /// replication goes on (the master target needs --nbd-listen); --test --cleanup ends
    /// it. Every run is a job (`deltaback jobs`), run where the datastore is: by the
    /// master target when asked with --master-target, else by this command.
    ///
    /// Examples:
    ///   deltaback failover --datastore /vmfs/ds1 --machine web01 --point latest-app
    ///   deltaback failover --master-target mt.example:9444 --pki ~/pki --machine web01
    ///   deltaback failover --datastore /vmfs/ds1 --machine web01 --planned
    ///   deltaback failover --datastore /vmfs/ds1 --group erp
    ///   deltaback failover --datastore /vmfs/ds1 --plan /srv/plans/erp.toml
    ///   deltaback failover --master-target mt.example:9444 --pki ~/pki --test \
    ///       --machine web01 --point latest-app
    ///   deltaback failover --master-target mt.example:9444 --pki ~/pki --test --cleanup \
    ///       --machine web01
    ///
    /// A plan:
    ///   [[group]]
    ///   name = "databases"
    ///   machines = ["db01"]
    ///   script = "/srv/plans/check-db.sh"   # after the group, before the next
    ///   timeout = "5m"
    ///   [[group]]
    ///   name = "front"
    ///   machines = ["web01", "web02"]
    #[command(verbatim_doc_comment)]
    Failover(failover::FailoverArgs),
    /// After a failover, makes the machine's live disks the source of replication the other
    /// way: an agent on premises reads them, a master target near the cloud writes the cloud
    /// disks (`--raw-disk MACHINE/DISK=PATH`), comparing what they hold so only differing
    /// blocks travel. Agents of the old direction stay refused. Prints the commands to run.
    Reprotect(failover::ReprotectArgs),
    /// Lists the failovers, reprotects and plans run on this datastore: state (running,
    /// succeeded, failed with the reason, interrupted), operator, target. An interrupted
    /// job is run again safely with the same command.
    Jobs(folders::Folders),
    /// One job: its phases with progress, and its log. --follow shows a live progress line
    /// with the ETA until it ends.
    Job(jobs::JobArgs),
    /// Every machine in a master target's datastore: its replicas, their state and how old
    /// its newest recovery point is. With --max-age, exits with status 1 when a machine has
    /// no point that recent, so monitoring can run it.
    Status(status::StatusArgs),
    /// Says, without writing anything, what the master target would do with each disk of a
    /// machine: create a new replica, resync a replica deltaback made, adopt an existing
    /// VMware flat disk (failback to the original VM), or refuse it and why (sparse or split
    /// disks, snapshot chains, extents outside the machine folder, name collisions,
    /// symbolic links). Exits 1 when any disk would be refused.
    Check(check::CheckArgs),
    /// Shows a process server's spool: usage, health and what waits to be forwarded.
    Spool {
        /// The process server's --cache folder.
        #[arg(long)]
        cache: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Creates a CA and a certificate and key for each role (agent, process-server,
    /// master-target, operator) in DIR. Copy ca.pem and the role's pair to each machine; keep
    /// ca-key.pem offline. The agent certificate written here is a fleet certificate: it
    /// may speak for any machine. In production give each machine its own with
    /// `pki issue --role agent --name MACHINE`, which can speak only for that machine.
    Init {
        /// Folder to write the PKI into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing PKI in DIR (invalidates every certificate issued from it).
        #[arg(long)]
        force: bool,
    },
    /// Issues another certificate from the CA in DIR into OUT (a new folder, never the PKI
    /// folder itself), with ca.pem and crl.pem beside it: a PKI folder ready for that
    /// machine. An agent certificate is bound to machine NAME: the process server refuses
    /// it for any other machine.
    Issue {
        /// The PKI folder holding ca.pem and ca-key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// The role the certificate stands for.
        #[arg(long, value_parser = ["agent", "process-server", "master-target", "operator"])]
        role: String,
        /// The holder: for an agent, the machine name it may speak for (as given to the
        /// agent's --machine); for an operator, the person, whose name the master target
        /// logs with every request and records in every job. Recorded in the certificate
        /// and in issued.txt.
        #[arg(long)]
        name: String,
        /// Folder that receives the certificate and key (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Days of validity.
        #[arg(long, default_value_t = engine::wire::pki::CERT_VALIDITY_DAYS)]
        days: i64,
    },
    /// Revokes a certificate by its serial (see DIR/issued.txt) and rewrites DIR/crl.pem.
    /// Copy crl.pem into every service's PKI folder and restart the services.
    Revoke {
        /// The PKI folder holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Serial number in hexadecimal, as issued.txt lists it.
        #[arg(long)]
        serial: String,
    },
}

fn main() -> ExitCode {
    engine::service::init_logging("warn");
    let result = match Cli::parse().command {
        Command::Pki(PkiCommand::Init { dir, force }) => pki_init(&dir, force),
        Command::Pki(PkiCommand::Issue {
            dir,
            role,
            name,
            out,
            days,
        }) => pki_issue(&dir, &role, &name, &out, days),
        Command::Pki(PkiCommand::Revoke { dir, serial }) => {
            engine::wire::pki::revoke(&dir, &serial)
                .map_err(Into::into)
                .map(|()| {
                    engine::say!(
                        "revoked {serial}; copy {} to every service's PKI folder",
                        dir.join("crl.pem").display()
                    );
                })
        }
        Command::Demo(args) => demo::run(args),
        Command::Points(args) => points::list(args),
        Command::Recover(args) => points::recover_point(args),
        Command::Failover(args) => failover::run(args),
        Command::Reprotect(args) => failover::run_reprotect(args),
        Command::Jobs(args) => jobs::run_list(args),
        Command::Job(args) => jobs::run_one(args),
        Command::Status(args) => status::show(args),
        Command::Spool { cache } => spool_status(&cache),
        Command::Check(args) => check::run(args),
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
    engine::wire::pki::init(dir, force)?;
    engine::say!(
        "wrote a CA and certificates for agent, process-server, master-target and operator to {}",
        dir.display()
    );
    Ok(())
}

fn pki_issue(
    dir: &std::path::Path,
    role: &str,
    name: &str,
    out: &std::path::Path,
    days: i64,
) -> anyhow::Result<()> {
    let role = engine::wire::tls::Role::ALL
        .into_iter()
        .find(|r| r.name() == role)
        .ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?;
    let serial = engine::wire::pki::issue(dir, role, name, days, out)?;
    engine::say!(
        "issued {} certificate {serial:016x} for {name} into {}",
        role.name(),
        out.display()
    );
    Ok(())
}

fn spool_status(cache: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let path = cache.join("status.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is this a --cache folder?)", path.display()))?;
    engine::say!("{}", text.trim_end());
    let status: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if status["health"] == "error" {
        anyhow::bail!(
            "the spool needs an operator: {}",
            if status["rejected"]
                .as_object()
                .is_some_and(|r| !r.is_empty())
            {
                "segments were set aside (rejected); inspect and remove them"
            } else {
                "it is over 80% full"
            }
        );
    }
    Ok(())
}

/// Formats a byte count for people.
fn human(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}
