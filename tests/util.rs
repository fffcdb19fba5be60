//! Helpers: locate the binaries, start services, run the agent, inspect replicas.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Path of a workspace binary, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo nextest run --workspace`",
        path.display()
    );
    path
}

/// A running service; killed when dropped.
pub struct Service {
    child: Child,
    pub addr: String,
    /// Where a master target serves NBD (`--nbd-listen`), from its `NBD listening on` line.
    pub nbd: Option<String>,
    pub log: PathBuf,
    name: String,
    args: Vec<String>,
}

/// Spawns a service and reads its `listening on ADDR` line (and `NBD listening on ADDR`
/// before it, if it serves NBD).
fn spawn(
    name: &str,
    args: &[String],
    log: &Path,
) -> Result<(Child, String, Option<String>), String> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut child = Command::new(bin(name))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .env("RUST_LOG", "info")
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read stdout");
    let mut nbd = None;
    if let Some(addr) = line.trim().strip_prefix("NBD listening on ") {
        nbd = Some(addr.to_owned());
        line.clear();
        reader.read_line(&mut line).expect("read stdout");
    }
    match line.trim().strip_prefix("listening on ") {
        Some(addr) => Ok((child, addr.to_owned(), nbd)),
        None => {
            let _ = child.wait();
            Err(format!(
                "{name} did not report its address: {line:?}; log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            ))
        }
    }
}

impl Service {
    /// Starts `name` with `args`, waits for its `listening on ADDR` line.
    pub fn start(name: &str, args: &[&str], log: PathBuf) -> Service {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, addr, nbd) = spawn(name, &args, &log).unwrap_or_else(|e| panic!("{e}"));
        Service {
            child,
            addr,
            nbd,
            log,
            name: name.to_owned(),
            args,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9, then start again on the same address.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// kill -9.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }

    /// Starts the (killed) service again on the same address, with `extra` arguments added.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|a| a.to_string()));
        self.restart();
    }

    /// Starts the (killed) service again on the same address.
    pub fn restart(&mut self) {
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = self.addr.clone();
        }
        if let (Some(i), Some(nbd)) = (args.iter().position(|a| a == "--nbd-listen"), &self.nbd) {
            args[i + 1] = nbd.clone();
        }
        let mut last = String::new();
        for _ in 0..50 {
            match spawn(&self.name, &args, &self.log) {
                Ok((child, _, _)) => {
                    self.child = child;
                    return;
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not restart on {}: {last}", self.name, self.addr);
    }

    /// What the service logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (services log asynchronously).
    pub fn wait_for_log(&self, needle: &str) -> String {
        for _ in 0..100 {
            let text = self.log_text();
            if text.contains(needle) {
                return text;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("log never contained {needle:?}:\n{}", self.log_text());
    }
}

impl Service {
    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        self.child.wait().expect("wait")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PKI, a master target and a process server in one temporary folder.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub datastore: PathBuf,
    pub target: Service,
    pub relay: Service,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// Starts a cluster whose master target gets `target_args` in addition.
    pub fn start_with(target_args: &[&str]) -> Cluster {
        Cluster::start_full(target_args, &[])
    }

    /// Starts a cluster with extra arguments for the master target and the process server.
    pub fn start_full(target_args: &[&str], relay_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = dir.path().join("pki");
        make_pki(&pki);
        // A `--datastore` among `target_args` replaces the default one.
        let datastore = match target_args.iter().position(|a| *a == "--datastore") {
            Some(i) => PathBuf::from(target_args[i + 1]),
            None => dir.path().join("datastore"),
        };
        std::fs::create_dir_all(&datastore).expect("datastore folder");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--datastore",
            datastore.to_str().unwrap(),
            "--pki",
            pki.to_str().unwrap(),
        ];
        let mut extra = target_args.iter();
        while let Some(arg) = extra.next() {
            if *arg == "--datastore" {
                extra.next();
            } else {
                args.push(arg);
            }
        }
        let target = Service::start(
            "deltaback-master-target",
            &args,
            dir.path().join("master-target.log"),
        );
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--master-target",
            &target.addr,
            "--pki",
            pki.to_str().unwrap(),
        ];
        args.extend_from_slice(relay_args);
        let relay = Service::start(
            "deltaback-process-server",
            &args,
            dir.path().join("process-server.log"),
        );
        Cluster {
            dir,
            pki,
            datastore,
            target,
            relay,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `deltaback-agent sync --json` for `machine` with `disks` (PATH=ID specs).
    pub fn sync<S: AsRef<str>>(&self, machine: &str, disks: &[S]) -> Result<Value, String> {
        self.sync_with(machine, disks, &self.pki, &[])
    }

    pub fn sync_with<S: AsRef<str>>(
        &self,
        machine: &str,
        disks: &[S],
        pki: &Path,
        extra: &[&str],
    ) -> Result<Value, String> {
        let out = self
            .agent(&self.relay.addr, machine, disks, pki, extra)
            .output()
            .expect("run agent");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).expect("agent prints JSON"))
    }

    /// Runs the operator CLI `deltaback ARGS --datastore DATASTORE`: stdout, or stderr on failure.
    pub fn operator(&self, args: &[&str]) -> Result<String, String> {
        stdout_or_stderr(
            Command::new(bin("deltaback"))
                .args(args)
                .arg("--datastore")
                .arg(&self.datastore),
        )
    }

    /// Runs the operator CLI against the running master target over TLS:
    /// `deltaback ARGS --master-target ADDR --pki PKI`; stdout, or stderr on failure.
    pub fn remote(&self, pki: &Path, args: &[&str]) -> Result<String, String> {
        stdout_or_stderr(
            Command::new(bin("deltaback"))
                .args(args)
                .args(["--master-target", &self.target.addr])
                .arg("--pki")
                .arg(pki),
        )
    }

    /// Runs an operator command that must succeed and print a JSON array.
    pub fn operator_list(&self, args: &[&str]) -> Vec<Value> {
        let text = self
            .operator(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match serde_json::from_str::<Value>(&text).unwrap() {
            Value::Array(items) => items,
            other => panic!("{args:?} printed {other}, not a list"),
        }
    }

    /// `deltaback points --json` of `machine`, newest first.
    pub fn points(&self, machine: &str) -> Vec<Value> {
        self.operator_list(&["points", "--json", "--machine", machine])
    }

    /// Recovers `point` of `machine` into a fresh folder; returns the folder.
    pub fn recover(&self, machine: &str, point: &str) -> Result<PathBuf, String> {
        let out = self.path(&format!("recovered-{machine}-{point}"));
        let output = out.to_str().unwrap();
        self.operator(&[
            "recover",
            "--machine",
            machine,
            "--point",
            point,
            "--output",
            output,
        ])?;
        Ok(out)
    }

    /// The `deltaback-agent sync --json` command line, not started.
    pub fn agent<S: AsRef<str>>(
        &self,
        server: &str,
        machine: &str,
        disks: &[S],
        pki: &Path,
        extra: &[&str],
    ) -> Command {
        let mut cmd = Command::new(bin("deltaback-agent"));
        cmd.args(["sync", "--json", "--server", server, "--machine", machine])
            .arg("--pki")
            .arg(pki)
            .args(extra)
            .env("RUST_LOG", "warn");
        for d in disks {
            cmd.args(["--disk", d.as_ref()]);
        }
        cmd
    }

    /// Starts `deltaback-agent sync --json` through the process server with quick retries,
    /// its output captured (stderr dropped unless `keep_stderr`).
    pub fn spawn_agent<S: AsRef<str>>(
        &self,
        machine: &str,
        disks: &[S],
        keep_stderr: bool,
    ) -> std::process::Child {
        self.agent(&self.relay.addr, machine, disks, &self.pki, FAST_RETRY)
            .stdout(Stdio::piped())
            .stderr(if keep_stderr {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start agent")
    }

    pub fn vmdk(&self, machine: &str, id: &str) -> PathBuf {
        self.datastore.join(machine).join(format!("{id}.vmdk"))
    }

    pub fn extent(&self, machine: &str, id: &str) -> PathBuf {
        self.datastore.join(machine).join(format!("{id}-flat.vmdk"))
    }
}

/// A `size`-byte mixed image replicated as disk0 of `machine` through `points` points,
/// `change` of its blocks (64 KiB) changed before each point after the first; the image
/// and copies of it at each point.
pub fn replicate_points(
    cluster: &Cluster,
    machine: &str,
    size: u64,
    points: u64,
    change: f64,
) -> (PathBuf, Vec<PathBuf>) {
    let image = cluster.path(&format!("{machine}.img"));
    engine::sample::write_mixed_image(&image, size, 7).unwrap();
    let disk = format!("{}=disk0", image.display());
    let mut copies = Vec::new();
    for round in 0..points {
        if round > 0 {
            engine::sample::change_blocks(&image, 65536, change, round).unwrap();
        }
        let report = cluster.sync(machine, &[&disk]).unwrap();
        assert_eq!(report["point"]["seq"], round + 1);
        let copy = cluster.path(&format!("{machine}-at-{}", round + 1));
        std::fs::copy(&image, &copy).unwrap();
        copies.push(copy);
    }
    (image, copies)
}

/// Runs `cmd`: its stdout if it succeeded, else its stderr.
fn stdout_or_stderr(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().expect("run the command");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn make_pki(dir: &Path) {
    let out = Command::new(bin("deltaback"))
        .args(["pki", "init", "--dir"])
        .arg(dir)
        .output()
        .expect("run deltaback pki init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of a raw image against a VMDK: true when identical.
pub fn qemu_img_same(raw: &Path, vmdk: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vmdk"])
        .arg(raw)
        .arg(vmdk)
        .output()
        .expect("qemu-img must be installed (apt install qemu-utils)");
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
    out.status.success()
}

/// Bytes of `path` actually allocated on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Number of non-zero bytes' blocks in a file, times the block size: the data a
/// fully sparse copy must hold.
pub fn nonzero_block_bytes(path: &Path, block: usize) -> u64 {
    let data = std::fs::read(path).expect("read");
    data.chunks(block)
        .filter(|c| c.iter().any(|&b| b != 0))
        .map(|c| c.len() as u64)
        .sum()
}

/// The JSON report's first disk.
pub fn disk0(report: &Value) -> &Value {
    &report["disks"][0]
}

/// Writes `size` bytes of incompressible data.
pub fn random_image(path: &Path, size: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; size];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(path, data).unwrap();
}

/// A small tmpfs mounted for one test, unmounted when dropped (the tests run as root).
pub struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    pub fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(path.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Waits for an agent spawned with its stderr kept and checks that it succeeded after
/// logging `cause` and a retry.
pub fn assert_succeeded_after_retrying(agent: std::process::Child, cause: &str) {
    let out = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(cause) && stderr.contains("retry"),
        "{stderr}"
    );
}

/// Agent flags for tests: retry quickly, for up to a minute.
pub const FAST_RETRY: &[&str] = &["--retry-delay", "50ms", "--retry-for", "60s"];

/// Runs a command that must succeed (its stderr is the failure message); returns its stdout.
pub fn stdout_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must succeed and print JSON.
pub fn run_ok(cmd: &mut Command) -> Value {
    serde_json::from_str(&stdout_ok(cmd)).unwrap()
}

/// A loop device over an image, detached when dropped (the tests run as root).
pub struct LoopDevice(pub String);

impl LoopDevice {
    /// Attaches `image` read-only.
    pub fn attach(image: &Path) -> LoopDevice {
        LoopDevice::attach_with(image, &["--read-only"])
    }

    /// Attaches `image` for reading and writing.
    pub fn attach_writable(image: &Path) -> LoopDevice {
        LoopDevice::attach_with(image, &[])
    }

    fn attach_with(image: &Path, flags: &[&str]) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .args(flags)
            .arg(image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}
