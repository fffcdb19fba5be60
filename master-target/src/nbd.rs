//! An NBD server for test failovers: each exported disk is a recovery point read in place,
//! with the test VM's writes kept in a scratch file ([`crate::retention::test_failover`]).
//!
//! Written by hand: the one Rust NBD crate is an early sketch serving a single
//! `Read + Seek` export without `NBD_OPT_GO`. This is the fixed-newstyle handshake
//! (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`; every other
//! option is answered "unsupported", so clients fall back to simple replies) and the
//! transmission phase's `READ`, `WRITE`, `FLUSH` and `DISC` with simple replies, which
//! `qemu-img`, `qemu-nbd`, `nbdinfo` and QEMU all speak.
//!
//! NBD has no authentication here: an export's name carries 64 random bits and is given
//! only to the operator (over mutual TLS), exports are listed to nobody, and the server
//! listens only where `--nbd-listen` says (a test network). Bounds: 32 connections, a
//! handshake finished within 10 s, options of at most 4 KiB, requests of at most 32 MiB
//! and within the disk; anything else is an error reply or a closed connection.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::retention::test_failover::DiskExport;
use engine::nbd::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
    OPT_REPLY_MAGIC, REP_ACK, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

const CLIENT_NO_ZEROES: u32 = 2;

/// Transmission flags: has flags, can flush; read-write.
const TRANSMISSION_FLAGS: u16 = 1 | 4;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

const MAX_CONNECTIONS: usize = 32;
const MAX_OPTION_LEN: u32 = 4096;
const MAX_REQUEST_LEN: u32 = 32 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One exported disk, shared by the connections to it; `None` once its test ended.
pub type SharedExport = Arc<Mutex<Option<DiskExport>>>;

/// The exports served, by name.
#[derive(Clone, Default)]
pub struct Exports(Arc<Mutex<HashMap<String, SharedExport>>>);

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.0.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "Exports({count})")
    }
}

impl Exports {
    /// Serves `export` as `name`.
    pub fn add(&self, name: String, export: DiskExport) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(name, Arc::new(Mutex::new(Some(export))));
        }
    }

    /// Stops serving `name`: connections to it get errors from now on.
    pub fn remove(&self, name: &str) {
        let removed = self.0.lock().ok().and_then(|mut map| map.remove(name));
        if let Some(export) = removed {
            if let Ok(mut export) = export.lock() {
                *export = None;
            }
        }
    }

    fn get(&self, name: &str) -> Option<SharedExport> {
        self.0.lock().ok()?.get(name).cloned()
    }
}

/// Accepts NBD clients on `listener` for ever (on a thread of its own).
pub fn serve(listener: TcpListener, exports: Exports) {
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("too many NBD connections: closing this one");
            continue;
        }
        let exports = exports.clone();
        let open = open.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd".into())
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                if let Err(e) = connection(stream, &exports) {
                    tracing::info!(?peer, error = %e, "NBD connection ended");
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::error!("cannot start an NBD connection thread");
        }
    }
}

fn read_u16(s: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

fn option_reply(s: &mut TcpStream, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)
}

/// The handshake, then requests until the client goes.
fn connection(mut s: TcpStream, exports: &Exports) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = read_u32(&mut s)?;
    let Some((name, export)) = options(&mut s, exports, client_flags)? else {
        return Ok(());
    };
    s.set_read_timeout(None)?;
    tracing::info!(export = %name, "NBD client connected");
    transmission(&mut s, &export)
}

