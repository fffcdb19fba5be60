//! Mistakes look like mistakes: machine-bound certificates, names and folders checked when
//! certificates are issued, labels, unknown machines, an empty datastore, a closed pipe.

use std::io::Read;
use std::process::{Command, Stdio};

use engine::sample::write_mixed_image;

use crate::hostile::still_serving;
use crate::util::{bin, disk0, Cluster};

fn pki(args: &[&str]) -> std::process::Output {
    Command::new(bin("deltaback"))
        .arg("pki")
        .args(args)
        .output()
        .unwrap()
}

/// Issues an agent certificate for `machine` into a new folder; returns it and its serial.
fn issue_agent(cluster: &Cluster, machine: &str) -> (std::path::PathBuf, String) {
    let out_dir = cluster.path(&format!("{machine}-pki"));
    let out = pki(&[
        "issue",
        "--dir",
        cluster.pki.to_str().unwrap(),
        "--role",
        "agent",
        "--name",
        machine,
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serial = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned();
    (out_dir, serial)
}

#[test]
fn an_agent_certificate_issued_for_one_machine_speaks_only_for_it() {
    let cluster = Cluster::start();
    let image = cluster.path("x.img");
    write_mixed_image(&image, 1 << 20, 4).unwrap();
    let disk = [format!("{}=disk0", image.display())];
    let (web01, _) = issue_agent(&cluster, "web01");

    let report = cluster.sync_with("web01", &disk, &web01, &[]).unwrap();
    assert!(disk0(&report)["blocks_sent"].as_u64().unwrap() > 0);
    let err = cluster
        .sync_with("db01", &disk, &web01, &["--retry-for", "0s"])
        .unwrap_err();
    assert!(err.contains("belongs to machine web01"), "{err}");
    assert!(!cluster.datastore.join("db01").exists());
    // The fleet certificate of `pki init` still speaks for any machine.
    cluster.sync("db01", &disk).unwrap();
    still_serving(&cluster);
}

#[test]
fn pki_issue_checks_the_name_and_never_overwrites_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    assert!(pki(&["init", "--dir", pki_dir.to_str().unwrap()])
        .status
        .success());
    let fleet = std::fs::read(pki_dir.join("agent.pem")).unwrap();
    let d = pki_dir.to_str().unwrap();

    let out = pki(&[
        "issue", "--dir", d, "--role", "agent", "--name", "web01", "--out", d,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PKI folder itself"));
    assert_eq!(std::fs::read(pki_dir.join("agent.pem")).unwrap(), fleet);

    let target = dir.path().join("x");
    let t = target.to_str().unwrap();
    for bad in ["../evil", "a b", "", ".hidden"] {
        let out = pki(&[
            "issue", "--dir", d, "--role", "agent", "--name", bad, "--out", t,
        ]);
        assert!(!out.status.success(), "{bad:?} accepted");
    }
    let out = pki(&[
        "issue", "--dir", d, "--role", "agent", "--name", "web01", "--out", t,
    ]);
    assert!(out.status.success());
    let first = std::fs::read(target.join("agent.pem")).unwrap();
    let out = pki(&[
        "issue", "--dir", d, "--role", "agent", "--name", "web02", "--out", t,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never overwrites"));
    assert_eq!(std::fs::read(target.join("agent.pem")).unwrap(), first);
}

#[test]
fn labels_unknown_machines_and_an_empty_datastore_are_clear_errors() {
    let cluster = Cluster::start();
    // An empty datastore has no recent point.
    let err = cluster
        .operator(&["status", "--max-age", "15m"])
        .unwrap_err();
    assert!(err.contains("no machine"), "{err}");

    let image = cluster.path("x.img");
    write_mixed_image(&image, 1 << 20, 6).unwrap();
    let disk = [format!("{}=disk0", image.display())];
    let long = "x".repeat(200);
    for bad in [long.as_str(), "two\nlines"] {
        let err = cluster
            .sync_with("m1", &disk, &cluster.pki, &["--label", bad])
            .unwrap_err();
        assert!(err.contains("label"), "{err}");
    }
    cluster
        .sync_with("m1", &disk, &cluster.pki, &["--label", "before upgrade"])
        .unwrap();

    let err = cluster
        .operator(&["points", "--machine", "m2"])
        .unwrap_err();
    assert!(
        err.contains("unknown machine m2") && err.contains("m1"),
        "{err}"
    );
    let err = cluster
        .operator(&[
            "recover",
            "--machine",
            "m2",
            "--output",
            cluster.path("out").to_str().unwrap(),
        ])
        .unwrap_err();
    assert!(err.contains("unknown machine m2"), "{err}");
    assert!(cluster
        .operator(&["points", "--machine", "m1"])
        .unwrap()
        .contains("before upgrade"));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let cluster = Cluster::start();
    let image = cluster.path("x.img");
    write_mixed_image(&image, 1 << 20, 8).unwrap();
    for i in 0..3 {
        let disk = [format!("{}=disk{i}", image.display())];
        cluster.sync("m1", &disk).unwrap();
    }
    let mut child = Command::new(bin("deltaback"))
        .args(["points", "--machine", "m1", "--datastore"])
        .arg(&cluster.datastore)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the command writes.
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.code().is_some(), "killed by a signal: {status:?}");
}

#[test]
fn a_crl_that_is_not_the_cas_stops_the_service_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let datastore = dir.path().join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    let ours = dir.path().join("pki");
    let theirs = dir.path().join("other-pki");
    for p in [&ours, &theirs] {
        assert!(pki(&["init", "--dir", p.to_str().unwrap()])
            .status
            .success());
    }
    // A real CRL, but from another CA.
    let issued = theirs.join("x");
    assert!(pki(&[
        "issue",
        "--dir",
        theirs.to_str().unwrap(),
        "--role",
        "agent",
        "--name",
        "x",
        "--out",
        issued.to_str().unwrap(),
    ])
    .status
    .success());
    let serial = std::fs::read_to_string(theirs.join("issued.txt")).unwrap();
    let serial = serial.split_whitespace().next().unwrap().to_owned();
    assert!(pki(&[
        "revoke",
        "--dir",
        theirs.to_str().unwrap(),
        "--serial",
        &serial
    ])
    .status
    .success());
    let start = || {
        Command::new(bin("deltaback-master-target"))
            .args(["--listen", "127.0.0.1:0", "--pki"])
            .arg(&ours)
            .arg("--datastore")
            .arg(&datastore)
            .output()
            .unwrap()
    };
    for (what, crl) in [
        (
            "another CA's list",
            std::fs::read(theirs.join("crl.pem")).unwrap(),
        ),
        ("no list at all", b"# nothing here\n".to_vec()),
    ] {
        std::fs::write(ours.join("crl.pem"), crl).unwrap();
        let out = start();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started anyway");
        assert!(err.contains("crl.pem"), "{what}: {err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    }
}

#[test]
fn sighup_reloads_the_crl_instead_of_killing_the_service() {
    let cluster = Cluster::start();
    let image = cluster.path("x.img");
    write_mixed_image(&image, 1 << 20, 12).unwrap();
    let disk = [format!("{}=disk0", image.display())];
    let (web01, serial) = issue_agent(&cluster, "web01");
    let dir = cluster.pki.to_str().unwrap();
    cluster.sync_with("web01", &disk, &web01, &[]).unwrap();

    assert!(pki(&["revoke", "--dir", dir, "--serial", &serial])
        .status
        .success());
    for service in [&cluster.relay, &cluster.target] {
        let sent = Command::new("kill")
            .args(["-HUP", &service.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        service.wait_for_log("reloaded the PKI folder");
    }
    let err = cluster
        .sync_with("web01", &disk, &web01, &["--retry-for", "0s"])
        .unwrap_err();
    assert!(err.contains("Revoked"), "{err}");
    // Both services are still up and serving.
    still_serving(&cluster);
}

#[test]
fn sighup_reloads_the_crl_the_process_server_checks_the_master_target_with() {
    let cluster = Cluster::start();
    let image = cluster.path("x.img");
    write_mixed_image(&image, 1 << 20, 13).unwrap();
    let disk = [format!("{}=disk0", image.display())];
    cluster.sync("m", &disk).unwrap();

    // The master target's certificate is revoked (stolen, say): once the process server
    // reloads its PKI folder, it no longer talks to whoever presents it.
    let issued = std::fs::read_to_string(cluster.pki.join("issued.txt")).unwrap();
    let serial = issued
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("master-target"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no master target in {issued}"))
        .to_owned();
    let dir = cluster.pki.to_str().unwrap();
    assert!(pki(&["revoke", "--dir", dir, "--serial", &serial])
        .status
        .success());
    let sent = Command::new("kill")
        .args(["-HUP", &cluster.relay.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    cluster
        .relay
        .wait_for_log("new connections to the master target use its CRL");
    let err = cluster
        .sync_with("m", &disk, &cluster.pki, &["--retry-for", "0s"])
        .unwrap_err();
    assert!(err.contains("Revoked"), "{err}");
}
