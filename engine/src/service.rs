//! What every deltaback binary does the same way: logging, binding, and stopping on signals.

use std::io::{IsTerminal, Write};

use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::wire::transport::Limits;

/// The limits a service puts on its clients, as command-line flags (shared by the process
/// server and the master target).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Most connections served at once; further ones are closed at once.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// Most connections from one IP address at once.
    #[arg(long, default_value_t = Limits::default().max_per_address)]
    pub max_connections_per_address: usize,
    /// A client silent for this long is disconnected, and the disks it was writing are
    /// released (e.g. 10m, 1h).
    #[arg(long, default_value = "1h")]
    pub idle_timeout: humantime::Duration,
}

impl LimitArgs {
    /// The limits these flags ask for; zero limits would refuse every client and are
    /// refused themselves.
    pub fn limits(&self) -> Result<Limits> {
        let idle_timeout: std::time::Duration = self.idle_timeout.into();
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            return Err(Error::Invalid(
                "--max-connections and --max-connections-per-address must be at least 1".into(),
            ));
        }
        if idle_timeout < std::time::Duration::from_secs(1) {
            return Err(Error::Invalid("--idle-timeout must be at least 1s".into()));
        }
        Ok(Limits {
            max_connections: self.max_connections,
            max_per_address: self.max_connections_per_address,
            idle_timeout,
        })
    }
}

/// Sends tracing output to stderr. `RUST_LOG` overrides the default level given.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Binds `addr` and prints the address actually bound on stdout (`listening on ADDR`), so
/// that `--listen 127.0.0.1:0` can be used by scripts and tests.
pub async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.map_err(|e| Error::Net {
        op: "bind",
        source: std::io::Error::new(e.kind(), format!("{addr}: {e}")),
    })?;
    let local = listener
        .local_addr()
        .map_err(Error::net("read bound address"))?;
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    tracing::info!(%local, "{what} listening");
    Ok(listener)
}

static RELOADS: std::sync::OnceLock<tokio::sync::watch::Receiver<u64>> = std::sync::OnceLock::new();

/// Makes SIGHUP ask the services of this process to reload their PKI folder (a new
/// `crl.pem`) instead of killing it. Like [`shutdown_signal`], call it before announcing
/// the listening address. Must be called inside the tokio runtime.
pub fn reload_on_hangup() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reloading the CRL needs a restart");
        return;
    };
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    if RELOADS.set(rx).is_err() {
        return;
    }
    tokio::spawn(async move {
        let mut count = 0u64;
        while hangups.recv().await.is_some() {
            count += 1;
            tracing::info!("SIGHUP received, reloading the PKI folder");
            if tx.send(count).is_err() {
                return;
            }
        }
    });
}

/// Reload requests (SIGHUP), if [`reload_on_hangup`] was called.
pub fn reloads() -> Option<tokio::sync::watch::Receiver<u64>> {
    RELOADS.get().cloned()
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled: call it before announcing the listening address, so a signal
/// sent right after the announcement stops the service cleanly instead of killing it.
/// Must be called inside the tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move { wait_for(term, int).await }
}

async fn wait_for(
    term: std::io::Result<tokio::signal::unix::Signal>,
    int: std::io::Result<tokio::signal::unix::Signal>,
) {
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
                _ = int.recv() => tracing::info!("SIGINT received, stopping"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Writes one line on stdout. A reader that went away (`deltaback points | head -1`) ends
/// the program quietly with status 0 instead of a panic; other write errors are reported
/// on stderr once and end it with status 1. Use through [`say!`](crate::say).
pub fn say_line(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// `println!` for command-line output that may go into a pipe: see [`say_line`].
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::service::say_line(format_args!($($arg)*))
    };
}
