//! The QMP client against a peer that answers with arbitrary bytes: greeting, commands and
//! events end in an error or an answer, never a panic or unbounded buffering.
#![no_main]

#[path = "peer.rs"]
mod peer;

use std::time::Duration;

use agent::qemu::qmp::Qmp;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    peer::run_against(data, |client| async move {
        let mut qmp = Qmp::over(client).await?;
        let _ = qmp.execute("query-named-block-nodes", json!({"flat": true})).await;
        let _ = qmp
            .wait_event("BLOCK_JOB_CANCELLED", Duration::from_millis(10), |_| true)
            .await;
        Ok(())
    });
});
