//! Hostile peers cost bounded resources: sequence numbers that jump, huge disks, too many
//! or silent connections, descriptor exhaustion, a second master target on one datastore.
//! Each gets a clear error and the services keep serving.

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::hostile::{blocks, runtime, still_serving, RawAgent};
use crate::util::{bin, Cluster};
use engine::wire::Message;

#[test]
fn sequence_numbers_must_follow_the_durable_one_exactly() {
    let cluster = Cluster::start();
    let text = runtime().block_on(async {
        let mut agent = RawAgent::open_disk(&cluster, "jumper").await;
        let data = vec![7u8; 65536];
        let Message::Blocks {
            handle,
            count,
            records,
            ..
        } = blocks(0, *blake3::hash(&data).as_bytes(), &data)
        else {
            unreachable!()
        };
        // The durable sequence of a fresh disk is 0: the first batch must be 1, not 5.
        agent
            .send(&Message::Blocks {
                handle,
                seq: 5,
                count,
                records,
            })
            .await;
        agent.send(&Message::Flush { handle, seq: 5 }).await;
        agent.error_text().await
    });
    assert!(text.contains("does not follow 0"), "{text}");
    still_serving(&cluster);
}

/// Says Hello as machine `huge` and opens one disk of `size` bytes.
async fn open_huge(cluster: &Cluster, size: u64) -> RawAgent {
    let mut agent = RawAgent::hello(cluster, "huge").await;
    agent
        .send(&Message::OpenDisk {
            handle: 0,
            id: "disk0".into(),
            size,
            block_size: 65536,
        })
        .await;
    agent
}

/// Opens one disk of `size` bytes; returns the error the services answer.
fn refused_open(cluster: &Cluster, size: u64) -> String {
    runtime().block_on(async { open_huge(cluster, size).await.error_text().await })
}

#[test]
fn a_disk_larger_than_the_limit_is_refused_when_opened() {
    let cluster = Cluster::start();
    let text = refused_open(&cluster, 1 << 50); // 1 PiB
    assert!(text.contains("--max-disk-size"), "{text}");
    still_serving(&cluster);
}

/// Peak resident memory of a process, from `/proc/PID/status`.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn a_huge_disk_is_opened_without_its_size_in_memory() {
    let cluster = Cluster::start();
    // 15 TiB (ext4 files stop at 16 TiB): 240 Mi blocks, 7.5 GiB of block hashes that a
    // tree kept in memory would need.
    let size = 15u64 << 40;
    let state = runtime().block_on(async { open_huge(&cluster, size).await.recv().await });
    let Some(Message::DiskState(state)) = state else {
        panic!("expected the disk to open, got {state:?}");
    };
    assert_eq!(state.size, size);
    assert!(state.fresh);
    let peak = peak_rss(cluster.target.pid());
    assert!(peak < 64 << 20, "master target peak RSS {peak} bytes");
    // The replica and its manifest are sparse: nothing of their size is on disk either.
    let used = crate::util::allocated_bytes(&cluster.extent("huge", "disk0"))
        + crate::util::allocated_bytes(&cluster.datastore.join("huge/.deltaback/disk0.manifest"));
    assert!(used < 1 << 20, "{used} bytes allocated");
    still_serving(&cluster);
}

#[test]
fn one_master_target_per_datastore_and_the_datastore_must_be_usable() {
    let cluster = Cluster::start();
    let pki = cluster.pki.to_str().unwrap().to_owned();
    let start = |datastore: &std::path::Path| {
        Command::new(bin("deltaback-master-target"))
            .args(["--listen", "127.0.0.1:0", "--pki", &pki, "--datastore"])
            .arg(datastore)
            .output()
            .unwrap()
    };
    // A second master target on the same datastore stops at once.
    let out = start(&cluster.datastore);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another master target"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));

    // A missing datastore.
    let out = start(&cluster.path("nowhere"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not exist"),
        "{err}"
    );

    // A read-only one.
    let readonly = cluster.path("readonly");
    std::fs::create_dir_all(&readonly).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&readonly)
        .status()
        .unwrap();
    assert!(mounted.success(), "the tests run as root");
    let out = start(&readonly);
    let _ = Command::new("umount").arg(&readonly).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not writable"),
        "{err}"
    );

    still_serving(&cluster);
}

