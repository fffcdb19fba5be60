//! The kernel side of in-guest tracking: the BPF program of `bpf/tracker.bpf.c`, attached
//! to the block layer's write completions for one disk, its maps, and their pins in bpffs.
//!
//! Everything is pinned under `<bpffs>/deltaback/<disk>/` (programs, links, `marks`,
//! `stats`), so tracking goes on while the agent is stopped, restarted or killed; the agent
//! keeps no handle that tracking depends on, and opens the pins again every cycle. The
//! marks are trusted only when the tracker proves it saw every write since the last
//! acknowledged cycle; otherwise the cycle compares the whole disk and the log says why:
//! - no pins (first use, or a reboot: bpffs is memory), or a link pin gone (detached);
//! - the disk's `diskseq` changed (detached and attached again, media changed);
//! - a different block size or range (resized, repartitioned);
//! - events the program could not record, or runs the kernel skipped (`recursion_misses`);
//! - no full compare has finished since the tracker was made.
//!
//! `stats` holds the program's counters and the agent's own fields (slot indexes below):
//! what the tracker was made for, whether a baseline exists, and the replica's root hash
//! after the last acknowledged cycle.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use engine::block::geometry::{BlockHash, BlockSize};
use engine::error::{Error, Result};

use super::device::TrackedDevice;
use super::marks::{words_for, Marks};

/// The BPF object built from `bpf/tracker.bpf.c` by `build.rs`.
#[cfg(deltaback_bpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracker.bpf.o"));

// Slots of `stats` the program counts in (as in tracker.bpf.c).
const STAT_WRITES: usize = 0;
const STAT_BYTES: usize = 1;
const STAT_LOST: usize = 2;
// Slots the agent keeps.
const AGENT_MAGIC: usize = 8;
const AGENT_DISKSEQ: usize = 9;
const AGENT_BLOCK_SIZE: usize = 10;
const AGENT_FIRST_SECTOR: usize = 11;
const AGENT_SECTORS: usize = 12;
const AGENT_FLAGS: usize = 13;
const AGENT_ROOT: usize = 14; // four slots
const AGENT_LOST_SEEN: usize = 18;
const AGENT_MISSES_SEEN: usize = 19;
const AGENT_BYTES_AT: usize = 20;
const AGENT_TIME_AT: usize = 21;
const AGENT_CREATED: usize = 22;
const STAT_SLOTS: usize = 64;

/// "dbtrack1".
const MAGIC: u64 = u64::from_be_bytes(*b"dbtrack1");
/// A full compare has finished since the tracker was made: the marks cover every change.
const FLAG_BASELINE: u64 = 1;
/// A cycle started sending and has not been acknowledged: the replica may hold some of the
/// taken blocks already, so its root may differ from the one recorded.
const FLAG_IN_PROGRESS: u64 = 2;

/// The program and the tracepoint it is attached to (see `bpf/tracker.bpf.c` for why one).
const PROGRAMS: [(&str, &str); 1] = [("deltaback_done", "block_rq_complete")];

/// One disk's tracker, its maps mapped into this process.
pub struct Tracker {
    pub device: TrackedDevice,
    dir: PathBuf,
    blocks: u64,
    marks: memmap2::MmapMut,
    stats: memmap2::MmapMut,
    /// Why the marks cannot be trusted this cycle, if they cannot.
    full_compare: Option<String>,
}

/// Where tracker pins live below bpffs.
pub fn pin_root(bpffs: &Path) -> PathBuf {
    bpffs.join("deltaback")
}

impl Tracker {
    /// Opens the tracker of `device` at `block_size`, making (and pinning) one when there
    /// is none or the one there cannot be trusted; [`Tracker::full_compare`] then says why.
    pub fn open(device: TrackedDevice, block_size: BlockSize, bpffs: &Path) -> Result<Self> {
        let dir = pin_root(bpffs).join(device.pin_name());
        let sectors_per_block = u64::from(block_size.get() / 512);
        let blocks = device.sectors.div_ceil(sectors_per_block);
        let reopened = if dir.exists() {
            match Self::reopen(&device, &dir, block_size, blocks) {
                Ok(tracker) => return Ok(tracker),
                Err(why) => Some(why),
            }
        } else {
            None
        };
        let why = match reopened {
            Some(why) => {
                tracing::warn!(disk = %device.path.display(), pins = %dir.display(), "{why}: \
                    making a new tracker; this cycle compares the whole disk");
                std::fs::remove_dir_all(&dir).map_err(Error::file("remove tracker pins", &dir))?;
                why
            }
            None => "no tracker was running for this disk (first use, a reboot, or the \
                     tracker was detached)"
                .to_owned(),
        };
        create(&device, &dir, block_size, blocks)?;
        let mut tracker = Self::map(device, dir, blocks)?;
        tracker.full_compare = Some(why);
        Ok(tracker)
    }

