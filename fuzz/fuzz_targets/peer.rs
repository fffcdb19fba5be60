//! Shared by the client fuzz targets: a peer on the other end of a socket pair that sends
//! the fuzzer's bytes, then swallows whatever the client says, while the client's session
//! runs on a single-threaded runtime for at most five seconds.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Runs `session` against a peer that answers with `bytes`.
pub fn run_against<F, Fut>(bytes: &[u8], session: F)
where
    F: FnOnce(UnixStream) -> Fut,
    Fut: Future<Output = Result<(), engine::Error>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let peer_bytes = bytes.to_vec();
    runtime.block_on(async move {
        let (client, mut peer) = UnixStream::pair().expect("socket pair");
        let serve = tokio::spawn(async move {
            let _ = peer.write_all(&peer_bytes).await;
            let _ = peer.shutdown().await;
            let mut sink = vec![0u8; 64 << 10];
            while matches!(peer.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), session(client)).await;
        serve.abort();
    });
}