/// True when the server closes a fresh TCP connection within a second, unasked.
fn closed_at_once(addr: &str) -> bool {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 1];
    match tcp.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn connections_per_address_are_capped_and_silent_ones_are_dropped() {
    let cluster = Cluster::start_full(
        &[],
        &["--max-connections-per-address", "2", "--idle-timeout", "2s"],
    );
    // Two silent connections are held (until the TLS handshake times out), the third is
    // closed at once.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&cluster.relay.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(closed_at_once(&cluster.relay.addr));
    cluster.relay.wait_for_log("too many connections");
    drop(held);
    // The server notices the two closed connections and frees their slots.
    std::thread::sleep(Duration::from_secs(1));

    // An agent that says Hello and then nothing is disconnected after the idle timeout.
    let started = Instant::now();
    let end = runtime().block_on(async {
        let mut agent = RawAgent::hello(&cluster, "silent").await;
        agent.recv().await
    });
    let waited = started.elapsed();
    assert!(matches!(end, None | Some(Message::Error { .. })), "{end:?}");
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    cluster.relay.wait_for_log("silent for 2s");
    still_serving(&cluster);
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[test]
fn running_out_of_descriptors_backs_off_instead_of_spinning() {
    let cluster = Cluster::start();
    let pid = cluster.relay.pid();
    // Leave the process server a handful of descriptors, then knock more often than that.
    let limited = Command::new("prlimit")
        .args(["--nofile=24:", "--pid", &pid.to_string()])
        .status()
        .unwrap();
    assert!(limited.success());
    let before = cpu_seconds(pid);
    let mut open = Vec::new();
    for _ in 0..40 {
        if let Ok(tcp) = TcpStream::connect(&cluster.relay.addr) {
            open.push(tcp);
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(pid) - before;
    assert!(used < 1.0, "the process server spun: {used} CPU-s in 3 s");
    let log = cluster.relay.log_text();
    let lines = log.matches("accept failed").count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} accept errors logged:\n{log}"
    );
    drop(open);
    let raised = Command::new("prlimit")
        .args(["--nofile=1024:", "--pid", &pid.to_string()])
        .status()
        .unwrap();
    assert!(raised.success());
    still_serving(&cluster);
}

#[test]
fn one_conversation_opens_a_bounded_number_of_disks() {
    let cluster = Cluster::start();
    let text = runtime().block_on(async {
        let mut agent = RawAgent::hello(&cluster, "many").await;
        for handle in 0..100u32 {
            agent
                .send(&Message::OpenDisk {
                    handle,
                    id: format!("disk{handle}"),
                    size: 1 << 20,
                    block_size: 65536,
                })
                .await;
            match agent.recv().await {
                Some(Message::DiskState(_)) => {}
                Some(Message::Error { message, .. }) => return (handle, message),
                other => panic!("{other:?}"),
            }
        }
        panic!("100 disks opened in one conversation");
    });
    assert_eq!(text.0, 64, "{}", text.1);
    assert!(text.1.contains("disks in one conversation"), "{}", text.1);
    still_serving(&cluster);
}

#[test]
fn one_conversation_per_machine_at_a_time() {
    let cluster = Cluster::start();
    let text = runtime().block_on(async {
        // The first conversation holds the machine (it has opened a disk)...
        let _first = RawAgent::open_disk(&cluster, "twice").await;
        // ...so a second one for the same machine is told it is busy.
        let mut second = RawAgent::connect(&cluster).await;
        second
            .send(&Message::Hello {
                min_version: engine::wire::PROTOCOL_VERSION,
                max_version: engine::wire::PROTOCOL_VERSION,
                machine: "twice".into(),
            })
            .await;
        second.error_text().await
    });
    assert!(text.contains("another conversation"), "{text}");
    still_serving(&cluster);
}

#[test]
fn limits_that_would_refuse_every_client_are_refused_at_start() {
    let cluster = Cluster::start();
    let pki = cluster.pki.to_str().unwrap().to_owned();
    for (flag, value) in [("--idle-timeout", "0s"), ("--max-connections", "0")] {
        let out = Command::new(bin("deltaback-process-server"))
            .args(["--listen", "127.0.0.1:0", "--pki", &pki, "--master-target"])
            .arg(&cluster.target.addr)
            .args([flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} accepted");
        assert!(err.contains(flag), "{err}");
    }
}