    /// Opens the pins of a running tracker, or says why they cannot be trusted.
    fn reopen(
        device: &TrackedDevice,
        dir: &Path,
        block_size: BlockSize,
        blocks: u64,
    ) -> std::result::Result<Self, String> {
        for (name, _) in PROGRAMS {
            if !dir.join(link_pin(name)).exists() {
                return Err(format!(
                    "the tracker's program {name} was detached: writes since then are unknown"
                ));
            }
        }
        let mut tracker =
            Self::map(device.clone(), dir.to_owned(), blocks).map_err(|e| e.to_string())?;
        let slot = |i| tracker.stat(i);
        if slot(AGENT_MAGIC) != MAGIC {
            return Err("the pinned tracker was not made by this agent version".into());
        }
        if slot(AGENT_DISKSEQ) != device.diskseq {
            return Err(format!(
                "the disk was detached and attached again (diskseq {} is now {})",
                slot(AGENT_DISKSEQ),
                device.diskseq
            ));
        }
        if slot(AGENT_BLOCK_SIZE) != u64::from(block_size.get())
            || slot(AGENT_FIRST_SECTOR) != device.first_sector
            || slot(AGENT_SECTORS) != device.sectors
        {
            return Err("the disk's size, range or block size changed".into());
        }
        tracker.full_compare = tracker.untrusted();
        Ok(tracker)
    }

    /// Maps the pinned maps.
    fn map(device: TrackedDevice, dir: PathBuf, blocks: u64) -> Result<Self> {
        let words = words_for(blocks)
            .checked_mul(2)
            .ok_or_else(|| Error::Invalid("disk too large to track".into()))?;
        let marks = map_pinned(&dir.join("marks"), words)?;
        let stats = map_pinned(&dir.join("stats"), STAT_SLOTS as u64)?;
        Ok(Self {
            device,
            dir,
            blocks,
            marks,
            stats,
            full_compare: None,
        })
    }

    /// Why this cycle must compare the whole disk, if it must.
    pub fn full_compare(&self) -> Option<&str> {
        self.full_compare.as_deref()
    }

    /// Asks for a full compare for `why` (the replica is new, or changed elsewhere).
    pub fn require_full_compare(&mut self, why: String) {
        self.full_compare.get_or_insert(why);
    }

