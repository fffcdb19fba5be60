//! The frame decoder must never panic or over-allocate, whatever arrives.
#![no_main]

use bytes::BytesMut;
use engine::wire::FrameCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    // Feed in two pieces, as a network would.
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut buf = BytesMut::from(&data[..split]);
    let mut codec = FrameCodec;
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
    buf.extend_from_slice(&data[split..]);
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(_)) => continue,
            _ => break,
        }
    }
    assert!(buf.capacity() <= engine::wire::MAX_FRAME_LEN + 4 + data.len());
});
