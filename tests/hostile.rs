//! Hostile or wrong input: each answered with a clear error, the services keep serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use engine::block::encoding::Encoding;
use engine::sample::write_mixed_image;
use engine::wire::message::append_record;
use engine::wire::tls::{server_name, Identity, Role};
use engine::wire::{FrameCodec, Message};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::util::{disk0, make_pki, qemu_img_same, Cluster};

/// A normal sync still works: the services survived whatever came before.
pub(crate) fn still_serving(cluster: &Cluster) {
    let image = cluster.path("healthy.img");
    write_mixed_image(&image, 2 << 20, 99).unwrap();
    let report = cluster
        .sync("healthy", &[format!("{}=disk0", image.display())])
        .expect("services keep serving after bad input");
    assert!(disk0(&report)["blocks_sent"].as_u64().unwrap() > 0);
    assert!(qemu_img_same(&image, &cluster.vmdk("healthy", "disk0")));
}

type Tls = TlsStream<tokio::net::TcpStream>;

/// A hand-driven agent: real TLS with the agent's certificate, frames written by the test.
pub(crate) struct RawAgent {
    rx: FramedRead<ReadHalf<Tls>, FrameCodec>,
    tx: WriteHalf<Tls>,
}

/// A TLS connection to `addr` with the agent's certificate, expecting `server`'s certificate.
async fn connect_as_agent(cluster: &Cluster, addr: &str, server: Role) -> Tls {
    let config = Identity::load(&cluster.pki, Role::Agent)
        .unwrap()
        .client_config()
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(server_name(server).unwrap(), tcp)
        .await
        .unwrap()
}

impl RawAgent {
    pub(crate) async fn connect(cluster: &Cluster) -> RawAgent {
        let tls = connect_as_agent(cluster, &cluster.relay.addr, Role::ProcessServer).await;
        let (r, w) = tokio::io::split(tls);
        RawAgent {
            rx: FramedRead::new(r, FrameCodec),
            tx: w,
        }
    }

    pub(crate) async fn send(&mut self, msg: &Message) {
        let mut w = FramedWrite::new(&mut self.tx, FrameCodec);
        w.send(msg.to_frame()).await.unwrap();
    }

    pub(crate) async fn recv(&mut self) -> Option<Message> {
        match self.rx.next().await {
            Some(Ok(frame)) => Some(Message::from_frame(frame).unwrap()),
            _ => None,
        }
    }

    /// Connects and says Hello as `machine`; returns after Welcome.
    pub(crate) async fn hello(cluster: &Cluster, machine: &str) -> RawAgent {
        let mut agent = RawAgent::connect(cluster).await;
        agent
            .send(&Message::Hello {
                min_version: engine::wire::PROTOCOL_VERSION,
                max_version: engine::wire::PROTOCOL_VERSION,
                machine: machine.into(),
            })
            .await;
        assert!(matches!(
            agent.recv().await,
            Some(Message::Welcome {
                version: engine::wire::PROTOCOL_VERSION
            })
        ));
        agent
    }

    /// Hello, then OpenDisk of a fresh 1 MiB disk; returns after DiskState.
    pub(crate) async fn open_disk(cluster: &Cluster, machine: &str) -> RawAgent {
        let mut agent = RawAgent::hello(cluster, machine).await;
        agent
            .send(&Message::OpenDisk {
                handle: 0,
                id: "disk0".into(),
                size: 1 << 20,
                block_size: 65536,
            })
            .await;
        assert!(matches!(agent.recv().await, Some(Message::DiskState(_))));
        agent
    }

