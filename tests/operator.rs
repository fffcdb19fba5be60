//! The operator API over mutual TLS (`--master-target HOST:PORT --pki DIR`), and test
//! failover over NBD while replication goes on.

use std::path::{Path, PathBuf};
use std::process::Command;

use engine::sample::{change_blocks, write_mixed_image};
use serde_json::Value;

use crate::util::{bin, qemu_img_same, replicate_points, Cluster};

const MIB: u64 = 1 << 20;
const BLOCK: u32 = 65536;

/// A 16 MiB machine replicated through `points` points (see [`replicate_points`]).
fn replicated(
    cluster: &Cluster,
    machine: &str,
    points: u64,
    change: f64,
) -> (PathBuf, Vec<PathBuf>) {
    replicate_points(cluster, machine, 16 * MIB, points, change)
}

/// An operator certificate for `name` in a PKI folder of its own.
fn operator_pki(cluster: &Cluster, name: &str) -> PathBuf {
    let out = cluster.path(&format!("pki-{name}"));
    let status = Command::new(bin("deltaback"))
        .args([
            "pki", "issue", "--role", "operator", "--name", name, "--dir",
        ])
        .arg(&cluster.pki)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    out
}

/// `qemu-img compare` of a raw image against an NBD export.
fn same_as_export(raw: &Path, uri: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(raw)
        .arg(uri)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// `qemu-io -f raw -c COMMAND URI`: success.
fn qemu_io(uri: &str, command: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, uri])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // qemu-io exits 0 even when a pattern check fails; it says so on stdout.
    out.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("failed")
}

