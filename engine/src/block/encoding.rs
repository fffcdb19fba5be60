//! How one block's data travels: as a zero marker, raw, or zstd-compressed.
//!
//! zstd (level 1) is kept only when it is smaller than the raw block; an all-zero block carries
//! no payload at all. Decoding is bounded by the block's length, so a hostile payload cannot
//! make the receiver allocate more than one block.

use crate::block::geometry::is_zero;
use crate::error::{Error, Result};

/// zstd level used for block payloads: fast, and most of the gain on disk data.
pub const ZSTD_LEVEL: i32 = 1;

/// The encoding of one block's payload, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The block is all zeros; no payload.
    Zero = 1,
    /// The payload is the block as is.
    Raw = 2,
    /// The payload is a zstd frame that decompresses to the block.
    Zstd = 3,
}

impl Encoding {
    /// Decodes the wire byte.
    pub fn from_u8(byte: u8) -> Result<Self> {
        match byte {
            1 => Ok(Self::Zero),
            2 => Ok(Self::Raw),
            3 => Ok(Self::Zstd),
            other => Err(Error::Protocol(format!("unknown block encoding {other}"))),
        }
    }
}

/// Compresses blocks, reusing one zstd context and one scratch buffer.
pub struct BlockEncoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Whether [`BlockEncoder::encode`] tries zstd now (see [`BlockEncoder::set_compress`]).
    enabled: bool,
    scratch: Vec<u8>,
}

impl BlockEncoder {
    /// An encoder that tries zstd when `compress` is true, and sends raw blocks otherwise.
    pub fn new(compress: bool) -> Result<Self> {
        let compressor = if compress {
            Some(
                zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| Error::Invalid(format!("zstd: {e}")))?,
            )
        } else {
            None
        };
        Ok(Self {
            enabled: compressor.is_some(),
            compressor,
            scratch: Vec::new(),
        })
    }

    /// Turns zstd on or off for the blocks that follow (on only if the encoder was made
    /// with compression): a sender adapting to its link switches per batch.
    pub fn set_compress(&mut self, on: bool) {
        self.enabled = on && self.compressor.is_some();
    }

    /// True when the next blocks are tried with zstd.
    pub fn compresses(&self) -> bool {
        self.enabled
    }

    /// Encodes `data`, appending the payload to `out`; returns the encoding chosen.
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> Encoding {
        if is_zero(data) {
            return Encoding::Zero;
        }
        if let Some(compressor) = self.compressor.as_mut().filter(|_| self.enabled) {
            self.scratch.clear();
            // Capacity below the raw size: zstd fails when the result would not be smaller.
            self.scratch.reserve_exact(data.len());
            let limit = data.len() - 1;
            if let Ok(n) = compressor.compress_to_buffer(data, &mut self.scratch) {
                if n <= limit {
                    out.extend_from_slice(&self.scratch[..n]);
                    return Encoding::Zstd;
                }
            }
        }
        out.extend_from_slice(data);
        Encoding::Raw
    }
}

/// Decodes payloads, reusing one zstd context.
pub struct BlockDecoder {
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl BlockDecoder {
    /// A new decoder.
    pub fn new() -> Result<Self> {
        Ok(Self {
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(|e| Error::Invalid(format!("zstd: {e}")))?,
        })
    }

    /// Decodes one payload into `out` (cleared first), which must come out exactly `len` bytes.
    pub fn decode(
        &mut self,
        encoding: Encoding,
        payload: &[u8],
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        match encoding {
            Encoding::Zero => {
                if !payload.is_empty() {
                    return Err(Error::Protocol("zero block carries a payload".into()));
                }
                out.resize(len, 0);
            }
            Encoding::Raw => {
                if payload.len() != len {
                    return Err(Error::Protocol(format!(
                        "raw block of {} bytes where {len} were expected",
                        payload.len()
                    )));
                }
                out.extend_from_slice(payload);
            }
            Encoding::Zstd => {
                // One byte of slack so that output longer than the block is detected.
                out.reserve_exact(len + 1);
                let n = self
                    .decompressor
                    .decompress_to_buffer(payload, out)
                    .map_err(|e| Error::Protocol(format!("bad zstd block: {e}")))?;
                if n != len {
                    return Err(Error::Protocol(format!(
                        "zstd block decompressed to {n} bytes where {len} were expected"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(data: &[u8], compress: bool) -> Encoding {
        let mut encoder = BlockEncoder::new(compress).unwrap();
        let mut payload = Vec::new();
        let encoding = encoder.encode(data, &mut payload);
        let mut decoded = Vec::new();
        BlockDecoder::new()
            .unwrap()
            .decode(encoding, &payload, data.len(), &mut decoded)
            .unwrap();
        assert_eq!(decoded, data);
        if encoding == Encoding::Zstd {
            assert!(payload.len() < data.len());
        }
        encoding
    }

    #[test]
    fn picks_the_smallest_encoding() {
        assert_eq!(round_trip(&[0u8; 4096], true), Encoding::Zero);
        assert_eq!(round_trip(&b"abcd".repeat(1024), true), Encoding::Zstd);
        assert_eq!(round_trip(&b"abcd".repeat(1024), false), Encoding::Raw);
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        assert_ne!(round_trip(&noise, true), Encoding::Zero);
    }

    #[test]
    fn refuses_payloads_of_the_wrong_length() {
        let mut decoder = BlockDecoder::new().unwrap();
        let mut out = Vec::new();
        assert!(decoder
            .decode(Encoding::Raw, &[1; 10], 11, &mut out)
            .is_err());
        assert!(decoder.decode(Encoding::Zero, &[0], 1, &mut out).is_err());
        let big = zstd::bulk::compress(&[7u8; 8192], 1).unwrap();
        assert!(decoder
            .decode(Encoding::Zstd, &big, 4096, &mut out)
            .is_err());
        assert!(decoder
            .decode(Encoding::Zstd, b"not zstd", 4096, &mut out)
            .is_err());
    }

    proptest! {
        #[test]
        fn any_block_round_trips(data in proptest::collection::vec(any::<u8>(), 1..5000), compress: bool) {
            round_trip(&data, compress);
        }
    }
}
