//! A running master target asked over mutual TLS with an operator certificate: one
//! connection per request, `Operate` then `Answer` (or a streamed recovery).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use engine::block::encoding::BlockDecoder;
use engine::block::geometry::{hash_block, SafeName};
use engine::wire::message::records;
use engine::wire::tls::{ClientConfig, Identity, Role};
use engine::wire::transport::{self, Conn};
use engine::wire::Message;
use master_target::datastore::ReplicaPaths;
use master_target::operator::{RecoverEnd, RecoverStart, Request};
use master_target::retention::recover::RecoveredDisk;

/// A master target reached over TLS.
#[derive(Debug, Clone)]
pub struct Remote {
    addr: String,
    config: Arc<ClientConfig>,
}

impl Remote {
    /// Loads the operator certificate in `pki` for talking to the master target at `addr`.
    pub fn new(addr: &str, pki: &Path) -> anyhow::Result<Self> {
        let identity = Identity::load(pki, Role::Operator).with_context(|| {
            format!(
                "{} needs ca.pem, operator.pem and operator-key.pem (`deltaback pki issue \
                 --role operator --name YOU --out DIR` makes them)",
                pki.display()
            )
        })?;
        Ok(Self {
            addr: addr.to_owned(),
            config: identity.client_config()?,
        })
    }

    /// The host part of the address, for the NBD URIs of a test failover.
    pub fn host(&self) -> &str {
        match self.addr.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => &self.addr,
        }
    }

    fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    }

    async fn open(&self, request: &Request) -> anyhow::Result<Conn> {
        let mut conn = transport::connect(&self.addr, self.config.clone(), Role::MasterTarget)
            .await
            .with_context(|| format!("cannot reach the master target at {}", self.addr))?;
        conn.send(&Message::Operate {
            request: serde_json::to_string(request)?,
        })
        .await?;
        Ok(conn)
    }

    /// Asks `request`; the master target's JSON answer.
    pub fn call(&self, request: &Request) -> anyhow::Result<serde_json::Value> {
        Self::runtime()?.block_on(async {
            let mut conn = self.open(request).await?;
            let answer = match conn.recv().await? {
                Message::Answer { body } => body,
                other => bail!("the master target answered with {}", other.name()),
            };
            let _ = conn.send(&Message::Bye).await;
            conn.close().await;
            serde_json::from_str(&answer).context("the master target's answer is not JSON")
        })
    }

    /// Recovers `machine` at `point` into the empty folder `output`: the point's blocks
    /// travel (zero blocks stay holes), each checked against its blake3.
    pub fn recover(
        &self,
        machine: &str,
        point: &str,
        output: &Path,
    ) -> anyhow::Result<(RecoverStart, RecoverEnd, Vec<RecoveredDisk>)> {
        let machine_name = SafeName::new("machine name", machine)?;
        let request = Request::Recover {
            machine: machine.to_owned(),
            point: point.to_owned(),
        };
        std::fs::create_dir_all(output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        let mut created: Vec<PathBuf> = Vec::new();
        let result = Self::runtime()?.block_on(async {
            let mut conn = self.open(&request).await?;
            let start: RecoverStart = match conn.recv().await? {
                Message::Answer { body } => serde_json::from_str(&body)?,
                other => bail!("the master target answered with {}", other.name()),
            };
            let mut files = Vec::new();
            for disk in &start.disks {
                let id = SafeName::new("disk id", &disk.id)?;
                let names = ReplicaPaths::new(output, &machine_name, &id);
                let extent = output.join(names.extent.file_name().unwrap_or_default());
                let descriptor = output.join(names.descriptor.file_name().unwrap_or_default());
                if extent.exists() || descriptor.exists() {
                    bail!(
                        "{} already exists; recover into an empty folder",
                        descriptor.display()
                    );
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&extent)
                    .with_context(|| format!("cannot create {}", extent.display()))?;
                created.push(extent.clone());
                file.set_len(disk.size)?;
                files.push((file, extent, descriptor));
            }
            let mut decoder = BlockDecoder::new()?;
            let mut data = Vec::new();
            let end: RecoverEnd = loop {
                match conn.recv().await? {
                    Message::Blocks {
                        handle,
                        count,
                        records: batch,
                        ..
                    } => {
                        let place = handle as usize;
                        let (Some(disk), Some((file, extent, _))) =
                            (start.disks.get(place), files.get(place))
                        else {
                            bail!("the master target sent blocks of an unknown disk {handle}");
                        };
                        write_blocks(disk, file, extent, count, &batch, &mut decoder, &mut data)?;
                    }
                    Message::Answer { body } => break serde_json::from_str(&body)?,
                    other => bail!("the master target sent {} during a recovery", other.name()),
                }
            };
            let _ = conn.send(&Message::Bye).await;
            conn.close().await;
            let mut disks = Vec::new();
            for ((file, extent, descriptor), disk) in files.into_iter().zip(&start.disks) {
                file.sync_all()
                    .with_context(|| format!("cannot fsync {}", extent.display()))?;
                master_target::vmdk::write_descriptor(output, &descriptor, &extent, disk.size)?;
                created.push(descriptor.clone());
                disks.push(RecoveredDisk {
                    id: disk.id.clone(),
                    size: disk.size,
                    blocks_restored: 0,
                    vmdk: descriptor,
                });
            }
            Ok((start, end, disks))
        });
        if result.is_err() {
            // Nothing is left that cannot be proven: no half-recovered disk.
            for path in &created {
                let _ = std::fs::remove_file(path);
            }
        }
        result
    }
}

/// Writes one `Blocks` batch of a recovery into `file`, each block checked against its
/// hash and the disk's bounds.
fn write_blocks(
    disk: &master_target::operator::RecoverDisk,
    file: &File,
    extent: &Path,
    count: u32,
    batch: &bytes::Bytes,
    decoder: &mut BlockDecoder,
    data: &mut Vec<u8>,
) -> anyhow::Result<()> {
    for record in records(count, batch) {
        let record = record?;
        let offset = record
            .index
            .checked_mul(disk.block_size)
            .filter(|&o| o < disk.size)
            .with_context(|| {
                format!("block {} is past the end of disk {}", record.index, disk.id)
            })?;
        let len = usize::try_from(disk.block_size.min(disk.size - offset))?;
        decoder.decode(record.encoding, &record.payload, len, data)?;
        if hash_block(data) != record.hash {
            bail!(
                "block {} of disk {} does not match its blake3 hash",
                record.index,
                disk.id
            );
        }
        file.write_all_at(data, offset)
            .with_context(|| format!("cannot write {}", extent.display()))?;
    }
    Ok(())
}