#[test]
fn an_operator_on_another_host_reads_recovers_and_fails_over_over_mutual_tls_named_in_the_log() {
    let cluster = Cluster::start();
    let (_, copies) = replicated(&cluster, "web", 3, 0.10);
    let alice = operator_pki(&cluster, "alice");

    // Read-only commands answer the same over TLS as on the datastore's host.
    let local: Value = serde_json::from_str(
        &cluster
            .operator(&["points", "--json", "--machine", "web"])
            .unwrap(),
    )
    .unwrap();
    let remote: Value = serde_json::from_str(
        &cluster
            .remote(&alice, &["points", "--json", "--machine", "web"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(local, remote);
    assert_eq!(remote.as_array().unwrap().len(), 3);
    let status: Value =
        serde_json::from_str(&cluster.remote(&alice, &["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status[0]["machine"], "web");
    assert_eq!(status[0]["points"], 3);
    let typo = cluster
        .remote(&alice, &["points", "--machine", "wbe"])
        .unwrap_err();
    assert!(
        typo.contains("unknown machine wbe") && typo.contains("web"),
        "{typo}"
    );

    // A remote recovery: the point's blocks travel, checked, into a local folder.
    let output = cluster.path("recovered-remote");
    cluster
        .remote(
            &alice,
            &[
                "recover",
                "--machine",
                "web",
                "--point",
                "2",
                "--output",
                output.to_str().unwrap(),
            ],
        )
        .unwrap();
    assert!(qemu_img_same(&copies[1], &output.join("disk0.vmdk")));
    // Not into a folder that holds the disk already.
    let again = cluster
        .remote(
            &alice,
            &[
                "recover",
                "--machine",
                "web",
                "--output",
                output.to_str().unwrap(),
            ],
        )
        .unwrap_err();
    assert!(again.contains("already exists"), "{again}");
    assert!(qemu_img_same(&copies[1], &output.join("disk0.vmdk")));

    // A failover run from the operator's host is a job on the master target, by alice.
    let out = cluster
        .remote(
            &alice,
            &["failover", "--json", "--machine", "web", "--point", "1"],
        )
        .unwrap();
    let record: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["state"], "failed-over");
    assert_eq!(record["point"], 1);
    assert!(qemu_img_same(&copies[0], &cluster.vmdk("web", "disk0")));
    let jobs: Value =
        serde_json::from_str(&cluster.remote(&alice, &["jobs", "--json"]).unwrap()).unwrap();
    let job = jobs.as_array().unwrap().last().unwrap();
    assert_eq!(job["kind"], "failover");
    assert_eq!(job["operator"], "alice");
    assert_eq!(job["state"], "succeeded");
    // The master target ran it and logged who asked what.
    let log = cluster.target.wait_for_log("job ended");
    assert!(
        log.lines().any(|l| l.contains("operator request")
            && l.contains("alice")
            && l.contains("failover")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("operator request") && l.contains("alice") && l.contains("points")),
        "{log}"
    );

    // A plan with a script, sent over TLS: refused by a master target not started with
    // --allow-plan-scripts, before anything fails over.
    let plan = cluster.path("plan.toml");
    let touched = cluster.path("script-ran");
    std::fs::write(
        &plan,
        format!(
            "[[group]]\nname = \"g\"\nmachines = [\"web\"]\nscript = \"touch {}\"\n",
            touched.display()
        ),
    )
    .unwrap();
    let refused = cluster
        .remote(&alice, &["failover", "--plan", plan.to_str().unwrap()])
        .unwrap_err();
    assert!(refused.contains("--allow-plan-scripts"), "{refused}");
    assert!(!touched.exists());

    // Certificates of other roles are refused as operators, and an operator certificate
    // is refused by the process server.
    let posing = cluster.path("agent-as-operator");
    std::fs::create_dir_all(&posing).unwrap();
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("agent.pem", "operator.pem"),
        ("agent-key.pem", "operator-key.pem"),
    ] {
        std::fs::copy(cluster.pki.join(from), posing.join(to)).unwrap();
    }
    let refused = cluster.remote(&posing, &["status"]).unwrap_err();
    assert!(
        refused.contains("accepts only process-server and operator certificates"),
        "{refused}"
    );
    let out = Command::new(bin("deltaback"))
        .args(["status", "--master-target", &cluster.relay.addr, "--pki"])
        .arg(&alice)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let missing = cluster
        .remote(&cluster.path("no-such-pki"), &["status"])
        .unwrap_err();
    assert!(missing.contains("operator.pem"), "{missing}");
}

#[test]
fn a_test_failover_serves_a_point_over_nbd_while_replication_goes_on() {
    let cluster = Cluster::start_with(&["--nbd-listen", "127.0.0.1:0"]);
    let (image, copies) = replicated(&cluster, "app", 3, 0.10);
    let disk = format!("{}=disk0", image.display());
    let bob = operator_pki(&cluster, "bob");

    // Served by the running master target only.
    let local = cluster
        .operator(&["failover", "--test", "--machine", "app", "--point", "2"])
        .unwrap_err();
    assert!(local.contains("--master-target"), "{local}");

    let out = cluster
        .remote(
            &bob,
            &[
                "failover",
                "--test",
                "--json",
                "--machine",
                "app",
                "--point",
                "2",
            ],
        )
        .unwrap();
    let served: Value = serde_json::from_str(&out).unwrap();
    let uri = served["uris"][0].as_str().unwrap().to_owned();
    assert!(
        uri.starts_with(&format!(
            "nbd://{}/app-disk0-",
            cluster.target.nbd.as_ref().unwrap()
        )),
        "{uri}"
    );
    assert!(same_as_export(&copies[1], &uri));
    // libnbd reads it too.
    let info = Command::new("nbdinfo")
        .args(["--json", &uri])
        .output()
        .expect("nbdinfo must be installed (apt install libnbd-bin)");
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 16 * MIB);

    // Replication goes on: new points, one made while the export is read.
    change_blocks(&image, BLOCK, 0.30, 11).unwrap();
    let agent = cluster.spawn_agent("app", &[&disk], false);
    for _ in 0..3 {
        assert!(same_as_export(&copies[1], &uri));
    }
    assert!(agent.wait_with_output().unwrap().status.success());
    change_blocks(&image, BLOCK, 0.30, 12).unwrap();
    cluster.sync("app", &[&disk]).unwrap();
    assert!(same_as_export(&copies[1], &uri));
    assert_eq!(cluster.points("app").len(), 5);
    // Replication was not disturbed: the replica is the source now.
    assert!(qemu_img_same(&image, &cluster.vmdk("app", "disk0")));

    // The test VM writes; its writes stay in the test, never in the replica.
    assert!(qemu_io(&uri, "write -P 0xab 65536 131072"));
    assert!(qemu_io(&uri, "read -P 0xab 65536 131072"));
    assert!(!same_as_export(&copies[1], &uri));
    assert!(qemu_img_same(&image, &cluster.vmdk("app", "disk0")));

    // A real failover waits for the test to end.
    let refused = cluster
        .remote(&bob, &["failover", "--machine", "app", "--point", "2"])
        .unwrap_err();
    assert!(refused.contains("--test --cleanup"), "{refused}");

    // A restarted master target serves the same test, with the test VM's writes.
    let mut cluster = cluster;
    cluster.target.crash_and_restart();
    cluster.target.wait_for_log("test failover served again");
    assert!(qemu_io(&uri, "read -P 0xab 65536 131072"));
    // An unknown export name is refused.
    let guessed = format!("nbd://{}/app-disk0", cluster.target.nbd.as_ref().unwrap());
    assert!(!qemu_io(&guessed, "read 0 4096"));

    // Cleanup ends the export and removes the scratch; failover is allowed again.
    cluster
        .remote(
            &bob,
            &["failover", "--test", "--cleanup", "--machine", "app"],
        )
        .unwrap();
    assert!(!qemu_io(&uri, "read 0 4096"));
    assert!(!cluster
        .datastore
        .join(".retention/app/test-failover")
        .exists());
    let out = cluster
        .remote(
            &bob,
            &["failover", "--json", "--machine", "app", "--point", "2"],
        )
        .unwrap();
    let record: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["point"], 2);
    assert!(qemu_img_same(&copies[1], &cluster.vmdk("app", "disk0")));
}

#[test]
fn a_master_target_killed_during_a_remote_failover_shows_it_interrupted_and_finishes_it_exactly() {
    let mut cluster = Cluster::start();
    let (image, copies) = replicate_points(&cluster, "db", 128 * MIB, 2, 0.60);
    let carol = operator_pki(&cluster, "carol");
    let mut failing_over = Command::new(bin("deltaback"))
        .args(["failover", "--machine", "db", "--point", "1"])
        .args(["--master-target", &cluster.target.addr, "--pki"])
        .arg(&carol)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the fence is down and the rollback has begun.
    let fence = cluster.datastore.join(".retention/db/failover.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&fence).is_ok_and(|t| t.contains("rolling-back")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the failover never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    cluster.target.kill();
    assert!(!failing_over.wait().unwrap().success());
    cluster.target.restart();

    let jobs: Value =
        serde_json::from_str(&cluster.remote(&carol, &["jobs", "--json"]).unwrap()).unwrap();
    let job = jobs.as_array().unwrap().last().unwrap().clone();
    assert_eq!(job["state"], "interrupted", "{job}");
    assert_eq!(job["operator"], "carol");
    let shown = cluster
        .remote(&carol, &["job", job["id"].as_str().unwrap(), "--follow"])
        .unwrap_err();
    assert!(shown.contains("run the same command again"), "{shown}");
    // The agent stays fenced meanwhile.
    let refused = cluster
        .sync_with(
            "db",
            &[format!("{}=disk0", image.display())],
            &cluster.pki,
            &["--retry-for", "0s"],
        )
        .unwrap_err();
    assert!(refused.contains("failed over to point 1"), "{refused}");

    // Run again: it finishes the failover it fenced, exactly.
    let out = cluster
        .remote(
            &carol,
            &["failover", "--json", "--machine", "db", "--point", "latest"],
        )
        .unwrap();
    let record: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["state"], "failed-over");
    assert_eq!(record["point"], 1);
    assert!(qemu_img_same(&copies[0], &cluster.vmdk("db", "disk0")));
}

/// Bytes the process `pid` has read through system calls so far.
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_remote_recovery_of_a_huge_sparse_disk_reads_and_sends_its_data_only() {
    let cluster = Cluster::start();
    // 64 GiB holding 4 MiB of data, changed once after the first point.
    let image = cluster.path("sparse.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let piece = cluster.path("piece.img");
    write_mixed_image(&piece, 4 * MIB, 9).unwrap();
    let data = std::fs::read(&piece).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &data, 20 << 30).unwrap();
    let disk = format!("{}=disk0", image.display());
    cluster.sync("big", &[&disk]).unwrap();
    let at_1 = cluster.path("big-at-1.img");
    Command::new("cp")
        .args(["--sparse=always"])
        .arg(&image)
        .arg(&at_1)
        .status()
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 65536], (20 << 30) + 65536).unwrap();
    cluster.sync("big", &[&disk]).unwrap();

    let dave = operator_pki(&cluster, "dave");
    let before = bytes_read(cluster.target.pid());
    let output = cluster.path("big-recovered");
    cluster
        .remote(
            &dave,
            &[
                "recover",
                "--machine",
                "big",
                "--point",
                "1",
                "--output",
                output.to_str().unwrap(),
            ],
        )
        .unwrap();
    let read = bytes_read(cluster.target.pid()) - before;
    assert!(read < 64 * MIB, "the master target read {read} bytes");
    let extent = output.join("disk0-flat.vmdk");
    assert!(crate::util::allocated_bytes(&extent) <= 8 * MIB);
    assert!(qemu_img_same(&at_1, &output.join("disk0.vmdk")));
}

