//! Helpers shared by the benchmarks: release build, services, timing, peak memory.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn json(m: &Measured) -> serde_json::Value {
    serde_json::from_str(&m.stdout).expect("agent JSON")
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

pub fn build_release(root: &Path) {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--workspace", "--bins"])
        .current_dir(root)
        .status()
        .expect("cargo build");
    assert!(status.success(), "release build failed");
}

pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Flushes dirty pages so one run's writeback does not land in the next one's time.
pub fn sync_caches() {
    let _ = Command::new("sync").status();
}

pub struct Measured {
    pub wall: Duration,
    pub stdout: String,
    pub peak_rss: u64,
}

/// Runs a command to completion, timing it and sampling its peak RSS from /proc.
pub fn measure(mut cmd: Command) -> Measured {
    sync_caches();
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let mut peak = 0;
    let status = loop {
        peak = peak.max(vm_hwm(pid));
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed();
    assert!(status.success(), "{cmd:?} failed");
    Measured {
        wall,
        stdout: reader.join().unwrap_or_default(),
        peak_rss: peak,
    }
}

/// Peak resident set size of a live process, in bytes (0 once it is gone).
pub fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

pub struct Service {
    child: Child,
    pub addr: String,
}

impl Service {
    pub fn start(bin: &Path, args: &[&str]) -> Service {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start service");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("service address");
        let addr = line.trim().trim_start_matches("listening on ").to_owned();
        Service { child, addr }
    }

    pub fn peak_rss(&self) -> u64 {
        vm_hwm(self.child.id())
    }

    /// CPU seconds (user and system) the service has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.child.id())
    }
}

/// CPU seconds (user and system) process `pid` has used so far (0 once it is gone).
pub fn process_cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks =
                fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PKI, a master target and a process server of the release build, in `dir`.
pub struct Services {
    pub pki: std::path::PathBuf,
    pub datastore: std::path::PathBuf,
    pub target: Service,
    pub relay: Service,
}

impl Services {
    pub fn start(bins: &Path, dir: &Path) -> Services {
        let pki = dir.join("pki");
        run_ok(
            Command::new(bins.join("deltaback"))
                .args(["pki", "init", "--dir"])
                .arg(&pki),
        );
        let datastore = dir.join("datastore");
        std::fs::create_dir_all(&datastore).expect("datastore folder");
        let target = Service::start(
            &bins.join("deltaback-master-target"),
            &[
                "--listen",
                "127.0.0.1:0",
                "--datastore",
                s(&datastore),
                "--pki",
                s(&pki),
            ],
        );
        let relay = Services::process_server(bins, &target.addr, &pki, &[]);
        Services {
            pki,
            datastore,
            target,
            relay,
        }
    }
}

impl Services {
    /// Another process server in front of `master_target`, with `extra` arguments.
    pub fn process_server(bins: &Path, master_target: &str, pki: &Path, extra: &[&str]) -> Service {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--master-target",
            master_target,
            "--pki",
            s(pki),
        ];
        args.extend_from_slice(extra);
        Service::start(&bins.join("deltaback-process-server"), &args)
    }
}

/// What every benchmark starts with: the image size (`DELTABACK_BENCH_SIZE`, default 2 GiB),
/// freshly built release binaries, and a work folder (under `DELTABACK_BENCH_DIR`, default
/// /tmp) that is removed at the end.
pub struct Setup {
    pub size: bytesize::ByteSize,
    pub bins: std::path::PathBuf,
    pub work: tempfile::TempDir,
}

impl Setup {
    pub fn new(prefix: &str) -> Setup {
        let size = std::env::var("DELTABACK_BENCH_SIZE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(bytesize::ByteSize::gib(2));
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        build_release(&root);
        let work = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(std::env::var("DELTABACK_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .expect("work folder");
        Setup {
            size,
            bins: root.join("target/release"),
            work,
        }
    }
}

/// Reads every data extent of `image` once, so its data is in the page cache.
pub fn warm(image: &Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(image).expect("image");
    let size = file.metadata().expect("size").len();
    let mut buf = vec![0u8; 4 << 20];
    for (start, end) in engine::storage::sparse::data_extents(&file, size) {
        let mut at = start;
        while at < end {
            let len = ((end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..len], at).expect("read");
            at += len as u64;
        }
    }
}