    /// Blocks of the tracked disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The live and taken bitmaps.
    pub fn marks(&self) -> Marks<'_> {
        // `map` checked the length; a failure here would be a bug, reported as such.
        Marks::new(words(&self.marks), self.blocks)
            .unwrap_or_else(|| unreachable!("marks map shorter than checked at open"))
    }

    /// Reasons the marks do not cover every write: lost events, skipped runs, no baseline.
    fn untrusted(&self) -> Option<String> {
        let lost = self.stat(STAT_LOST);
        if lost > self.stat(AGENT_LOST_SEEN) {
            return Some(format!(
                "the tracker could not record {} write events",
                lost - self.stat(AGENT_LOST_SEEN)
            ));
        }
        match self.recursion_misses() {
            Ok(misses) if misses > self.stat(AGENT_MISSES_SEEN) => {
                return Some(format!(
                    "the kernel skipped the tracker {} times (another BPF program was running)",
                    misses - self.stat(AGENT_MISSES_SEEN)
                ))
            }
            Ok(_) => {}
            Err(e) => return Some(format!("the tracker's programs cannot be inspected: {e}")),
        }
        if self.stat(AGENT_FLAGS) & FLAG_BASELINE == 0 {
            return Some("no full compare has finished since the tracker was made".into());
        }
        None
    }

    /// The loss counters as they are now, to acknowledge once a full compare that started
    /// after this moment is durable.
    pub fn loss_mark(&self) -> (u64, u64) {
        (
            self.stat(STAT_LOST),
            self.recursion_misses().unwrap_or(u64::MAX),
        )
    }

    /// The replica's root hash recorded after the last acknowledged cycle, and whether a
    /// cycle was interrupted since (the replica may then hold some taken blocks already).
    pub fn recorded_root(&self) -> (BlockHash, bool) {
        let mut root = [0u8; 32];
        for (i, chunk) in root.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&self.stat(AGENT_ROOT + i).to_be_bytes());
        }
        (root, self.stat(AGENT_FLAGS) & FLAG_IN_PROGRESS != 0)
    }

    /// Says a cycle is about to send taken blocks.
    pub fn begin_cycle(&self) {
        self.stats_slot(AGENT_FLAGS)
            .fetch_or(FLAG_IN_PROGRESS, Ordering::AcqRel);
    }

    /// The master target acknowledged a cycle: record its root, forget the taken blocks,
    /// and, after a full compare, the losses it covered.
    pub fn acknowledge(&self, root: BlockHash, full_compare_from: Option<(u64, u64)>) {
        for (i, chunk) in root.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.stats_slot(AGENT_ROOT + i)
                .store(u64::from_be_bytes(word), Ordering::Release);
        }
        if let Some((lost, misses)) = full_compare_from {
            self.stats_slot(AGENT_LOST_SEEN)
                .store(lost, Ordering::Release);
            self.stats_slot(AGENT_MISSES_SEEN)
                .store(misses, Ordering::Release);
            self.stats_slot(AGENT_FLAGS)
                .fetch_or(FLAG_BASELINE, Ordering::AcqRel);
        }
        self.marks().clear_taken();
        self.stats_slot(AGENT_FLAGS)
            .fetch_and(!FLAG_IN_PROGRESS, Ordering::AcqRel);
    }

    /// Bytes written to the tracked range since the last call, and the seconds they span
    /// (the churn); remembered in the pins so it spans agent restarts.
    pub fn churn(&self) -> (u64, f64) {
        let bytes = self.stat(STAT_BYTES);
        let now = now_ms();
        let before = self
            .stats_slot(AGENT_BYTES_AT)
            .swap(bytes, Ordering::AcqRel);
        let then = self.stats_slot(AGENT_TIME_AT).swap(now, Ordering::AcqRel);
        let since = if then == 0 {
            self.stat(AGENT_CREATED)
        } else {
            then
        };
        (
            bytes.saturating_sub(before),
            now.saturating_sub(since) as f64 / 1000.0,
        )
    }

    /// Write events seen in the range since the tracker was made.
    pub fn writes_seen(&self) -> u64 {
        self.stat(STAT_WRITES)
    }

    /// The pin folder, for messages.
    pub fn pins(&self) -> &Path {
        &self.dir
    }

    fn recursion_misses(&self) -> Result<u64> {
        let mut total = 0u64;
        for (name, _) in PROGRAMS {
            total = total.saturating_add(program_misses(&self.dir.join(prog_pin(name)))?);
        }
        Ok(total)
    }

    fn stat(&self, index: usize) -> u64 {
        self.stats_slot(index).load(Ordering::Acquire)
    }

    fn stats_slot(&self, index: usize) -> &AtomicU64 {
        &words(&self.stats)[index]
    }
}

fn link_pin(program: &str) -> String {
    format!("{program}_link")
}

fn prog_pin(program: &str) -> String {
    format!("{program}_prog")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The words of a mapped BPF array of u64.
#[allow(unsafe_code)]
fn words(map: &memmap2::MmapMut) -> &[AtomicU64] {
    let len = map.len() / 8;
    // SAFETY: the mapping is page-aligned (so 8-byte aligned), `len * 8` bytes long, lives
    // as long as the returned borrow, and every bit pattern is a valid u64. It is shared
    // with the BPF program, which only uses atomic operations on it, as this process does
    // through AtomicU64.
    unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<AtomicU64>(), len) }
}

