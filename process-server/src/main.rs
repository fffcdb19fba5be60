//! deltaback-process-server: relays agents' streams to the master target.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use engine::relay::{serve, RelayConfig};
use engine::tls::{Identity, Role};

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
    let listener = engine::service::bind(&args.listen, "process server").await?;
    let config = RelayConfig {
        master_target: args.master_target,
    };
    serve(
        listener,
        &identity,
        config,
        engine::service::shutdown_signal(),
    )
    .await?;
    Ok(())
}
