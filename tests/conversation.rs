//! `replicate` keeps one conversation across cycles, and opens a new one after a cut.

use std::io::BufRead;
use std::process::{Command, Stdio};

use engine::sample::{change_blocks, write_mixed_image};
use serde_json::Value;

use crate::util::{bin, qemu_img_same, Cluster};

const MIB: u64 = 1 << 20;

#[test]
fn replicate_keeps_one_conversation_across_cycles_and_reconnects_after_a_cut() {
    let mut cluster = Cluster::start();
    let image = cluster.path("disk0.img");
    write_mixed_image(&image, 4 * MIB, 17).unwrap();
    let mut agent = Command::new(bin("deltaback-agent"))
        .args(["replicate", "--json", "--interval", "1s", "--cycles", "6"])
        .args(["--server", &cluster.relay.addr, "--machine", "kept"])
        .arg("--pki")
        .arg(&cluster.pki)
        .arg("--disk")
        .arg(format!("{}=disk0", image.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(agent.stdout.take().unwrap());
    let mut cycles = Vec::new();
    let mut copies = Vec::new();
    for (i, line) in stdout.lines().enumerate() {
        let report: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let seq = report["point"]["seq"].as_u64().unwrap();
        cycles.push((seq, report["conversation_cycle"].as_u64().unwrap()));
        // The source as this point holds it, then the guest writes before the next.
        let copy = cluster.path(&format!("at-{seq}"));
        std::fs::copy(&image, &copy).unwrap();
        copies.push((seq, copy));
        change_blocks(&image, 65536, 0.05, 200 + i as u64).unwrap();
        if i == 2 {
            // The connection is cut between two cycles: the process server dies and
            // comes back on the same address.
            cluster.relay.crash_and_restart();
        }
    }
    assert!(agent.wait().unwrap().success());
    // Three cycles on one conversation, then three on a new one.
    assert_eq!(
        cycles,
        vec![(1, 1), (2, 2), (3, 3), (4, 1), (5, 2), (6, 3)],
        "(point, cycle of its conversation)"
    );
    let log = cluster.target.log_text();
    let sessions = log
        .lines()
        .filter(|l| l.contains("session started") && l.contains("kept"))
        .count();
    assert_eq!(sessions, 2, "{log}");
    for (seq, copy) in copies {
        let dir = cluster.recover("kept", &seq.to_string()).unwrap();
        assert!(qemu_img_same(&copy, &dir.join("disk0.vmdk")), "point {seq}");
    }
}