/// Maps a pinned `BPF_F_MMAPABLE` array of at least `entries` u64 values.
#[allow(unsafe_code)]
fn map_pinned(path: &Path, entries: u64) -> Result<memmap2::MmapMut> {
    let map = aya::maps::MapData::from_pin(path)
        .map_err(|e| Error::Invalid(format!("open pinned map {}: {e}", path.display())))?;
    let info = map
        .info()
        .map_err(|e| Error::Invalid(format!("inspect pinned map {}: {e}", path.display())))?;
    if u64::from(info.max_entries()) < entries || info.value_size() != 8 {
        return Err(Error::Invalid(format!(
            "pinned map {} has {} entries of {} bytes, not {entries} of 8",
            path.display(),
            info.max_entries(),
            info.value_size()
        )));
    }
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(Error::file("duplicate map handle", path))?;
    let file = File::from(fd);
    let len =
        usize::try_from(entries * 8).map_err(|_| Error::Invalid("map too large to map".into()))?;
    // SAFETY: the BPF array's memory stays valid while the mapping exists (the mapping holds
    // a reference to the map); it is only accessed through atomics (see `words`), so
    // concurrent updates by the BPF program are not data races.
    unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file) }
        .map_err(Error::file("map BPF map", path))
}

/// Runs of a pinned program the kernel skipped, from its `fdinfo`.
fn program_misses(pin: &Path) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let info = aya::programs::ProgramInfo::from_pin(pin)
        .map_err(|e| Error::Invalid(format!("open pinned program {}: {e}", pin.display())))?;
    let fd = info
        .fd()
        .map_err(|e| Error::Invalid(format!("open pinned program {}: {e}", pin.display())))?;
    let fdinfo = PathBuf::from(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()));
    let text = std::fs::read_to_string(&fdinfo).map_err(Error::file("read", &fdinfo))?;
    let misses = text
        .lines()
        .find_map(|l| l.strip_prefix("recursion_misses:"))
        .and_then(|v| v.trim().parse().ok());
    misses.ok_or_else(|| Error::Invalid(format!("{} shows no recursion_misses", fdinfo.display())))
}

/// Offsets of the fields the program reads in one block tracepoint's record.
struct EventLayout {
    dev: u32,
    sector: u32,
    nr_sector: u32,
    rwbs: u32,
}

fn event_layout(event: &str) -> Result<EventLayout> {
    let mut text = None;
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let path = PathBuf::from(format!("{root}/events/block/{event}/format"));
        if let Ok(t) = std::fs::read_to_string(&path) {
            text = Some(t);
            break;
        }
    }
    let text = text.ok_or_else(|| {
        Error::Invalid(format!(
            "the block:{event} tracepoint is not visible: mount tracefs \
             (mount -t tracefs tracefs /sys/kernel/tracing) and check the kernel has block \
             tracepoints"
        ))
    })?;
    let field = |name: &str, size: u32| -> Result<u32> {
        text.lines()
            .find_map(|line| {
                let (decl, rest) = line.trim().strip_prefix("field:")?.split_once(';')?;
                let ident = decl.rsplit([' ', '*']).next()?;
                let ident = ident.split('[').next()?;
                (ident == name).then_some(rest)
            })
            .and_then(|rest| {
                let offset = rest
                    .split("offset:")
                    .nth(1)?
                    .split(';')
                    .next()?
                    .parse()
                    .ok()?;
                let found: u32 = rest
                    .split("size:")
                    .nth(1)?
                    .split(';')
                    .next()?
                    .parse()
                    .ok()?;
                (found >= size).then_some(offset)
            })
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "block:{event} has no field {name} of {size} bytes in this kernel"
                ))
            })
    };
    Ok(EventLayout {
        dev: field("dev", 4)?,
        sector: field("sector", 8)?,
        nr_sector: field("nr_sector", 4)?,
        rwbs: field("rwbs", 2)?,
    })
}

