//! The wire protocol between agent, process server and master target.
//!
//! Every byte travels inside TLS 1.3 with mutual certificates (see [`crate::wire::tls`]). Inside,
//! the stream is a sequence of frames ([`frame`]), each carrying one message ([`message`]).
//!
//! ## Conversation of a resync
//! ```text
//! agent                     process server                 master target
//!   | Hello(versions, machine) --> | (relays, logs machine) --> |
//!   | <-------------------------- Welcome(version) ----------- |
//!   | OpenDisk(handle, id, size, block size) -----------------> |  creates, grows or hashes
//!   |   (hashes its own disk meanwhile)                         |  the VMDK extent
//!   | <------- DiskState(handle, fresh, durable seq, depth, root)|
//!   | HashQuery(handle, level, ranges) ------------------------> |  top-down compare, one
//!   | <------------------------------- HashAnswer(hashes) ----- |  round trip per level
//!   | Blocks(handle, seq, [index, hash, encoding, payload]) ---> |  decode, verify, pwrite
//!   | Blocks(handle, seq + 1, ...) ----------------------------> |  (pipelined, no waiting)
//!   | Flush(handle, seq) --------------------------------------> |  fdatasync, save manifest
//!   | <--------------------------------------- Ack(handle, seq) |  all up to seq is durable
//!   |   (OpenDisk ... Ack again for every other disk of the machine)
//!   | Checkpoint(kind, label) ---------------------------------> |  append to the point log
//!   | <-------------------------- PointCreated(seq, time) ----- |  the point is durable
//!   | Bye ------------------------------------------------------> |
//! ```
//! Any side may send `Error(code, message)` instead of an answer and close the connection.
//! A conversation kept open by `replicate` goes on after `PointCreated` with the next
//! cycle's `HashQuery`, `Blocks`, `Flush` and `Checkpoint` on the disks already open, and
//! says `Bye` only when it ends.
//!
//! ## An operator's conversation
//! An operator's certificate opens no `Hello`: each request is `Operate` (JSON), answered by
//! one `Answer` (JSON) or `Error`; a recovery streams the point's disks as `Blocks` between
//! two `Answer`s (see [`message`]).
//!
//! ## Sequence numbers and resume
//! Each `Blocks` message of a disk carries the next sequence number, starting after the
//! `durable_seq` that `DiskState` reported. `Ack(seq)` promises that every block of every
//! `Blocks` message up to `seq` is on stable storage, and the master target persists that
//! number with the disk's manifest. A sender that keeps unacknowledged batches can therefore
//! resend exactly what follows the last durable sequence after a cut.
//!
//! ## Versioning
//! `Hello` carries the lowest and highest protocol version the agent speaks; `Welcome` names
//! the version chosen, or the master target answers `Error(Version)`. A new message type or
//! field means a new version; message types are never reused.

pub mod client;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod pki;
pub mod throttle;
pub mod tls;
pub mod transport;

pub use frame::{Frame, FrameCodec, MAX_FRAME_LEN};
pub use message::{BlockRecord, DiskState, Message, PROTOCOL_VERSION};
