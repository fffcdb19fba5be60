//! Every message parser, and the block records inside `Blocks`, on arbitrary bodies.
#![no_main]

use bytes::Bytes;
use engine::wire::message::records;
use engine::wire::{Frame, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    if let Ok(msg) = Message::from_frame(Frame {
        kind,
        body: Bytes::copy_from_slice(body),
    }) {
        if let Message::Blocks {
            count,
            records: bytes,
            ..
        } = &msg
        {
            for _ in records(*count, bytes) {}
        }
        // What parses must encode back to the same message.
        let again = Message::from_frame(msg.to_frame()).expect("re-encoded message parses");
        assert_eq!(again, msg);
    }
});
