//! The NBD client against a server that answers with arbitrary bytes: the handshake, block
//! status and reads must end in an error or an answer, never a panic, a hang or an
//! allocation the server chose.
#![no_main]

use std::time::Duration;

use agent::qemu::nbd::NbdClient;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server_bytes = data.to_vec();
    runtime.block_on(async move {
        let (client, mut server) = tokio::net::UnixStream::pair().expect("socket pair");
        let serve = tokio::spawn(async move {
            let _ = server.write_all(&server_bytes).await;
            let _ = server.shutdown().await;
            let mut sink = vec![0u8; 64 << 10];
            while matches!(server.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let session = async {
            let mut nbd =
                NbdClient::over(client, "export", Some("qemu:dirty-bitmap:deltaback-1")).await?;
            let _ = nbd.all_extents().await;
            let len = usize::try_from(nbd.size().min(1 << 20)).unwrap_or(0);
            let mut buf = vec![0u8; len];
            let _ = nbd.read(0, &mut buf).await;
            nbd.disconnect().await;
            Ok::<(), engine::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), session).await;
        serve.abort();
    });
});
