//! Bandwidth limits: a token bucket whose rate can change with the hour of day, so that
//! replication does not starve production links during business hours.
//!
//! A schedule is a default rate plus windows: `--max-rate 50MiB --rate-schedule
//! 08-18=5MiB,18-20=20MiB` sends at most 5 MiB/s from 08:00 to 18:00 UTC, 20 MiB/s until
//! 20:00, and 50 MiB/s otherwise. A window may wrap midnight (`22-06=...`), and `unlimited`
//! lifts the limit. Callers ask for permission before sending a frame; the bucket lets
//! them run into debt and sleep it off, so frames larger than a second's worth still pace.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Bytes per second; `None` is unlimited.
pub type Rate = Option<u64>;

fn parse_rate(text: &str) -> Result<Rate> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let per_second = text.strip_suffix("/s").unwrap_or(text);
    let bytes: bytesize::ByteSize = per_second.parse().map_err(|e| {
        Error::Invalid(format!(
            "rate {text:?}: {e} (write e.g. 10MiB or unlimited)"
        ))
    })?;
    if bytes.as_u64() == 0 {
        return Err(Error::Invalid(format!(
            "rate {text:?} would stop replication; use a positive rate"
        )));
    }
    Ok(Some(bytes.as_u64()))
}

/// When which rate applies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateSchedule {
    /// Rate outside every window.
    pub default: Rate,
    /// (first hour, end hour exclusive, rate), hours in UTC 0..24.
    pub windows: Vec<(u8, u8, Rate)>,
}

impl RateSchedule {
    /// A schedule from `--max-rate` (`RATE` or `unlimited`) and `--rate-schedule`
    /// (`HH-HH=RATE,...`, may be empty).
    pub fn new(max_rate: Option<&str>, schedule: Option<&str>) -> Result<Self> {
        let default = max_rate.map(parse_rate).transpose()?.flatten();
        let mut windows = Vec::new();
        for item in schedule
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.trim().is_empty())
        {
            let bad = || {
                Error::Invalid(format!(
                    "rate schedule {item:?}: write HH-HH=RATE, e.g. 08-18=5MiB"
                ))
            };
            let (hours, rate) = item.split_once('=').ok_or_else(bad)?;
            let (from, to) = hours.split_once('-').ok_or_else(bad)?;
            let from: u8 = from.trim().parse().map_err(|_| bad())?;
            let to: u8 = to.trim().parse().map_err(|_| bad())?;
            if from > 23 || to > 24 || from == to {
                return Err(bad());
            }
            windows.push((from, to, parse_rate(rate)?));
        }
        Ok(Self { default, windows })
    }

    /// The rate in force at `hour` (UTC, 0..24).
    pub fn rate_at(&self, hour: u8) -> Rate {
        self.windows
            .iter()
            .find(|&&(from, to, _)| {
                if from < to {
                    (from..to).contains(&hour)
                } else {
                    hour >= from || hour < to
                }
            })
            .map_or(self.default, |&(_, _, rate)| rate)
    }

    /// True when no limit ever applies.
    pub fn is_unlimited(&self) -> bool {
        self.default.is_none() && self.windows.iter().all(|w| w.2.is_none())
    }
}

impl FromStr for RateSchedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(Some(s), None)
    }
}

fn utc_hour() -> u8 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u8::try_from(secs / 3600 % 24).unwrap_or(0)
}

/// A token bucket following a [`RateSchedule`]; share one between all senders it limits.
#[derive(Debug)]
pub struct Throttle {
    schedule: RateSchedule,
    /// Tokens (bytes) available, negative while in debt, and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

impl Throttle {
    /// A throttle that starts with an empty bucket: no burst above the rate.
    pub fn new(schedule: RateSchedule) -> Self {
        Self {
            schedule,
            bucket: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Waits until `bytes` may be sent at the rate in force now.
    pub async fn acquire(&self, bytes: u64) {
        let Some(rate) = self.schedule.rate_at(utc_hour()) else {
            return;
        };
        let rate = rate as f64;
        let wait = {
            let Ok(mut bucket) = self.bucket.lock() else {
                return;
            };
            let now = Instant::now();
            let elapsed = now.duration_since(bucket.1).as_secs_f64();
            // At most a quarter second of unused rate carries over.
            let tokens = (bucket.0 + elapsed * rate).min(rate / 4.0) - bytes as f64;
            *bucket = (tokens, now);
            if tokens < 0.0 {
                Duration::from_secs_f64(-tokens / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_pick_the_window_in_force() {
        let s = RateSchedule::new(Some("50MiB"), Some("08-18=5MiB, 22-06=unlimited")).unwrap();
        assert_eq!(s.rate_at(9), Some(5 << 20));
        assert_eq!(s.rate_at(18), Some(50 << 20));
        assert_eq!(s.rate_at(23), None);
        assert_eq!(s.rate_at(3), None);
        assert_eq!(s.rate_at(6), Some(50 << 20));
        assert!(!s.is_unlimited());
        assert!(RateSchedule::new(None, None).unwrap().is_unlimited());
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "08=5MiB",
            "25-3=1MiB",
            "8-8=1MiB",
            "08-18",
            "08-18=0",
            "08-18=fast",
        ] {
            assert!(
                RateSchedule::new(None, Some(bad)).is_err(),
                "{bad} accepted"
            );
        }
        assert!(RateSchedule::new(Some("0"), None).is_err());
        assert_eq!(
            RateSchedule::new(Some("10MiB/s"), None).unwrap().default,
            Some(10 << 20)
        );
    }

    #[tokio::test]
    async fn the_bucket_paces_to_the_rate() {
        let throttle = Throttle::new(RateSchedule::new(Some("1MiB"), None).unwrap());
        let started = Instant::now();
        for _ in 0..8 {
            throttle.acquire(64 << 10).await;
        }
        // 512 KiB at 1 MiB/s cannot take less than half a second (it may take longer on a
        // busy machine, which says nothing about the throttle).
        let took = started.elapsed().as_secs_f64();
        assert!(took >= 0.45, "{took}");
    }
}
