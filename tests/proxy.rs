//! A TCP proxy of our own on loopback that cuts, stalls or slows a connection at a chosen
//! byte count: network faults without netem.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the proxy does to the client-to-server direction.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Cut the first connection after this many bytes.
    Cut(u64),
    /// Stop forwarding the first connection for a while after this many bytes.
    Stall(u64, Duration),
    /// Forward every connection at this many bytes per second.
    Slow(u64),
}

/// A TCP proxy of our own on loopback that cuts, stalls or slows the client-to-server
/// direction, and counts what it forwarded that way.
pub struct Proxy {
    pub addr: String,
    pub forwarded: Arc<AtomicU64>,
    /// Times the fault struck (a cut or a stall).
    pub struck: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(upstream: String, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let forwarded = Arc::new(AtomicU64::new(0));
        let struck = Arc::new(AtomicU64::new(0));
        let first = Arc::new(AtomicBool::new(true));
        let (fwd, hits) = (forwarded.clone(), struck.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let is_first = first.swap(false, Ordering::SeqCst);
                let fault = match fault {
                    Fault::Slow(_) => Some(fault),
                    _ => is_first.then_some(fault),
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (fwd, hits) = (fwd.clone(), hits.clone());
                std::thread::spawn(move || pump(client, server, fault, &fwd, &hits));
                std::thread::spawn(move || {
                    pump(s2, c2, None, &AtomicU64::new(0), &AtomicU64::new(0))
                });
            }
        });
        Proxy {
            addr,
            forwarded,
            struck,
        }
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Option<Fault>,
    counted: &AtomicU64,
    struck: &AtomicU64,
) {
    let mut buf = vec![0u8; 16 << 10];
    let mut passed = 0u64;
    let started = Instant::now();
    let mut stalled = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n as u64,
        };
        let allowed = match fault {
            Some(Fault::Cut(at)) => (at - passed).min(n),
            _ => n,
        };
        if to.write_all(&buf[..allowed as usize]).is_err() {
            break;
        }
        passed += allowed;
        counted.fetch_add(allowed, Ordering::Relaxed);
        match fault {
            Some(Fault::Cut(at)) if passed == at => {
                struck.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Some(Fault::Stall(at, pause)) if passed >= at && !stalled => {
                stalled = true;
                struck.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(pause);
            }
            Some(Fault::Slow(rate)) => {
                let due = Duration::from_secs_f64(passed as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            _ => {}
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
