//! deltaback-agent: replicates this machine's disks to the on-premises site.

mod progress_bar;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use agent::{
    replicate, sync_with_retry, ChangeSource, Compression, DiskSpec, PointRequest, Progress,
    QemuSource, ReplicateOptions, SyncOptions, SyncReport, TrackedSource,
};
use anyhow::{bail, Context};
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use engine::block::geometry::{BlockSize, SafeName};
use engine::point::PointKind;
use engine::wire::throttle::{RateSchedule, Throttle};
use engine::wire::tls::{Identity, Role};

/// The agent runs on the machine whose disks replicate (the cloud VM during failback).
/// It finds which blocks differ from the replica and sends only those, zstd-compressed,
/// over mutual TLS to a process server. Every sync or cycle ends with a recovery point.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One-shot resync: hash the disks, compare with the replicas, send what differs, and
    /// return once the master target has made it durable and recorded a recovery point.
    ///
    /// Example:
    ///   deltaback-agent sync --server ps.example:9443 --pki /etc/deltaback \
    ///       --machine web01 --disk /dev/vda=vda --disk /dev/vdb=vdb
    #[command(verbatim_doc_comment)]
    Sync(SyncArgs),
    /// Continuous replication: a sync every --interval, each ending with a crash-consistent
    /// recovery point; app-consistent points every --app-consistent-every with hooks.
    ///
    /// Example (freeze /data for an app-consistent point every hour):
    ///   deltaback-agent replicate --server ps.example:9443 --pki /etc/deltaback \
    ///       --machine db01 --disk /dev/vdb=data --interval 5m \
    ///       --app-consistent-every 1h --pre-hook 'fsfreeze -f /data' --post-hook 'fsfreeze -u /data'
    #[command(verbatim_doc_comment)]
    Replicate(ReplicateArgs),
    /// Stops in-guest tracking of disks (--source tracked): detaches the eBPF program and
    /// removes its pins. The next tracked cycle compares the whole disk and tracks again.
    ///
    /// Example:
    ///   deltaback-agent untrack --disk /dev/vdb
    #[command(verbatim_doc_comment)]
    Untrack(UntrackArgs),
}

