//! Length-prefixed frames.
//!
//! ```text
//! +----------------+-----------+------------------------------+
//! | length: u32 BE | kind: u8  | body: length - 1 bytes       |
//! +----------------+-----------+------------------------------+
//! ```
//! `length` counts the kind byte and the body. It is checked against [`MAX_FRAME_LEN`]
//! before any memory is reserved for the frame; kind 0 is reserved as invalid. End of stream
//! inside a frame is an error, end of stream between frames is a clean close.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::Error;

/// Largest frame accepted: room for a batch of blocks of up to 4 MiB plus headers.
pub const MAX_FRAME_LEN: usize = 8 << 20;
const LEN_PREFIX: usize = 4;

/// One frame: a message kind and its undecoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message kind; never 0.
    pub kind: u8,
    /// The message body.
    pub body: Bytes,
}

/// Bytes of a frame before its body: the length and the kind.
pub const HEADER_LEN: usize = LEN_PREFIX + 1;

impl Frame {
    /// The bytes that precede the body on the wire; a frame over [`MAX_FRAME_LEN`] is
    /// refused before anything is written.
    pub fn header(&self) -> Result<[u8; HEADER_LEN], Error> {
        let len = self.body.len() + 1;
        if len > MAX_FRAME_LEN {
            return Err(Error::FrameTooLarge {
                len: len as u64,
                max: MAX_FRAME_LEN as u64,
            });
        }
        let mut header = [0u8; HEADER_LEN];
        header[..LEN_PREFIX].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        header[LEN_PREFIX] = self.kind;
        Ok(header)
    }
}

/// Splits a byte stream into frames and writes frames into one (connections write the
/// header and the body without this copy: `transport::ConnWriter`).
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Error> {
        if src.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_FRAME_LEN {
            return Err(Error::FrameTooLarge {
                len: len as u64,
                max: MAX_FRAME_LEN as u64,
            });
        }
        if len == 0 {
            return Err(Error::Protocol("empty frame".into()));
        }
        if src.len() < LEN_PREFIX + len {
            src.reserve(LEN_PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        let mut body = src.split_to(len).freeze();
        let kind = body.get_u8();
        if kind == 0 {
            return Err(Error::Protocol("frame of kind 0 (invalid)".into()));
        }
        Ok(Some(Frame { kind, body }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Error> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(Error::Truncated("inside a frame")),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), Error> {
        let header = frame.header()?;
        dst.reserve(HEADER_LEN + frame.body.len());
        dst.extend_from_slice(&header);
        dst.extend_from_slice(&frame.body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_oversized_frames_before_allocating() {
        let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1][..]);
        let err = FrameCodec.decode(&mut src).unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err}");
        assert!(src.capacity() < 1024);
    }

    #[test]
    fn truncated_frame_at_eof_is_an_error() {
        let mut src = BytesMut::from(&[0, 0, 0, 9, 1, 2][..]);
        assert!(FrameCodec.decode(&mut src).unwrap().is_none());
        assert!(matches!(
            FrameCodec.decode_eof(&mut src),
            Err(Error::Truncated(_))
        ));
        assert!(FrameCodec
            .decode_eof(&mut BytesMut::new())
            .unwrap()
            .is_none());
    }

    #[test]
    fn kind_zero_and_empty_frames_are_refused() {
        assert!(FrameCodec
            .decode(&mut BytesMut::from(&[0, 0, 0, 1, 0][..]))
            .is_err());
        assert!(FrameCodec
            .decode(&mut BytesMut::from(&[0, 0, 0, 0][..]))
            .is_err());
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec((1u8.., proptest::collection::vec(any::<u8>(), 0..300)), 1..8)) {
            let mut buf = BytesMut::new();
            for (kind, body) in &frames {
                FrameCodec.encode(Frame { kind: *kind, body: Bytes::from(body.clone()) }, &mut buf).unwrap();
            }
            for (kind, body) in &frames {
                let frame = FrameCodec.decode(&mut buf).unwrap().unwrap();
                prop_assert_eq!(frame.kind, *kind);
                prop_assert_eq!(&frame.body[..], &body[..]);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = FrameCodec.decode(&mut buf) {}
        }
    }
}