    /// Reads until an Error message arrives and returns its text.
    pub(crate) async fn error_text(&mut self) -> String {
        while let Some(msg) = self.recv().await {
            if let Message::Error { message, .. } = msg {
                return message;
            }
        }
        panic!("connection closed without an Error message");
    }
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

pub(crate) fn blocks(index: u64, hash: [u8; 32], data: &[u8]) -> Message {
    let mut records = Vec::new();
    append_record(&mut records, index, &hash, |out| {
        out.extend_from_slice(data);
        Encoding::Raw
    });
    Message::Blocks {
        handle: 0,
        seq: 1,
        count: 1,
        records: records.into(),
    }
}

#[test]
fn wrong_certificates_are_refused() {
    let cluster = Cluster::start();
    let image = cluster.path("x.img");
    write_mixed_image(&image, 1 << 20, 1).unwrap();
    let disk = [format!("{}=disk0", image.display())];

    // A certificate from another CA.
    let foreign = cluster.path("foreign-pki");
    make_pki(&foreign);
    let err = cluster.sync_with("x", &disk, &foreign, &[]).unwrap_err();
    assert!(
        err.contains("handshake") && err.contains("invalid peer certificate"),
        "{err}"
    );
    cluster.relay.wait_for_log("refused connection");

    // The right CA, the wrong role: a master-target certificate posing as an agent.
    let posing = cluster.path("posing-pki");
    std::fs::create_dir_all(&posing).unwrap();
    let copy =
        |from: &str, to: &str| std::fs::copy(cluster.pki.join(from), posing.join(to)).unwrap();
    copy("ca.pem", "ca.pem");
    copy("master-target.pem", "agent.pem");
    copy("master-target-key.pem", "agent-key.pem");
    let err = cluster.sync_with("x", &disk, &posing, &[]).unwrap_err();
    assert!(err.contains("accepts only agent certificates"), "{err}");

    // No client certificate at all.
    runtime().block_on(async {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates({
            let mut roots = rustls::RootCertStore::empty();
            use rustls::pki_types::pem::PemObject;
            for c in rustls::pki_types::CertificateDer::pem_file_iter(cluster.pki.join("ca.pem"))
                .unwrap()
            {
                roots.add(c.unwrap()).unwrap();
            }
            roots
        })
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(&cluster.relay.addr)
            .await
            .unwrap();
        let result = async {
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name(Role::ProcessServer).unwrap(), tcp)
                .await?;
            tls.write_all(b"hello").await?;
            tls.flush().await?;
            let mut buf = [0u8; 16];
            tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await
        }
        .await;
        assert!(
            result.is_err() || result.unwrap() == 0,
            "a client without certificate got through"
        );
    });
    cluster.relay.wait_for_log("peer sent no certificates");
    still_serving(&cluster);
}

#[test]
fn a_plaintext_client_is_refused() {
    let cluster = Cluster::start();
    let mut tcp = TcpStream::connect(&cluster.relay.addr).unwrap();
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("200"));
    cluster.relay.wait_for_log("handshake failed");
    still_serving(&cluster);
}

#[test]
fn a_disk_id_with_a_path_is_refused() {
    let cluster = Cluster::start();
    let message = runtime().block_on(async {
        let mut agent = RawAgent::hello(&cluster, "evil").await;
        agent
            .send(&Message::OpenDisk {
                handle: 0,
                id: "../../escape".into(),
                size: 1 << 20,
                block_size: 65536,
            })
            .await;
        agent.error_text().await
    });
    assert!(
        message.contains("disk id") && message.contains("'.'"),
        "{message}"
    );
    assert!(!cluster.dir.path().join("escape-flat.vmdk").exists());
    assert!(!cluster.datastore.join("escape-flat.vmdk").exists());
    // The agent refuses such an id before connecting, too.
    let err = cluster
        .sync(
            "evil",
            &[format!("{}=../x", cluster.path("none.img").display())],
        )
        .unwrap_err();
    assert!(err.contains("disk id"), "{err}");
    still_serving(&cluster);
}