/// Loads the program for `device`, attaches it to the tracepoint and pins it all.
#[cfg(deltaback_bpf)]
fn create(device: &TrackedDevice, dir: &Path, block_size: BlockSize, blocks: u64) -> Result<()> {
    use aya::programs::{links::FdLink, TracePoint};
    let done = event_layout("block_rq_complete")?;
    let entries = u32::try_from(words_for(blocks).saturating_mul(2))
        .map_err(|_| Error::Invalid("disk too large to track".into()))?;
    let dev = device.kernel_dev();
    let shift = (block_size.get() / 512).trailing_zeros();
    let whole = u32::from(!device.partition);
    let bpf_error = |what: &str, e: &dyn std::fmt::Display| {
        Error::Invalid(format!(
            "tracker for {}: {what}: {e}",
            device.path.display()
        ))
    };
    let mut ebpf = aya::EbpfLoader::new()
        .set_global("target_dev", &dev, true)
        .set_global("first_sector", &device.first_sector, true)
        .set_global("sector_count", &device.sectors, true)
        .set_global("block_shift", &shift, true)
        .set_global("whole_disk", &whole, true)
        .set_global("done_dev", &done.dev, true)
        .set_global("done_sector", &done.sector, true)
        .set_global("done_nr", &done.nr_sector, true)
        .set_global("done_rwbs", &done.rwbs, true)
        .set_max_entries("marks", entries)
        .load(OBJECT)
        .map_err(|e| bpf_error("load the BPF program", &e))?;
    std::fs::create_dir_all(dir).map_err(Error::file("make tracker pin folder", dir))?;
    for map in ["marks", "stats"] {
        let pinned = ebpf
            .map(map)
            .ok_or_else(|| bpf_error("the BPF object has no map", &map))?
            .pin(dir.join(map));
        pinned.map_err(|e| bpf_error("pin a map", &e))?;
    }
    // The agent's fields go in before the program runs, so a crash leaves a tracker that
    // names its disk and has no baseline.
    {
        let stats = map_pinned(&dir.join("stats"), STAT_SLOTS as u64)?;
        let slots = words(&stats);
        for (index, value) in [
            (AGENT_DISKSEQ, device.diskseq),
            (AGENT_BLOCK_SIZE, u64::from(block_size.get())),
            (AGENT_FIRST_SECTOR, device.first_sector),
            (AGENT_SECTORS, device.sectors),
            (AGENT_CREATED, now_ms()),
            (AGENT_MAGIC, MAGIC),
        ] {
            slots[index].store(value, Ordering::Release);
        }
    }
    for (name, event) in PROGRAMS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| bpf_error("the BPF object has no program", &name))?
            .try_into()
            .map_err(|e| bpf_error("program type", &e))?;
        program
            .load()
            .map_err(|e| bpf_error("the kernel refused the program", &e))?;
        program
            .pin(dir.join(prog_pin(name)))
            .map_err(|e| bpf_error("pin a program", &e))?;
        let link = program
            .attach("block", event)
            .map_err(|e| bpf_error("attach to the block tracepoint", &e))?;
        let link = program
            .take_link(link)
            .map_err(|e| bpf_error("take the link", &e))?;
        let link = FdLink::try_from(link).map_err(|e| {
            bpf_error(
                "this kernel cannot pin tracepoint links (Linux 5.15 and later can)",
                &e,
            )
        })?;
        link.pin(dir.join(link_pin(name)))
            .map_err(|e| bpf_error("pin the link", &e))?;
    }
    tracing::info!(disk = %device.path.display(), pins = %dir.display(), "write tracker attached");
    Ok(())
}

#[cfg(not(deltaback_bpf))]
fn create(device: &TrackedDevice, _: &Path, _: BlockSize, _: u64) -> Result<()> {
    Err(Error::Invalid(format!(
        "this agent was built without its BPF tracker (clang was missing at build time), so \
         it cannot track {}: rebuild with clang and libbpf-dev installed, or use --source scan",
        device.path.display()
    )))
}

/// Removes the tracker pins of a disk: tracking stops, and the next cycle compares all.
pub fn remove(bpffs: &Path, device: &TrackedDevice) -> Result<bool> {
    let dir = pin_root(bpffs).join(device.pin_name());
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::file("remove tracker pins", &dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_tracepoint_of_this_kernel_has_the_fields_the_program_reads() {
        // tracefs is readable by root, as the agent's tracking needs anyway.
        let done = event_layout("block_rq_complete").unwrap();
        assert_eq!((done.dev, done.sector, done.nr_sector), (8, 16, 24));
        assert!(done.rwbs >= 28);
    }
}
