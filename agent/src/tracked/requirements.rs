//! What tracking needs from the machine, checked before anything is loaded, each refusal
//! saying what to change or which source to use instead: Linux 5.17 or later (`bpf_loop`,
//! pinnable tracepoint links, `diskseq`), root or CAP_BPF with CAP_PERFMON, and bpffs
//! mounted (mounted here at the given path if it is not).

use std::path::Path;

use engine::error::{Error, Result};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const OLDEST_KERNEL: (u32, u32) = (5, 17);
const INSTEAD: &str = "or replicate with --source scan, which needs none of this";

/// Checks the kernel and privileges, and makes sure bpffs is mounted at `bpffs`.
pub fn check(bpffs: &Path) -> Result<()> {
    check_kernel()?;
    check_privileges()?;
    ensure_bpffs(bpffs)
}

fn check_kernel() -> Result<()> {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < OLDEST_KERNEL {
        return Err(Error::Invalid(format!(
            "in-guest tracking needs Linux {}.{} or later (this is {release}); {INSTEAD}",
            OLDEST_KERNEL.0, OLDEST_KERNEL.1
        )));
    }
    Ok(())
}

fn check_privileges() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(Error::file("read", Path::new("/proc/self/status")))?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "in-guest tracking loads an eBPF program into the kernel: run the agent as root, or \
         give it CAP_BPF and CAP_PERFMON (systemd: AmbientCapabilities=CAP_BPF CAP_PERFMON); \
         {INSTEAD}"
    )))
}

fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    if is_bpffs(bpffs) {
        return Ok(());
    }
    std::fs::create_dir_all(bpffs).map_err(Error::file("make bpffs mount point", bpffs))?;
    rustix::mount::mount(
        "bpf",
        bpffs,
        "bpf",
        rustix::mount::MountFlags::empty(),
        "mode=700",
    )
    .map_err(|e| {
        Error::Invalid(format!(
            "bpffs is not mounted at {} and mounting it failed ({e}): mount it with \
                 `mount -t bpf bpf {}` (the tracker pins its program there so tracking goes \
                 on while the agent restarts); {INSTEAD}",
            bpffs.display(),
            bpffs.display()
        ))
    })?;
    tracing::info!(path = %bpffs.display(), "mounted bpffs");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == BPF_FS_MAGIC)
}