#[test]
fn an_oversized_frame_is_refused_before_allocation() {
    let cluster = Cluster::start();
    let message = runtime().block_on(async {
        let mut agent = RawAgent::connect(&cluster).await;
        let mut header = BytesMut::new();
        header.put_u32(u32::MAX);
        header.put_u8(7);
        agent.tx.write_all(&header).await.unwrap();
        agent.tx.flush().await.unwrap();
        agent.error_text().await
    });
    assert!(message.contains("exceeds the maximum"), "{message}");
    still_serving(&cluster);
}

/// Sends a block far past the end of a 1 MiB disk; the error the agent gets.
fn block_past_the_end(cluster: &Cluster) -> String {
    runtime().block_on(async {
        let mut agent = RawAgent::open_disk(cluster, "past").await;
        let data = vec![5u8; 65536];
        agent
            .send(&blocks(1_000_000, *blake3::hash(&data).as_bytes(), &data))
            .await;
        agent.send(&Message::Flush { handle: 0, seq: 1 }).await;
        agent.error_text().await
    })
}

#[test]
fn a_block_past_the_end_is_refused() {
    let cluster = Cluster::start();
    let message = block_past_the_end(&cluster);
    assert!(message.contains("past the end"), "{message}");
    still_serving(&cluster);
}

fn a_block_whose_hash_does_not_match_is_refused(cluster: &Cluster) {
    let message = runtime().block_on(async {
        let mut agent = RawAgent::open_disk(cluster, "liar").await;
        let data = vec![5u8; 65536];
        agent.send(&blocks(3, [1; 32], &data)).await;
        agent.send(&Message::Flush { handle: 0, seq: 1 }).await;
        agent.error_text().await
    });
    assert!(message.contains("does not match"), "{message}");
    let extent = std::fs::read(cluster.extent("liar", "disk0")).unwrap();
    assert!(extent.iter().all(|&b| b == 0), "the bad block was written");
    still_serving(cluster);
}

#[test]
fn a_block_whose_hash_does_not_match_is_refused_and_not_written() {
    a_block_whose_hash_does_not_match_is_refused(&Cluster::start());
}

