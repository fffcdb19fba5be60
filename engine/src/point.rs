//! What a recovery point claims: how consistent it is. The agent asks for a kind in its
//! `Checkpoint`; the master target records it in the point log; the operator reads it back.
//! A point's kind never claims more than the agent proved (a failed pre-hook gives a
//! crash-consistent point, never an app-consistent one).

use serde::Serialize;

/// How consistent a point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// As if the machine lost power at that instant.
    CrashConsistent = 1,
    /// Taken while the application or filesystem was frozen by the pre-hook.
    AppConsistent = 2,
}

impl PointKind {
    /// Decodes the stored byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::CrashConsistent),
            2 => Some(Self::AppConsistent),
            _ => None,
        }
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::CrashConsistent => "crash-consistent",
            Self::AppConsistent => "app-consistent",
        }
    }
}
