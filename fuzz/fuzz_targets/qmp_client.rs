//! The QMP client against a peer that answers with arbitrary bytes: greeting, commands and
//! events end in an error or an answer, never a panic or unbounded buffering.
#![no_main]

use std::time::Duration;

use agent::qemu::qmp::Qmp;
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let peer_bytes = data.to_vec();
    runtime.block_on(async move {
        let (client, mut peer) = tokio::net::UnixStream::pair().expect("socket pair");
        let serve = tokio::spawn(async move {
            let _ = peer.write_all(&peer_bytes).await;
            let _ = peer.shutdown().await;
            let mut sink = vec![0u8; 64 << 10];
            while matches!(peer.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let session = async {
            let mut qmp = Qmp::over(client).await?;
            let _ = qmp.execute("query-named-block-nodes", json!({"flat": true})).await;
            let _ = qmp
                .wait_event("BLOCK_JOB_CANCELLED", Duration::from_millis(10), |_| true)
                .await;
            Ok::<(), engine::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), session).await;
        serve.abort();
    });
});
