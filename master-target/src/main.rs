//! deltaback-master-target: writes replicated disks into a datastore of VMDKs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use engine::wire::tls::{Identity, Role};
use master_target::{serve, MasterTargetConfig};

/// The on-premises end of deltaback: receives blocks from process servers, checks each
/// block's blake3 hash, and writes them into VMDKs in a datastore folder. It also answers
/// operators (`deltaback ... --master-target HOST:PORT`, operator certificates) on the
/// same port: points, status, recover, failover, reprotect, jobs, test failovers.
///
/// Each disk lands in DATASTORE/MACHINE/DISK.vmdk (a monolithicFlat descriptor) with its
/// data in DISK-flat.vmdk, a sparse file whose zero blocks are holes. Existing VMDKs are
/// updated in place (failback to the original location): only differing blocks travel.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address to listen on for process servers; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "0.0.0.0:9444")]
    listen: String,
    /// Datastore folder that receives the VMDKs. It must exist and be writable; one master
    /// target per datastore (a lock file keeps a second one out).
    #[arg(long)]
    datastore: PathBuf,
    /// PKI folder from `deltaback pki init` (uses ca.pem, master-target.pem, master-target-key.pem).
    #[arg(long)]
    pki: PathBuf,
    /// Rehash existing extents instead of trusting their saved manifests.
    #[arg(long)]
    verify: bool,
    /// Threads for hashing existing extents [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Write every block through the page cache. By default runs of blocks of 1 MiB and
    /// more bypass it with O_DIRECT where the filesystem allows, which saves the CPU of
    /// copying them into the cache and leaves the cache to the host's other work;
    /// durability is the same either way (fdatasync before every acknowledgement).
    #[arg(long)]
    buffered_io: bool,
    /// Folder for recovery points and the undo journals behind them
    /// [default: DATASTORE/.retention].
    #[arg(long)]
    retention: Option<PathBuf>,
    /// How long recovery points are kept (e.g. 30m, 24h, 7d); the newest is always kept.
    #[arg(long, default_value = "24h")]
    retention_window: humantime::Duration,
    /// Largest disk a source may announce; larger ones are refused when opened.
    #[arg(long, default_value = "64TiB")]
    max_disk_size: bytesize::ByteSize,
    /// Replicate disk DISK of machine MACHINE into a raw image file or block device instead
    /// of a VMDK (repeatable): the cloud disk when a failed-over machine replicates back.
    /// What it holds is compared first, so only differing blocks travel.
    #[arg(long = "raw-disk", value_name = "MACHINE/DISK=PATH")]
    raw_disks: Vec<master_target::config::RawDisk>,
    /// Serve test failovers over NBD on this address (`deltaback failover --test`): a
    /// recovery point as a disk a test VM boots from while replication goes on. NBD has no
    /// encryption or passwords here (export names carry 64 random bits), so give an
    /// address of a test network or of this host only; port 0 picks a free port (printed
    /// as `NBD listening on ADDR`). Off by default.
    #[arg(long, value_name = "ADDR")]
    nbd_listen: Option<String>,
    /// Run the scripts of recovery plans that operators send over TLS (`deltaback failover
    /// --plan FILE --master-target ...`). They run with this process's rights on this host,
    /// so by default such plans are refused when they have scripts; plans run on this host
    /// with --datastore always may.
    #[arg(long)]
    allow_plan_scripts: bool,
    #[command(flatten)]
    limits: engine::service::LimitArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    engine::service::init_logging("info");
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _lock = master_target::datastore::DatastoreLock::acquire(&args.datastore)?;
    let identity = Identity::load(&args.pki, Role::MasterTarget)?;
    let limits = args.limits.limits()?;
    let shutdown = engine::service::shutdown_signal();
    engine::service::reload_on_hangup();
    let nbd = match &args.nbd_listen {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cannot listen for NBD on {addr}: {e}"))?;
            let local = listener.local_addr()?;
            println!("NBD listening on {local}");
            let exports = master_target::nbd::Exports::default();
            let served = exports.clone();
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || master_target::nbd::serve(listener, served))?;
            Some((exports, local))
        }
        None => None,
    };
    let listener = engine::service::bind(&args.listen, "master target").await?;
    let retention = args
        .retention
        .unwrap_or_else(|| master_target::datastore::default_retention(&args.datastore));
    let config = MasterTargetConfig {
        datastore: args.datastore,
        verify: args.verify,
        hash_threads: args
            .threads
            .unwrap_or_else(engine::block::hashing::default_threads),
        direct_io: !args.buffered_io,
        retention,
        retention_window: args.retention_window.into(),
        limits,
        max_disk_size: args.max_disk_size.as_u64(),
        raw_disks: args.raw_disks,
        nbd,
        allow_plan_scripts: args.allow_plan_scripts,
    };
    master_target::operator::restore_tests(&master_target::operator::Context {
        datastore: config.datastore.clone(),
        retention: config.retention.clone(),
        nbd: config.nbd.clone(),
        plan_scripts: false,
    });
    serve(listener, &identity, config, shutdown).await?;
    Ok(())
}
