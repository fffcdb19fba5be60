//! The engine's one public error type.
//!
//! Every fallible engine call returns [`Error`]. Variants carry the context an operator needs
//! (what was being done, to which path or disk) and keep the underlying cause as `source()`.
//! Messages never repeat their source; print the chain to see everything.

use std::path::PathBuf;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Codes carried by a protocol `Error` message, so a peer can tell failures apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Anything not covered by a more precise code.
    Internal = 1,
    /// The peer broke the protocol: bad frame, unexpected message, bad field.
    Protocol = 2,
    /// A name or value was refused (disk id, block size, sizes).
    Invalid = 3,
    /// A block's data does not match the hash sent with it.
    HashMismatch = 4,
    /// The disk is being written by another session.
    Busy = 5,
    /// The peer's certificate does not carry the role this service accepts.
    Forbidden = 6,
    /// The storage failed (I/O error, disk full).
    Storage = 7,
    /// The protocol versions of the two sides do not overlap.
    Version = 8,
    /// A service on the path is unreachable for now; try again later.
    Unavailable = 9,
    /// A file on the far side is damaged; an operator must look. Never retried.
    Damaged = 10,
    /// The machine was failed over: its replicas are live disks now, and no agent may
    /// write them until it is reprotected. Never retried.
    FailedOver = 11,
    /// The operator is failing the machine over as planned: make a final app-consistent
    /// point (label `final`), then stop. Never retried as it is.
    FinalRequested = 12,
}

impl ErrorCode {
    /// Decodes a wire code; unknown codes become [`ErrorCode::Internal`].
    pub fn from_u16(code: u16) -> Self {
        match code {
            2 => Self::Protocol,
            3 => Self::Invalid,
            4 => Self::HashMismatch,
            5 => Self::Busy,
            6 => Self::Forbidden,
            7 => Self::Storage,
            8 => Self::Version,
            9 => Self::Unavailable,
            10 => Self::Damaged,
            11 => Self::FailedOver,
            12 => Self::FinalRequested,
            _ => Self::Internal,
        }
    }
}

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a file failed.
    #[error("{op} {}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An I/O operation on a network connection failed.
    #[error("{op}")]
    Net {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A value given by the operator or a peer is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The peer broke the wire protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A frame announced a length above the maximum; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    /// The connection ended inside a frame or before the conversation was complete.
    #[error("connection closed unexpectedly {0}")]
    Truncated(&'static str),
    /// A block's decoded data does not hash to the hash sent with it.
    #[error("block {index} of disk {disk}: data does not match its blake3 hash")]
    HashMismatch { disk: String, index: u64 },
    /// A file on disk is damaged (bad magic, version or checksum).
    #[error("{} is damaged: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// TLS setup or handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer's certificate does not stand for a role this service accepts.
    #[error("{0}")]
    Forbidden(String),
    /// A service on the path is unreachable for now.
    #[error("{0}")]
    Unavailable(String),
    /// QEMU refused a command or broke its QMP protocol.
    #[error("QEMU: {0}")]
    Qemu(String),
    /// Certificate generation or loading failed.
    #[error("PKI: {0}")]
    Pki(String),
    /// A file is not ours to write: what it is, and how the operator can proceed. Nothing
    /// was written.
    #[error("refusing {}: {reason}; {fix}", path.display())]
    Refused {
        path: PathBuf,
        reason: String,
        fix: String,
    },
    /// The peer said nothing for too long; the connection was closed.
    #[error("the peer was silent for {}s; closing the connection", .0.as_secs())]
    Idle(std::time::Duration),
    /// The disk is being replicated by another session, here or on the far side.
    #[error("{0}")]
    Busy(String),
    /// The two sides speak no common protocol version.
    #[error("{0}")]
    Version(String),
    /// The machine was failed over; what happened and what to run next.
    #[error("{0}")]
    FailedOver(String),
    /// A planned failover waits for the machine's final app-consistent point.
    #[error("{0}")]
    FinalRequested(String),
    /// The far side answered with an error message (never built for our own failures).
    #[error("{peer} refused: {message}")]
    Remote {
        peer: &'static str,
        code: ErrorCode,
        message: String,
    },
}

/// Codecs need a conversion from bare I/O errors: those come from the network stream.
impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                return Error::Truncated("(cut without TLS close_notify)")
            }
            // rustls reports a refused peer or a TLS alert as InvalidData: not transient.
            std::io::ErrorKind::InvalidData => return Error::Tls(source.to_string()),
            _ => {}
        }
        Error::Net {
            op: "network I/O",
            source,
        }
    }
}

impl Error {
    /// Builds a closure that wraps an I/O error with the operation and path it came from.
    pub fn file(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::File { op, path, source }
    }

    /// Builds a closure that wraps a network I/O error with the operation it came from.
    pub fn net(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Net { op, source }
    }

    /// The protocol code that tells a peer what kind of failure this was.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::File { .. } => ErrorCode::Storage,
            Error::Invalid(_) | Error::Refused { .. } => ErrorCode::Invalid,
            Error::Protocol(_) | Error::FrameTooLarge { .. } | Error::Truncated(_) => {
                ErrorCode::Protocol
            }
            Error::HashMismatch { .. } => ErrorCode::HashMismatch,
            Error::Remote { code, .. } => *code,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Busy(_) => ErrorCode::Busy,
            Error::Corrupt { .. } => ErrorCode::Damaged,
            Error::Version(_) => ErrorCode::Version,
            Error::FailedOver(_) => ErrorCode::FailedOver,
            Error::FinalRequested(_) => ErrorCode::FinalRequested,
            _ => ErrorCode::Internal,
        }
    }

    /// True for failures that may go away by themselves (a cut connection, a service that
    /// is restarting, a busy disk, a full disk being cleaned up): worth retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Net { .. } | Error::Truncated(_) | Error::Unavailable(_) | Error::Busy(_) => {
                true
            }
            Error::Remote { code, .. } => matches!(
                code,
                ErrorCode::Busy | ErrorCode::Storage | ErrorCode::Unavailable | ErrorCode::Internal
            ),
            _ => false,
        }
    }

    /// True when the machine was failed over (here, or on the far side): its agent must
    /// stop for good.
    pub fn is_failed_over(&self) -> bool {
        matches!(
            self,
            Error::FailedOver(_)
                | Error::Remote {
                    code: ErrorCode::FailedOver,
                    ..
                }
        )
    }

    /// True when a planned failover asks for the machine's final point.
    pub fn is_final_requested(&self) -> bool {
        matches!(
            self,
            Error::FinalRequested(_)
                | Error::Remote {
                    code: ErrorCode::FinalRequested,
                    ..
                }
        )
    }

    /// True for faults that will not go away without an operator: damaged files, disks
    /// deltaback refuses to write, local storage failures, certificates. Services log these
    /// at ERROR.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            Error::Corrupt { .. } | Error::Refused { .. } | Error::File { .. } | Error::Pki(_)
        )
    }

    /// The message with its whole source chain, for logs and protocol `Error` messages.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        text
    }
}