#[derive(clap::Args, Debug)]
struct UntrackArgs {
    /// A tracked block device or partition. Repeat for each disk.
    #[arg(long = "disk", value_name = "PATH", required = true)]
    disks: Vec<PathBuf>,
    /// Where bpffs is mounted.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

#[derive(clap::Args, Debug)]
struct Connection {
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
    /// Compression of block payloads: `auto` measures, per stream, the link against the
    /// compressor and compresses only while the link is the slower (a WAN, a --max-rate),
    /// not on a LAN faster than zstd; `zstd` always; `none` never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "zstd", "none"])]
    compress: String,
    /// The same as --compress none.
    #[arg(long, hide = true, conflicts_with = "compress")]
    no_compress: bool,
    /// Threads for hashing and compressing [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Most bytes per second to send (e.g. 20MiB), so replication leaves room on the link
    /// [default: unlimited].
    #[arg(long)]
    max_rate: Option<String>,
    /// Other limits by hour of day, UTC: HH-HH=RATE,... (e.g. 08-18=5MiB,22-06=unlimited);
    /// --max-rate applies outside these windows.
    #[arg(long)]
    rate_schedule: Option<String>,
    /// Shell command run once when the master target says this machine was failed over
    /// (its disks are live on premises now), e.g. `poweroff` to shut this cloud VM down;
    /// the agent then exits with status 3.
    #[arg(long, value_name = "CMD")]
    on_failover: Option<String>,
}

#[derive(clap::Args, Debug)]
struct SyncArgs {
    #[command(flatten)]
    connection: Connection,
    /// The planned-failover last pass, run after the source machine's applications are
    /// stopped: the point it makes is app-consistent and labelled "final".
    #[arg(long)]
    r#final: bool,
    /// Label of the recovery point.
    #[arg(long, default_value = "")]
    label: String,
    /// Keep retrying after transient failures (cut connection, process server or master
    /// target restarting, full disk on the far side) for this long, with back-off; each
    /// retry resumes where the last attempt stopped. 0s fails at the first error.
    #[arg(long, default_value = "10m")]
    retry_for: humantime::Duration,
    /// First pause before a retry; it doubles after each failure, up to 30s.
    #[arg(long, default_value = "1s")]
    retry_delay: humantime::Duration,
    /// Print one JSON object with the figures of the sync on stdout at the end.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct ReplicateArgs {
    #[command(flatten)]
    connection: Connection,
    /// Time from the start of one cycle to the start of the next (e.g. 30s, 5m).
    #[arg(long, default_value = "30s")]
    interval: humantime::Duration,
    /// Change source: `scan` hashes the disks each cycle and compares them with the replica;
    /// `qemu` reads only the blocks a QEMU persistent dirty bitmap marks, through a
    /// point-in-time fleecing snapshot (needs --qmp and --nbd; each --disk names a QEMU
    /// block node, e.g. --disk drive0=vda); `tracked` (Linux, inside the VM) reads only the
    /// blocks an eBPF program on the block layer saw written (each --disk a block device
    /// or partition; needs root or CAP_BPF+CAP_PERFMON, Linux 5.17+, bpffs). Tracking is
    /// pinned in bpffs and goes on while the agent restarts; after a reboot, or when it was
    /// detached, the next cycle compares the whole disk and says why.
    #[arg(long, default_value = "scan", value_parser = ["scan", "qemu", "tracked"])]
    source: String,
    /// Where bpffs is mounted (with --source tracked; mounted there if it is not).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// With --source tracked: most rounds of re-reading what was written while a cycle
    /// read, before its point is labelled not-point-in-time instead of crash-consistent.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_rounds: u32,
    /// QMP socket of the VM or qemu-storage-daemon (with --source qemu).
    #[arg(long, required_if_eq("source", "qemu"))]
    qmp: Option<PathBuf>,
    /// Unix socket of QEMU's NBD server (with --source qemu).
    #[arg(long, required_if_eq("source", "qemu"))]
    nbd: Option<PathBuf>,
    /// Folder for the fleecing scratch images (with --source qemu) [default: the system's
    /// temporary folder]. They hold the old content of blocks the guest overwrites while a
    /// cycle reads, and are deleted after each cycle.
    #[arg(long)]
    scratch_dir: Option<PathBuf>,
    /// Make an app-consistent point this often (needs --pre-hook).
    #[arg(long, requires = "pre_hook")]
    app_consistent_every: Option<humantime::Duration>,
    /// Shell command that freezes the application before an app-consistent cycle.
    #[arg(long)]
    pre_hook: Option<String>,
    /// Shell command that thaws it afterwards.
    #[arg(long)]
    post_hook: Option<String>,
    /// Stop after this many cycles [default: run until SIGINT/SIGTERM].
    #[arg(long)]
    cycles: Option<u64>,
    /// Print one JSON object per cycle on stdout.
    #[arg(long)]
    json: bool,
}

/// Exit status when the machine was failed over.
const EXIT_FAILED_OVER: u8 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    engine::service::init_logging("info");
    let (result, on_failover) = match Cli::parse().command {
        Command::Sync(args) => {
            let hook = args.connection.on_failover.clone();
            (run_sync(args).await, hook)
        }
        Command::Replicate(args) => {
            let hook = args.connection.on_failover.clone();
            (run_replicate(args).await, hook)
        }
        Command::Untrack(args) => (untrack(&args), None),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let fenced = err
                .downcast_ref::<engine::Error>()
                .is_some_and(engine::Error::is_failed_over);
            if !fenced {
                return ExitCode::FAILURE;
            }
            if let Some(hook) = on_failover {
                eprintln!("running the --on-failover command: {hook}");
                if let Err(e) = agent::replicate::run_hook("--on-failover", &hook).await {
                    eprintln!("error: {}", e.chain());
                }
            }
            ExitCode::from(EXIT_FAILED_OVER)
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

impl Connection {
    fn options(&self, point: PointRequest) -> anyhow::Result<SyncOptions> {
        let disks = self
            .disks
            .iter()
            .map(|d| parse_disk(d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut ids: Vec<&str> = disks.iter().map(|d| d.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            bail!("disk id {} is given twice; name disks with PATH=ID", w[0]);
        }
        Ok(SyncOptions {
            server: self.server.clone(),
            machine: SafeName::new("machine name", &self.machine)?,
            disks,
            block_size: BlockSize::new(self.block_size.as_u64())?,
            compression: if self.no_compress {
                Compression::None
            } else {
                self.compress.parse().map_err(anyhow::Error::msg)?
            },
            threads: self
                .threads
                .unwrap_or_else(engine::block::hashing::default_threads)
                .max(1),
            point,
            throttle: throttle(self.max_rate.as_deref(), self.rate_schedule.as_deref())?,
        })
    }

    fn tls(&self) -> anyhow::Result<Arc<engine::wire::tls::ClientConfig>> {
        Ok(Identity::load(&self.pki, Role::Agent)?.client_config()?)
    }
}

fn throttle(
    max_rate: Option<&str>,
    schedule: Option<&str>,
) -> anyhow::Result<Option<Arc<Throttle>>> {
    let schedule = RateSchedule::new(max_rate, schedule)?;
    Ok((!schedule.is_unlimited()).then(|| Arc::new(Throttle::new(schedule))))
}

async fn run_sync(args: SyncArgs) -> anyhow::Result<()> {
    let point = if args.r#final {
        PointRequest {
            kind: PointKind::AppConsistent,
            label: if args.label.is_empty() {
                "final".to_owned()
            } else {
                args.label.clone()
            },
        }
    } else {
        PointRequest {
            kind: PointKind::CrashConsistent,
            label: args.label.clone(),
        }
    };
    engine::point::check_label(&point.label)?;
    let options = args.connection.options(point)?;
    let tls = args.connection.tls()?;
    let progress = Arc::new(Progress::default());
    let bar = progress_bar::spawn(progress.clone());
    let retry = agent::Retry {
        give_up_after: args.retry_for.into(),
        first_delay: args.retry_delay.into(),
    };
    let report = sync_with_retry(tls, &options, progress, retry).await;
    bar.finish();
    let report = report?;
    if args.json {
        engine::say!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

async fn run_replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    let options = ReplicateOptions {
        sync: args.connection.options(PointRequest::default())?,
        interval: args.interval.into(),
        app_consistent_every: args.app_consistent_every.map(Into::into),
        pre_hook: args.pre_hook.clone(),
        post_hook: args.post_hook.clone(),
        cycles: args.cycles,
        source: match (args.source.as_str(), &args.qmp, &args.nbd) {
            ("qemu", Some(qmp), Some(nbd)) => ChangeSource::Qemu(QemuSource {
                qmp: qmp.clone(),
                nbd: nbd.clone(),
                scratch_dir: args.scratch_dir.clone().unwrap_or_else(std::env::temp_dir),
            }),
            ("qemu", _, _) => bail!("--source qemu needs --qmp and --nbd"),
            ("tracked", _, _) => ChangeSource::Tracked(TrackedSource {
                bpffs: args.bpffs.clone(),
                max_rounds: args.max_rounds,
            }),
            _ => ChangeSource::Scan,
        },
    };
    tracing::info!(source = %args.source, interval = %args.interval, "replicating");
    let tls = args.connection.tls()?;
    let json = args.json;
    let failed = replicate(
        tls,
        &options,
        |outcome| match outcome {
            Ok(report) if json => match serde_json::to_string(report) {
                Ok(line) => engine::say!("{line}"),
                Err(e) => tracing::warn!(error = %e, "cannot print the cycle as JSON"),
            },
            Ok(report) => print_summary(report),
            Err(e) => tracing::warn!(error = %e.chain(), "cycle failed; the next cycle retries"),
        },
        engine::service::shutdown_signal(),
    )
    .await?;
    if failed > 0 && options.cycles.is_some() {
        bail!("{failed} of the cycles failed");
    }
    Ok(())
}

fn untrack(args: &UntrackArgs) -> anyhow::Result<()> {
    for path in &args.disks {
        let device = agent::tracked::device::TrackedDevice::resolve(path)?;
        if agent::tracked::tracker::remove(&args.bpffs, &device)? {
            engine::say!("{}: tracking stopped", path.display());
        } else {
            engine::say!("{}: was not tracked", path.display());
        }
    }
    Ok(())
}

fn print_summary(report: &SyncReport) {
    for disk in &report.disks {
        engine::say!(
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
        if let Some(tracker) = &disk.tracker {
            engine::say!(
                "  tracked: {} blocks marked, {} written since the last cycle ({:.2} MB/s), {} backlog{}",
                tracker.marked_blocks,
                ByteSize(tracker.written_bytes),
                tracker.write_rate_bytes_per_s / 1e6,
                ByteSize(tracker.backlog_bytes),
                tracker
                    .full_compare
                    .as_deref()
                    .map(|why| format!("; compared the whole disk: {why}"))
                    .unwrap_or_default()
            );
        }
    }
    engine::say!(
        "recovery point {} ({}) in {:.2} s, {} on the wire",
        report.point.seq,
        report.point.kind.name(),
        report.seconds,
        ByteSize(report.wire_bytes)
    );
    let c = &report.compression;
    let speeds = match (c.link_mb_s, c.compressor_mb_s) {
        (Some(link), Some(zstd)) => format!(" (link {link} MB/s, compressor {zstd} MB/s)"),
        _ => String::new(),
    };
    engine::say!(
        "  compression {}: {} batches compressed, {} raw{speeds}",
        serde_json::to_value(c.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        c.compressed_batches,
        c.raw_batches
    );
    if let Some(consistency) = &report.consistency {
        let frozen = consistency
            .frozen_ms
            .map(|ms| format!("; applications frozen {ms} ms"))
            .unwrap_or_default();
        match consistency.instant_ms {
            Some(ms) => engine::say!(
                "  the point holds the disks as they were at {} ({} rounds){frozen}",
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
                ),
                consistency.rounds
            ),
            None => engine::say!(
                "  the disks changed during all {} rounds: no instant proven{frozen}",
                consistency.rounds
            ),
        }
    }
}
