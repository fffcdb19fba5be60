//! Whether block payloads are compressed: always (`zstd`), never (`none`), or as the link
//! asks (`auto`, the default). zstd pays when the link is slower than the compressor and
//! costs when it is faster: on a fast LAN the workers would spend more time compressing
//! than the network saves. `auto` measures both per stream: the compressor's speed (raw
//! bytes per second of zstd time, over all worker threads, from compressed batches) and the
//! link's (bytes per second of time the session spent handing raw batches to the network,
//! which blocks when the link or anything behind it is slower; compressed batches say
//! little about the link, being small). The first batch goes raw and the second
//! compressed, so both are known early (batches packed meanwhile are compressed, until
//! the compressed one shows whether the data compresses: if not, compression stops
//! without waiting for the link's figure); after that one batch in [`PROBE_EVERY`] goes
//! the other way, so both stay current. Compression is on while the compressor is the faster
//! of the two and the data compresses (the compressed batches came out at most
//! [`WORTH_IT`] of their raw size); it is off while the link is faster, or while the data
//! does not compress (random or already compressed content: zstd would only cost CPU).

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// How payloads are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// As the link asks, measured per stream.
    #[default]
    Auto,
    /// Always zstd (kept per block only where smaller).
    Zstd,
    /// Never.
    None,
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "zstd" => Ok(Self::Zstd),
            "none" => Ok(Self::None),
            other => Err(format!("`{other}`: use auto, zstd or none")),
        }
    }
}

/// Under `auto`, one batch in this many goes the other way, to keep measuring.
pub const PROBE_EVERY: u64 = 16;

/// Compressed batches must come out at most this share of their raw size for compression
/// to stay on: below that it saves the link too little to pay for the CPU.
pub const WORTH_IT: f64 = 0.9;

/// Bytes measured on each side before `auto` decides anything.
const WARM_UP_BYTES: u64 = 1 << 20;

/// One stream's compression state and measurements, shared by the packing threads and the
/// session.
#[derive(Debug)]
pub struct CompressionControl {
    mode: Compression,
    threads: u64,
    on: AtomicBool,
    batches: AtomicU64,
    compressed_batches: AtomicU64,
    compress_ns: AtomicU64,
    compress_bytes: AtomicU64,
    /// What the compressed batches came to, payloads only.
    compressed_to_bytes: AtomicU64,
    send_ns: AtomicU64,
    send_bytes: AtomicU64,
}

/// What a stream did, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct CompressionReport {
    pub mode: Compression,
    /// Batches sent compressed and raw.
    pub compressed_batches: u64,
    pub raw_batches: u64,
    /// Measured speeds, MB/s: the compressor over all threads, the link (raw batches).
    pub compressor_mb_s: Option<f64>,
    pub link_mb_s: Option<f64>,
    /// What compressed batches came to, as a share of their raw size.
    pub compressed_ratio: Option<f64>,
}

impl CompressionControl {
    /// A control for a stream packed by `threads` workers.
    pub fn new(mode: Compression, threads: usize) -> Self {
        Self {
            mode,
            threads: threads.max(1) as u64,
            on: AtomicBool::new(mode != Compression::None),
            batches: AtomicU64::new(0),
            compressed_batches: AtomicU64::new(0),
            compress_ns: AtomicU64::new(0),
            compress_bytes: AtomicU64::new(0),
            compressed_to_bytes: AtomicU64::new(0),
            send_ns: AtomicU64::new(0),
            send_bytes: AtomicU64::new(0),
        }
    }

    /// The mode asked for.
    pub fn mode(&self) -> Compression {
        self.mode
    }

    /// Whether the next batch is compressed.
    pub fn next_batch(&self) -> bool {
        let n = self.batches.fetch_add(1, Ordering::Relaxed);
        match self.mode {
            Compression::None => false,
            Compression::Zstd => true,
            Compression::Auto => match n {
                0 => false,
                1 => true,
                n if n % PROBE_EVERY == 0 => !self.on.load(Ordering::Relaxed),
                _ => self.on.load(Ordering::Relaxed),
            },
        }
    }

    /// A worker compressed `raw_bytes` into `out_bytes` in `spent` (zstd time only).
    pub fn record_compression(&self, raw_bytes: u64, out_bytes: u64, spent: Duration) {
        self.compressed_batches.fetch_add(1, Ordering::Relaxed);
        self.compress_bytes.fetch_add(raw_bytes, Ordering::Relaxed);
        self.compressed_to_bytes
            .fetch_add(out_bytes, Ordering::Relaxed);
        self.compress_ns
            .fetch_add(duration_ns(spent), Ordering::Relaxed);
        self.decide();
    }

    /// The session handed a batch of `wire_bytes` to the network in `spent`; only raw
    /// batches measure the link.
    pub fn record_send(&self, wire_bytes: u64, spent: Duration, compressed: bool) {
        if compressed {
            return;
        }
        self.send_bytes.fetch_add(wire_bytes, Ordering::Relaxed);
        self.send_ns
            .fetch_add(duration_ns(spent), Ordering::Relaxed);
        self.decide();
    }

