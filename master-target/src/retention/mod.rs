//! Retention: recovery points and the undo journal that lets the master target produce a
//! machine's disks as they were at any point in the window.
//!
//! ```text
//! <retention>/<machine>/points.log                  recovery points, append-only (points.rs)
//! <retention>/<machine>/<disk>/<P>.journal          old content of the blocks overwritten on
//!                                                   the way from point P-1 to point P (journal.rs)
//! ```
//! To recover point Q: copy the replica as it is now, then for each journal P > Q in
//! ascending order put back the first old content recorded for every block not yet put
//! back (recover.rs). A journal record is made durable before the block it saves is
//! overwritten, so the journals always cover everything written since Q.

pub mod groups;
pub mod journal;
pub mod points;
pub mod recover;
