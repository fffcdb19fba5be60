// SPDX-License-Identifier: GPL-2.0
//
// deltaback's in-guest write tracker: marks the blocks of one disk (or one partition's range
// of it) that writes touch, in a bitmap the agent maps into its memory.
//
// Attached to block:block_rq_complete: a write request of a blk-mq disk has reached the
// device. Requests are on the whole disk (a partition's writes were remapped when they were
// submitted), so the device is the disk and the sector is on the disk. Marking at completion
// is what makes the agent's rounds sound: a block it read while a write to it was in flight
// is marked when the write lands, so it is read again. One program only: two tracing
// programs on one CPU make the kernel skip the second (recursion_misses), which would cost a
// full compare.
// Field offsets differ between kernels; the agent reads them from tracefs and sets them
// below before loading, so no kernel headers are needed.
//
// Map `marks`, BPF_F_MMAPABLE, 2 * words u64: [0, words) is the live bitmap this program
// sets (atomic OR); [words, 2 * words) is the agent's taken set (only the agent writes it).
// Map `stats`, BPF_F_MMAPABLE: counters this program keeps, and fields the agent keeps.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Set by the agent before loading.
const volatile __u32 target_dev = 0;    // kernel dev_t of the whole disk: major << 20 | minor
const volatile __u64 first_sector = 0;  // first 512-byte sector of the tracked range
const volatile __u64 sector_count = 0;  // its length in sectors
const volatile __u32 block_shift = 7;   // log2(block size / 512)
const volatile __u32 whole_disk = 1;    // writes past the range mean the disk grew: lost
const volatile __u32 done_dev = 8, done_sector = 16, done_nr = 24, done_rwbs = 34;

// Counters in `stats` (indexes shared with the agent's tracked/map.rs).
#define STAT_WRITES 0        // write completions inside the range
#define STAT_BYTES 1         // bytes they cover
#define STAT_LOST 2          // events that could not be recorded
#define STAT_ENTRIES 64

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2); // set by the agent: 2 * words
} marks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_ENTRIES);
} stats SEC(".maps");

static __always_inline void count(__u32 index, __u64 value)
{
	__u64 *slot = bpf_map_lookup_elem(&stats, &index);
	if (slot)
		__sync_fetch_and_add(slot, value);
}

struct span {
	__u64 first_block;
	__u64 last_block;
};

// One word of the live bitmap per call: the bits of blocks first..last that fall in it.
// Returns 1 to stop (past the last word, or a word that cannot be marked: counted as lost).
static long mark_word(__u64 i, void *data)
{
	struct span *span = data;
	__u64 word = (span->first_block >> 6) + i;
	if (word > (span->last_block >> 6))
		return 1;
	__u64 bits = ~0ULL;
	if (word == (span->first_block >> 6))
		bits &= ~0ULL << (span->first_block & 63);
	if (word == (span->last_block >> 6) && (span->last_block & 63) != 63)
		bits &= (1ULL << ((span->last_block & 63) + 1)) - 1;
	__u32 key = word;
	__u64 *slot = key == word ? bpf_map_lookup_elem(&marks, &key) : 0;
	if (!slot) {
		count(STAT_LOST, 1);
		return 1;
	}
	__sync_fetch_and_or(slot, bits);
	return 0;
}

static __always_inline int mark(void *ctx, __u32 dev_off, __u32 sector_off, __u32 nr_off,
				__u32 rwbs_off)
{
	__u32 dev = 0, nr = 0;
	__u64 sector = 0;
	char rwbs[2] = {};
	if (bpf_probe_read_kernel(&dev, sizeof(dev), ctx + dev_off))
		goto lost;
	if (dev != target_dev)
		return 0;
	if (bpf_probe_read_kernel(&sector, sizeof(sector), ctx + sector_off) ||
	    bpf_probe_read_kernel(&nr, sizeof(nr), ctx + nr_off) ||
	    bpf_probe_read_kernel(rwbs, sizeof(rwbs), ctx + rwbs_off))
		goto lost;
	// rwbs: an optional 'F' (preflush), then the operation. Everything but a read that
	// covers sectors may change them (write, discard, write zeroes, ...).
	char op = rwbs[0] == 'F' ? rwbs[1] : rwbs[0];
	if (op == 'R' || nr == 0)
		return 0;
	__u64 end = sector + nr;
	__u64 range_end = first_sector + sector_count;
	if (end <= first_sector || sector >= range_end) {
		if (whole_disk && sector >= range_end)
			goto lost;
		return 0;
	}
	if (sector < first_sector)
		sector = first_sector;
	if (end > range_end) {
		if (whole_disk)
			count(STAT_LOST, 1);
		end = range_end;
	}
	struct span span = {
		.first_block = (sector - first_sector) >> block_shift,
		.last_block = (end - 1 - first_sector) >> block_shift,
	};
	__u64 words = (span.last_block >> 6) - (span.first_block >> 6) + 1;
	if (words == 1) {
		// The common case, a write within one word of the bitmap: no loop.
		mark_word(0, &span);
	} else if (words > (1 << 23) || bpf_loop(words, mark_word, &span, 0) < 0) {
		goto lost;
	}
	count(STAT_WRITES, 1);
	count(STAT_BYTES, (end - sector) << 9);
	return 0;
lost:
	count(STAT_LOST, 1);
	return 0;
}

SEC("tracepoint/block/block_rq_complete")
int deltaback_done(void *ctx)
{
	return mark(ctx, done_dev, done_sector, done_nr, done_rwbs);
}

char LICENSE[] SEC("license") = "GPL";
