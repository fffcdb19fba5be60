//! deltaback-agent: replicates this machine's disks to the on-premises site.

mod progress_bar;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use engine::agent::{sync, DiskSpec, Progress, SyncOptions, SyncReport};
use engine::geometry::{BlockSize, SafeName};
use engine::tls::{Identity, Role};

/// The agent runs on the machine whose disks replicate (the cloud VM during failback).
/// It finds which blocks differ from the replica and sends only those, zstd-compressed,
/// over mutual TLS to a process server.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One-shot resync: hash the disks, compare with the replicas, send what differs, and
    /// return once the master target has made it durable.
    ///
    /// Example:
    ///   deltaback-agent sync --server ps.example:9443 --pki /etc/deltaback \
    ///       --machine web01 --disk /dev/vda=vda --disk /dev/vdb=vdb
    #[command(verbatim_doc_comment)]
    Sync(SyncArgs),
}

#[derive(clap::Args, Debug)]
struct SyncArgs {
    /// Process server, HOST:PORT.
    #[arg(long)]
    server: String,
    /// PKI folder from `deltaback pki init` (uses ca.pem, agent.pem, agent-key.pem).
    #[arg(long)]
    pki: PathBuf,
    /// This machine's name on the master target (letters, digits, '-', '_', '.').
    #[arg(long)]
    machine: String,
    /// A disk to replicate: a raw image or block device, optionally with the id it gets on
    /// the master target (default: the file name without extension). Repeat for each disk.
    #[arg(long = "disk", value_name = "PATH[=ID]", required = true)]
    disks: Vec<String>,
    /// Block size: a power of two from 4KiB to 4MiB.
    #[arg(long, default_value = "64KiB")]
    block_size: ByteSize,
    /// Send blocks raw instead of zstd-compressed (faster on a fast LAN, slower on a WAN).
    #[arg(long)]
    no_compress: bool,
    /// Threads for hashing and compressing [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object with the figures of the sync on stdout at the end.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    engine::service::init_logging("info");
    let result = match Cli::parse().command {
        Command::Sync(args) => run_sync(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_disk(spec: &str) -> anyhow::Result<DiskSpec> {
    let (path, id) = match spec.rsplit_once('=') {
        Some((path, id)) => (PathBuf::from(path), id.to_owned()),
        None => {
            let path = PathBuf::from(spec);
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_owned)
                .with_context(|| format!("cannot derive a disk id from {spec}; use PATH=ID"))?;
            (path, id)
        }
    };
    Ok(DiskSpec {
        path,
        id: SafeName::new("disk id", &id)?,
    })
}

async fn run_sync(args: SyncArgs) -> anyhow::Result<()> {
    let disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut ids: Vec<&str> = disks.iter().map(|d| d.id.as_str()).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        bail!("disk id {} is given twice; name disks with PATH=ID", w[0]);
    }
    let options = SyncOptions {
        server: args.server,
        machine: SafeName::new("machine name", &args.machine)?,
        disks,
        block_size: BlockSize::new(args.block_size.as_u64())?,
        compress: !args.no_compress,
        threads: args
            .threads
            .unwrap_or_else(engine::scan::default_threads)
            .max(1),
    };
    let tls = Identity::load(&args.pki, Role::Agent)?.client_config()?;
    let progress = Arc::new(Progress::default());
    let bar = progress_bar::spawn(progress.clone());
    let report = sync(tls, &options, progress).await;
    bar.finish();
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn print_summary(report: &SyncReport) {
    for disk in &report.disks {
        println!(
            "{}/{}: {} in {} blocks, {} sent ({} payload), {} zero, durable at sequence {}{}",
            report.machine,
            disk.id,
            ByteSize(disk.size),
            disk.blocks,
            disk.blocks_sent,
            ByteSize(disk.payload_bytes),
            disk.zero_blocks,
            disk.durable_seq,
            if disk.fresh { " (new replica)" } else { "" }
        );
    }
    println!(
        "done in {:.2} s, {} on the wire",
        report.seconds,
        ByteSize(report.wire_bytes)
    );
}
