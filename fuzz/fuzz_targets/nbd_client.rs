//! The NBD client against a server that answers with arbitrary bytes: the handshake, block
//! status and reads must end in an error or an answer, never a panic, a hang or an
//! allocation the server chose.
#![no_main]

#[path = "peer.rs"]
mod peer;

use agent::qemu::nbd::NbdClient;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    peer::run_against(data, |client| async move {
        let mut nbd =
            NbdClient::over(client, "export", Some("qemu:dirty-bitmap:deltaback-1")).await?;
        let _ = nbd.all_extents().await;
        let len = usize::try_from(nbd.size().min(1 << 20)).unwrap_or(0);
        let mut buf = vec![0u8; len];
        let _ = nbd.read(0, &mut buf).await;
        nbd.disconnect().await;
        Ok(())
    });
});