    fn speeds(&self) -> (Option<f64>, Option<f64>) {
        let rate = |bytes: u64, ns: u64, parallel: u64| {
            (bytes >= WARM_UP_BYTES)
                .then(|| bytes as f64 * parallel as f64 / (ns.max(1) as f64 / 1e9))
        };
        (
            rate(
                self.compress_bytes.load(Ordering::Relaxed),
                self.compress_ns.load(Ordering::Relaxed),
                self.threads,
            ),
            rate(
                self.send_bytes.load(Ordering::Relaxed),
                self.send_ns.load(Ordering::Relaxed),
                1,
            ),
        )
    }

    /// What compressed batches came to, as a share of their raw size, once measured.
    fn ratio(&self) -> Option<f64> {
        let raw = self.compress_bytes.load(Ordering::Relaxed);
        (raw >= WARM_UP_BYTES)
            .then(|| self.compressed_to_bytes.load(Ordering::Relaxed) as f64 / raw as f64)
    }

    fn decide(&self) {
        if self.mode != Compression::Auto {
            return;
        }
        let Some(ratio) = self.ratio() else {
            return;
        };
        let on = match self.speeds() {
            _ if ratio > WORTH_IT => false,
            (Some(compressor), Some(link)) => compressor > link,
            // The data compresses and the link is not measured yet (its first raw batch
            // is still on its way, as on a slow link): compress meanwhile.
            _ => true,
        };
        self.on.store(on, Ordering::Relaxed);
    }

    /// The figures of the stream so far.
    pub fn report(&self) -> CompressionReport {
        let (compressor, link) = self.speeds();
        let compressed = self.compressed_batches.load(Ordering::Relaxed);
        CompressionReport {
            mode: self.mode,
            compressed_batches: compressed,
            raw_batches: self
                .batches
                .load(Ordering::Relaxed)
                .saturating_sub(compressed),
            compressor_mb_s: compressor.map(|b| (b / 1e6 * 10.0).round() / 10.0),
            link_mb_s: link.map(|b| (b / 1e6 * 10.0).round() / 10.0),
            compressed_ratio: self.ratio().map(|r| (r * 1000.0).round() / 1000.0),
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn auto_compresses_while_the_link_is_the_slower_and_stops_when_it_is_faster() {
        let control = CompressionControl::new(Compression::Auto, 2);
        assert!(!control.next_batch(), "the first batch measures the link");
        assert!(control.next_batch(), "the second the compressor");
        assert!(
            control.next_batch() && control.next_batch(),
            "batches packed before anything is measured are compressed"
        );
        // The compressor: 16 MiB per second per thread, 32 over two threads.
        control.record_compression(16 * MB, 6 * MB, Duration::from_secs(1));
        // A link of 8 MiB/s: slower, so compression stays on but for the probes.
        control.record_send(16 * MB, Duration::from_secs(2), false);
        let compressed = (4..68).filter(|_| control.next_batch()).count();
        assert_eq!(compressed, 64 - 4, "all but the raw probes");
        // Compressed batches say nothing of the link.
        control.record_send(MB, Duration::from_secs(100), true);
        // Raw probes find the link much faster: 256 MiB in two seconds on the whole.
        control.record_send(240 * MB, Duration::from_millis(2), false);
        let compressed = (68..132).filter(|_| control.next_batch()).count();
        assert_eq!(compressed, 4, "only the compressed probes");
        let report = control.report();
        assert!(report.link_mb_s.unwrap() > report.compressor_mb_s.unwrap());
    }

    #[test]
    fn auto_does_not_compress_what_does_not_compress() {
        let control = CompressionControl::new(Compression::Auto, 2);
        control.next_batch();
        control.next_batch();
        // Random data: zstd saves 2%. Compression stops at once, before the link is
        // measured (a short stream, such as a 1% resync, would be over by then).
        control.record_compression(16 * MB, 16 * MB - MB / 3, Duration::from_millis(100));
        assert!(!control.next_batch() && !control.next_batch());
        // A slow link changes nothing: the data does not compress.
        control.record_send(16 * MB, Duration::from_secs(2), false);
        let compressed = (4..68).filter(|_| control.next_batch()).count();
        assert_eq!(compressed, 4, "only the compressed probes");
        assert!(control.report().compressed_ratio.unwrap() > WORTH_IT);
    }

    #[test]
    fn fixed_modes_do_not_adapt() {
        for (mode, on) in [(Compression::Zstd, true), (Compression::None, false)] {
            let control = CompressionControl::new(mode, 2);
            control.record_compression(64 * MB, 64 * MB, Duration::from_secs(10));
            control.record_send(64 * MB, Duration::from_millis(1), false);
            assert!((0..20).all(|_| control.next_batch() == on));
        }
        assert_eq!("auto".parse(), Ok(Compression::Auto));
        assert!("gzip".parse::<Compression>().is_err());
    }
}
