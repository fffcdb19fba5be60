//! `deltaback demo`: the whole failback path on loopback, in one command.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use agent::{sync, DiskSpec, Progress, SyncOptions, SyncReport};
use anyhow::{bail, Context};
use bytesize::ByteSize;
use engine::block::geometry::{BlockSize, SafeName};
use engine::wire::tls::{Identity, Role};
use master_target::MasterTargetConfig;
use process_server::ProcessServerConfig;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::human;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Size of the sample disk image.
    #[arg(long, default_value = "256MiB")]
    size: ByteSize,
    /// Share of blocks to change before the second failback.
    #[arg(long, default_value_t = 0.01)]
    change: f64,
    /// Keep the files in DIR instead of a temporary folder that is removed at the end.
    #[arg(long)]
    keep: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp;
    let dir = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(demo(&dir, &args))
}

async fn demo(dir: &Path, args: &DemoArgs) -> anyhow::Result<()> {
    let size = args.size.as_u64() / 512 * 512;
    let block_size = BlockSize::default();
    let pki = dir.join("pki");
    let datastore = dir.join("datastore");
    let image = dir.join("web01-disk0.img");
    engine::say!("deltaback demo in {}", dir.display());
    engine::wire::pki::init(&pki, true)?;
    engine::say!("1. PKI: CA and role certificates in {}", pki.display());

    std::fs::create_dir_all(&datastore)?;
    let datastore_lock = master_target::datastore::DatastoreLock::acquire(&datastore)?;
    let (stop_target, target_stopped) = oneshot::channel::<()>();
    let target_listener = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target_listener.local_addr()?;
    let target_identity = Identity::load(&pki, Role::MasterTarget)?;
    let target_config = MasterTargetConfig {
        datastore: datastore.clone(),
        verify: false,
        hash_threads: engine::block::hashing::default_threads(),
        direct_io: true,
        retention: dir.join("retention"),
        retention_window: std::time::Duration::from_secs(24 * 3600),
        limits: Default::default(),
        max_disk_size: master_target::config::DEFAULT_MAX_DISK_SIZE,
        raw_disks: Vec::new(),
        nbd: None,
        allow_plan_scripts: false,
    };
    let target = tokio::spawn(async move {
        master_target::serve(target_listener, &target_identity, target_config, async {
            let _ = target_stopped.await;
        })
        .await
    });
    let (stop_relay, relay_stopped) = oneshot::channel::<()>();
    let relay_listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay_listener.local_addr()?;
    let relay_identity = Identity::load(&pki, Role::ProcessServer)?;
    let relay = tokio::spawn(async move {
        process_server::serve(
            relay_listener,
            &relay_identity,
            ProcessServerConfig {
                master_target: target_addr.to_string(),
                groups: Vec::new(),
                throttle: None,
                spool: None,
                limits: Default::default(),
            },
            async {
                let _ = relay_stopped.await;
            },
        )
        .await
    });
    engine::say!(
        "2. master target on {target_addr} (datastore {}), process server on {relay_addr}",
        datastore.display()
    );

    engine::sample::write_mixed_image(&image, size, 2026)?;
    engine::say!(
        "3. source disk {}: {} of zeros, text and random data",
        image.display(),
        human(size)
    );

    let options = SyncOptions {
        server: relay_addr.to_string(),
        machine: SafeName::new("machine", "web01")?,
        disks: vec![DiskSpec {
            path: image.clone(),
            id: SafeName::new("disk id", "disk0")?,
        }],
        block_size,
        compression: agent::Compression::Zstd,
        threads: engine::block::hashing::default_threads(),
        point: Default::default(),
        throttle: None,
    };
    let tls = Identity::load(&pki, Role::Agent)?.client_config()?;
    let full = sync(tls.clone(), &options, Arc::new(Progress::default())).await?;
    report("4. full failback (new replica)", &full);

    let changed = engine::sample::change_blocks(&image, block_size.get(), args.change, 7)?;
    engine::say!(
        "5. changed {} blocks of the source ({:.1}%)",
        changed.len(),
        args.change * 100.0
    );

    let delta = sync(tls, &options, Arc::new(Progress::default())).await?;
    report("6. delta failback (existing replica)", &delta);
    if delta.disks[0].blocks_sent != changed.len() as u64 {
        bail!(
            "expected {} blocks to travel, {} did",
            changed.len(),
            delta.disks[0].blocks_sent
        );
    }

    let vmdk = datastore.join("web01").join("disk0.vmdk");
    verify(
        &image,
        &datastore.join("web01").join("disk0-flat.vmdk"),
        &vmdk,
    )?;
    let saved = 100.0 * (1.0 - delta.wire_bytes as f64 / full.wire_bytes.max(1) as f64);
    engine::say!(
        "8. the delta failback moved {} instead of {} ({saved:.1}% less)",
        human(delta.wire_bytes),
        human(full.wire_bytes)
    );
    let _ = stop_relay.send(());
    let _ = stop_target.send(());
    relay.await??;
    target.await??;
    drop(datastore_lock);
    Ok(())
}

fn report(title: &str, r: &SyncReport) {
    let d = &r.disks[0];
    engine::say!(
        "{title}: {} of {} blocks sent, {} payload, {} on the wire, {} zero blocks on the disk, {:.2} s",
        d.blocks_sent,
        d.blocks,
        human(d.payload_bytes),
        human(r.wire_bytes),
        d.zero_blocks,
        r.seconds
    );
}

fn verify(image: &Path, extent: &Path, vmdk: &Path) -> anyhow::Result<()> {
    let same = files_equal(image, extent)?;
    if !same {
        bail!("{} differs from {}", extent.display(), image.display());
    }
    let qemu = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "vmdk"])
        .arg(image)
        .arg(vmdk)
        .status();
    match qemu {
        Ok(status) if status.success() => {
            engine::say!("7. verified: the VMDK matches the source byte for byte (also per qemu-img compare)")
        }
        Ok(status) => bail!("qemu-img compare reports a difference ({status})"),
        Err(_) => engine::say!("7. verified: the VMDK extent matches the source byte for byte (qemu-img not installed)"),
    }
    Ok(())
}

fn files_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let open = |p: &Path| std::fs::File::open(p).with_context(|| format!("open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}
