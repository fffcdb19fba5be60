//! deltaback-process-server: relays agents' streams to the master target.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use std::sync::Arc;

use engine::block::geometry::SafeName;
use engine::wire::throttle::{RateSchedule, Throttle};
use engine::wire::tls::{Identity, Role};
use process_server::spool::Spool;
use process_server::{serve, ProcessServerConfig};

/// The middle tier of deltaback: terminates the agents' TLS connections (agent certificates
/// only) and relays their conversations to the master target (which must present a
/// master-target certificate), with bounded memory: a slow master target slows the agents
/// instead of filling this process.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address agents connect to; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: String,
    /// The master target, HOST:PORT.
    #[arg(long)]
    master_target: String,
    /// PKI folder from `deltaback pki init` (uses ca.pem, process-server.pem, process-server-key.pem).
    #[arg(long)]
    pki: PathBuf,
    /// A consistency group: NAME=MACHINE,MACHINE,... A group point is recorded only once
    /// every member has made its point durable. Repeat for more groups.
    #[arg(long = "group", value_name = "NAME=MACHINES")]
    groups: Vec<String>,
    /// Most bytes per second to forward to the master target, all agents together
    /// (e.g. 100MiB) [default: unlimited].
    #[arg(long)]
    max_rate: Option<String>,
    /// Other limits by hour of day, UTC: HH-HH=RATE,... (e.g. 08-18=20MiB); --max-rate
    /// applies outside these windows.
    #[arg(long)]
    rate_schedule: Option<String>,
    /// Durable spool folder. Every agent stream is stored here and fsynced before the agent
    /// is acknowledged, forwarded to the master target as it arrives, and deleted once the
    /// master target acknowledged it. While the master target is away (or goes away in the
    /// middle of a stream) agents keep replicating into the spool, scan and QEMU sources
    /// alike; it is forwarded in order once the master target is back, also after a
    /// restart of this process server. Without it, agents wait and retry while the master
    /// target is away.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Most bytes the spool may hold; agents are held back when it is full. Usage over 70%
    /// is a warning and over 80% an error (log and CACHE/status.json).
    #[arg(long, default_value = "10GiB")]
    cache_limit: bytesize::ByteSize,
    #[command(flatten)]
    limits: engine::service::LimitArgs,
}

fn parse_group(spec: &str) -> anyhow::Result<(SafeName, Vec<SafeName>)> {
    let (name, members) = spec
        .split_once('=')
        .with_context(|| format!("--group {spec}: write NAME=MACHINE,MACHINE"))?;
    let members = members
        .split(',')
        .map(|m| SafeName::new("group member", m.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if members.len() < 2 {
        anyhow::bail!("--group {spec}: a consistency group needs at least two machines");
    }
    Ok((SafeName::new("group name", name)?, members))
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
    let identity = Identity::load(&args.pki, Role::ProcessServer)?;
    engine::wire::transport::resolve(&args.master_target)
        .await
        .context("--master-target")?;
    let limits = args.limits.limits()?;
    let shutdown = engine::service::shutdown_signal();
    engine::service::reload_on_hangup();
    let listener = engine::service::bind(&args.listen, "process server").await?;
    let groups = args
        .groups
        .iter()
        .map(|g| parse_group(g))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut seen = std::collections::HashSet::new();
    for member in groups.iter().flat_map(|(_, m)| m) {
        if !seen.insert(member.as_str()) {
            anyhow::bail!("machine {member} is in more than one consistency group");
        }
    }
    let schedule = RateSchedule::new(args.max_rate.as_deref(), args.rate_schedule.as_deref())?;
    let config = ProcessServerConfig {
        master_target: args.master_target,
        groups,
        throttle: (!schedule.is_unlimited()).then(|| Arc::new(Throttle::new(schedule))),
        spool: match &args.cache {
            Some(dir) => Some(Arc::new(Spool::open(dir, args.cache_limit.as_u64())?)),
            None => None,
        },
        limits,
    };
    serve(listener, &identity, config, shutdown).await?;
    Ok(())
}
