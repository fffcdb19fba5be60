//! What a recovery point claims: how consistent it is. The agent asks for a kind in its
//! `Checkpoint`; the master target records it in the point log; the operator reads it back.
//! A point's kind never claims more than the agent proved (a failed pre-hook gives a
//! crash-consistent point, never an app-consistent one).

use serde::Serialize;

use crate::error::{Error, Result};

/// Longest recovery point label, in bytes.
pub const MAX_LABEL_LEN: usize = 128;

/// Checks a recovery point label: short printable text (no control characters), at most
/// [`MAX_LABEL_LEN`] bytes. Labels come from operators and peers and end up in tables.
pub fn check_label(label: &str) -> Result<()> {
    if label.len() > MAX_LABEL_LEN {
        return Err(Error::Invalid(format!(
            "recovery point label of {} bytes; at most {MAX_LABEL_LEN}",
            label.len()
        )));
    }
    if label.chars().any(char::is_control) {
        return Err(Error::Invalid(
            "recovery point labels are printable text: no control characters".into(),
        ));
    }
    Ok(())
}

/// How consistent a point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// As if the machine lost power at that instant.
    CrashConsistent = 1,
    /// Taken while the application or filesystem was frozen by the pre-hook.
    AppConsistent = 2,
    /// The disks were read while they changed and no instant could be proven: blocks may
    /// come from different moments. Recoverable by number, never chosen as `latest`.
    NotPointInTime = 3,
}

impl PointKind {
    /// Decodes the stored byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::CrashConsistent),
            2 => Some(Self::AppConsistent),
            3 => Some(Self::NotPointInTime),
            _ => None,
        }
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::CrashConsistent => "crash-consistent",
            Self::AppConsistent => "app-consistent",
            Self::NotPointInTime => "not-point-in-time",
        }
    }

    /// True when the point holds the disks as they were at one instant.
    pub fn is_point_in_time(self) -> bool {
        self != Self::NotPointInTime
    }

    /// The weaker of two kinds: what a point made of both can claim.
    pub fn weaker(self, other: Self) -> Self {
        let rank = |k: Self| match k {
            Self::NotPointInTime => 0,
            Self::CrashConsistent => 1,
            Self::AppConsistent => 2,
        };
        if rank(other) < rank(self) {
            other
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short_printable_text() {
        assert!(check_label("").is_ok());
        assert!(check_label("before upgrade — v2.1").is_ok());
        assert!(check_label(&"x".repeat(MAX_LABEL_LEN)).is_ok());
        assert!(check_label(&"x".repeat(MAX_LABEL_LEN + 1)).is_err());
        assert!(check_label("two\nlines").is_err());
        assert!(check_label("bell\u{7}").is_err());
        assert!(check_label("esc\u{1b}[31m").is_err());
    }
}