/// Option haggling; the export chosen, or `None` when the client aborted.
fn options(
    s: &mut TcpStream,
    exports: &Exports,
    client_flags: u32,
) -> std::io::Result<Option<(String, SharedExport)>> {
    loop {
        if read_u64(s)? != IHAVEOPT {
            return Err(invalid("option without IHAVEOPT"));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_LEN {
            return Err(invalid("option longer than 4 KiB"));
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No way to say "unknown" here but closing the connection.
                let export = exports
                    .get(&name)
                    .ok_or_else(|| invalid("unknown export"))?;
                let size = export_size(&export).ok_or_else(|| invalid("export ended"))?;
                let mut out = Vec::new();
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if client_flags & CLIENT_NO_ZEROES == 0 {
                    out.extend_from_slice(&[0; 124]);
                }
                s.write_all(&out)?;
                return Ok(Some((name, export)));
            }
            OPT_ABORT => {
                let _ = option_reply(s, option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = go_name(&data) else {
                    option_reply(s, option, REP_ERR_INVALID, &[])?;
                    continue;
                };
                let found = exports
                    .get(&name)
                    .and_then(|e| export_size(&e).map(|size| (e, size)));
                let Some((export, size)) = found else {
                    option_reply(s, option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let mut info = Vec::new();
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                option_reply(s, option, REP_INFO, &info)?;
                let mut sizes = Vec::new();
                sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                sizes.extend_from_slice(&1u32.to_be_bytes());
                sizes.extend_from_slice(&4096u32.to_be_bytes());
                sizes.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
                option_reply(s, option, REP_INFO, &sizes)?;
                option_reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(Some((name, export)));
                }
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// The export name of an `NBD_OPT_GO`/`NBD_OPT_INFO` body (name length, name, info
/// requests), if it is well formed.
fn go_name(data: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(len)?)?;
    let requests = u16::from_be_bytes(data.get(4 + len..6 + len)?.try_into().ok()?);
    if data.len() != 6 + len + 2 * usize::from(requests) {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

fn export_size(export: &SharedExport) -> Option<u64> {
    export.lock().ok()?.as_ref().map(DiskExport::size)
}

fn simple_reply(s: &mut TcpStream, error: u32, cookie: u64, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)
}

fn transmission(s: &mut TcpStream, export: &SharedExport) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        if read_u32(s)? != REQUEST_MAGIC {
            return Err(invalid("request without its magic"));
        }
        let _flags = read_u16(s)?;
        let kind = read_u16(s)?;
        let cookie = read_u64(s)?;
        let offset = read_u64(s)?;
        let len = read_u32(s)?;
        if len > MAX_REQUEST_LEN {
            // A write's payload cannot be skipped safely: close.
            simple_reply(s, EINVAL, cookie, &[])?;
            return Err(invalid("request longer than 32 MiB"));
        }
        buf.resize(len as usize, 0);
        if kind == CMD_WRITE {
            s.read_exact(&mut buf)?;
        }
        let mut guard = export
            .lock()
            .map_err(|_| std::io::Error::other("export lock poisoned"))?;
        let Some(disk) = guard.as_mut() else {
            drop(guard);
            simple_reply(s, EIO, cookie, &[])?;
            return Err(invalid("the test failover was cleaned up"));
        };
        let within = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= disk.size());
        let result = match kind {
            CMD_DISC => return Ok(()),
            CMD_READ | CMD_WRITE if !within => Err(EINVAL),
            CMD_READ => disk.read_at(&mut buf, offset).map_err(|e| {
                tracing::error!(error = %e.chain(), "NBD read failed");
                EIO
            }),
            CMD_WRITE => disk.write_at(&buf, offset).map_err(|e| {
                tracing::error!(error = %e.chain(), "NBD write failed");
                match &e {
                    engine::Error::File { source, .. } if source.raw_os_error() == Some(28) => {
                        ENOSPC
                    }
                    _ => EIO,
                }
            }),
            CMD_FLUSH => disk.flush().map_err(|e| {
                tracing::error!(error = %e.chain(), "NBD flush failed");
                EIO
            }),
            4..=6 => Err(ENOTSUP),
            _ => Err(EPERM),
        };
        drop(guard);
        match result {
            Ok(()) if kind == CMD_READ => simple_reply(s, 0, cookie, &buf)?,
            Ok(()) => simple_reply(s, 0, cookie, &[])?,
            Err(code) => simple_reply(s, code, cookie, &[])?,
        }
    }
}