#[test]
fn hostile_operator_requests_and_nbd_clients_get_clear_errors_and_bounded_costs() {
    use engine::wire::tls::{Identity, Role};
    use engine::wire::transport;
    use engine::wire::Message;
    use std::io::{Read, Write};

    let cluster = Cluster::start_with(&["--nbd-listen", "127.0.0.1:0"]);
    let (_, copies) = replicated(&cluster, "odd", 2, 0.10);

    // Operator requests that are not requests: each refused with why, and the
    // conversation goes on.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = Identity::load(&cluster.pki, Role::Operator)
            .unwrap()
            .client_config()
            .unwrap();
        let mut conn = transport::connect(&cluster.target.addr, config, Role::MasterTarget)
            .await
            .unwrap();
        for (request, expected) in [
            ("not json", "not an operator request"),
            (r#"{"op":"format-disk"}"#, "not an operator request"),
            (
                r#"{"op":"points","machine":"../../etc","group":null}"#,
                "machine name",
            ),
            (r#"{"op":"job","id":"../x"}"#, "is not a job id"),
        ] {
            conn.send(&Message::Operate {
                request: request.to_owned(),
            })
            .await
            .unwrap();
            let err = conn.recv().await.unwrap_err().to_string();
            assert!(err.contains(expected), "{request}: {err}");
        }
        conn.send(&Message::Operate {
            request: r#"{"op":"status"}"#.to_owned(),
        })
        .await
        .unwrap();
        assert!(matches!(conn.recv().await.unwrap(), Message::Answer { .. }));
        // An agent's message on an operator's conversation ends it.
        conn.send(&Message::Flush { handle: 0, seq: 1 })
            .await
            .unwrap();
        let err = conn.recv().await.unwrap_err().to_string();
        assert!(err.contains("unexpected Flush"), "{err}");
    });

    let out = cluster
        .remote(
            &cluster.pki,
            &[
                "failover",
                "--test",
                "--json",
                "--machine",
                "odd",
                "--point",
                "1",
            ],
        )
        .unwrap();
    let served: Value = serde_json::from_str(&out).unwrap();
    let uri = served["uris"][0].as_str().unwrap().to_owned();
    let nbd = cluster.target.nbd.clone().unwrap();
    let greeting = |s: &mut std::net::TcpStream| {
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
    };
    let option = |s: &mut std::net::TcpStream, code: u32, data: &[u8], len: u32| {
        let mut out = b"IHAVEOPT".to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(data);
        s.write_all(&out).unwrap();
    };
    let closed = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        // Closed, or reset (closed with our bytes unread); not still waiting.
        match s.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };
    // An option announcing 1 GiB: closed before anything is allocated.
    let mut s = std::net::TcpStream::connect(&nbd).unwrap();
    greeting(&mut s);
    option(&mut s, 7, &[], 1 << 30);
    assert!(closed(&mut s));
    // Not the option magic: closed.
    let mut s = std::net::TcpStream::connect(&nbd).unwrap();
    greeting(&mut s);
    s.write_all(&[0xff; 16]).unwrap();
    assert!(closed(&mut s));
    // A guessed export name: "unknown", and no export list to guess from.
    let mut s = std::net::TcpStream::connect(&nbd).unwrap();
    greeting(&mut s);
    let name = b"odd-disk0";
    let mut go = (name.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes());
    // An option reply's type, its data read.
    let reply_type = |s: &mut std::net::TcpStream| {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let mut data = vec![0; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut data).unwrap();
        u32::from_be_bytes(head[12..16].try_into().unwrap())
    };
    option(&mut s, 7, &go, go.len() as u32);
    assert_eq!(reply_type(&mut s), (1 << 31) | 6, "unknown export");
    option(&mut s, 3, &[], 0);
    assert_eq!(
        reply_type(&mut s),
        (1 << 31) | 1,
        "listing exports is not supported"
    );
    // A reader past the end of the disk gets an error, and the export still serves.
    assert!(!qemu_io(&uri, &format!("read {} 65536", 16 * MIB)));
    assert!(same_as_export(&copies[0], &uri));
}