#[test]
fn a_spooling_process_server_passes_refusals_on_and_keeps_nothing_to_replay() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cluster = Cluster::start_full(&[], &["--cache", cache.to_str().unwrap()]);
    // A block past the end never reaches the spool.
    let message = block_past_the_end(&cluster);
    assert!(message.contains("past the end"), "{message}");
    // The spool stored the lie and acknowledged the Flush; the master target refuses it,
    // and the agent hears why.
    a_block_whose_hash_does_not_match_is_refused(&cluster);
    let kept: Vec<_> = std::fs::read_dir(cache.join("liar"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert!(
        kept.iter().any(|f| f.ends_with(".rejected"))
            && !kept
                .iter()
                .any(|f| f.ends_with(".seg") || f.ends_with(".open")),
        "the refused segment is kept aside, not replayed: {kept:?}"
    );
}

#[test]
fn a_truncated_stream_is_reported_and_nothing_is_acknowledged() {
    let cluster = Cluster::start();
    runtime().block_on(async {
        let mut agent = RawAgent::open_disk(&cluster, "cut").await;
        let data = vec![9u8; 65536];
        let frame = blocks(0, *blake3::hash(&data).as_bytes(), &data).to_frame();
        let mut wire = BytesMut::new();
        tokio_util::codec::Encoder::encode(&mut FrameCodec, frame, &mut wire).unwrap();
        agent.tx.write_all(&wire[..wire.len() / 2]).await.unwrap();
        agent.tx.shutdown().await.unwrap();
        while agent.recv().await.is_some() {}
    });
    let log = cluster.target.wait_for_log("session failed");
    assert!(log.contains("closed unexpectedly"), "{log}");
    // No manifest claims anything durable for the cut session.
    let manifest = cluster.datastore.join("cut/.deltaback/disk0.manifest");
    let summary = engine::block::manifest::Manifest::summary(&manifest).unwrap();
    assert_eq!(summary.durable_seq, 0);
    still_serving(&cluster);
}

fn deltaback_pki(args: &[&str]) -> String {
    crate::util::stdout_ok(
        std::process::Command::new(crate::util::bin("deltaback"))
            .arg("pki")
            .args(args),
    )
}

#[test]
fn revoked_and_expired_certificates_are_refused() {
    let mut cluster = Cluster::start();
    let image = cluster.path("x.img");
    write_mixed_image(&image, 1 << 20, 4).unwrap();
    let disk = [format!("{}=disk0", image.display())];
    let pki = cluster.pki.to_str().unwrap().to_owned();

    // A per-machine agent certificate works...
    let web01 = cluster.path("web01-pki");
    let issued = deltaback_pki(&[
        "issue",
        "--dir",
        &pki,
        "--role",
        "agent",
        "--name",
        "web01",
        "--out",
        web01.to_str().unwrap(),
    ]);
    let serial = issued.split_whitespace().nth(3).unwrap().to_owned();
    cluster.sync_with("web01", &disk, &web01, &[]).unwrap();

    // ...until it is revoked and the process server reads the new list.
    deltaback_pki(&["revoke", "--dir", &pki, "--serial", &serial]);
    cluster.relay.crash_and_restart();
    let err = cluster
        .sync_with("web01", &disk, &web01, &["--retry-for", "0s"])
        .unwrap_err();
    assert!(err.contains("Revoked"), "{err}");
    cluster.relay.wait_for_log("Revoked");

    // An expired certificate is refused too.
    let old = cluster.path("old-pki");
    deltaback_pki(&[
        "issue",
        "--dir",
        &pki,
        "--role",
        "agent",
        "--name",
        "old",
        "--out",
        old.to_str().unwrap(),
        "--days",
        "0",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let err = cluster
        .sync_with("old", &disk, &old, &["--retry-for", "0s"])
        .unwrap_err();
    assert!(err.contains("Expired"), "{err}");

    // Other agents carry on.
    still_serving(&cluster);
}

#[test]
fn each_service_accepts_only_the_role_that_should_talk_to_it() {
    let cluster = Cluster::start();
    let image = cluster.path("x.img");
    write_mixed_image(&image, 1 << 20, 5).unwrap();
    let disk = [format!("{}=disk0", image.display())];

    // An agent certificate straight to the master target, skipping the process server.
    let out = cluster
        .agent(
            &cluster.target.addr,
            "direct",
            &disk,
            &cluster.pki,
            &["--retry-for", "0s"],
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // The agent expects a process server and the master target's certificate says otherwise.
    assert!(err.contains("invalid peer certificate"), "{err}");

    // A process server certificate posing as an agent.
    let posing = cluster.path("ps-as-agent");
    std::fs::create_dir_all(&posing).unwrap();
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("process-server.pem", "agent.pem"),
        ("process-server-key.pem", "agent-key.pem"),
    ] {
        std::fs::copy(cluster.pki.join(from), posing.join(to)).unwrap();
    }
    let err = cluster
        .sync_with("posing", &disk, &posing, &["--retry-for", "0s"])
        .unwrap_err();
    assert!(err.contains("accepts only agent certificates"), "{err}");

    // An agent certificate presented to the master target by a client that does not check
    // the server's name: the master target itself refuses the role.
    let message = runtime().block_on(async {
        // Ask for the master target by name: the agent certificate is the problem here.
        let tls = connect_as_agent(&cluster, &cluster.target.addr, Role::MasterTarget).await;
        let mut frames = FramedRead::new(tls, FrameCodec);
        match frames.next().await {
            Some(Ok(frame)) => match Message::from_frame(frame).unwrap() {
                Message::Error { message, .. } => message,
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("no error message: {other:?}"),
        }
    });
    assert!(
        message.contains("accepts only process-server and operator certificates"),
        "{message}"
    );
    still_serving(&cluster);
}
