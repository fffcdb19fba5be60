//! Wall-clock time as the services record it: milliseconds since the Unix epoch.
//!
//! Recovery points, spool status and point ages are stamped with [`now_ms`]. Code that
//! decides by age (retention pruning, `status --max-age`) takes the time as a parameter,
//! so tests drive it with any instant they like.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
