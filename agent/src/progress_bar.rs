//! Draws the sync's progress on a terminal: hashing and sending apart, with rates.
//! Nothing is drawn, and no thread runs, when stderr is not a terminal; `finish` wakes the
//! drawing thread at once (a sync does not wait out a redraw interval before it exits).

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use agent::{Phase, Progress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the bars are redrawn.
const REDRAW: Duration = Duration::from_millis(100);

pub struct Bars {
    /// Dropping the sender stops the drawing thread.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bars {
    pub fn finish(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn spawn(progress: Arc<Progress>) -> Bars {
    if !std::io::stderr().is_terminal() {
        return Bars {
            stop: None,
            thread: None,
        };
    }
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let hashing = multi.add(
            ProgressBar::new(0)
                .with_style(style.clone())
                .with_prefix("hashing"),
        );
        let sending = multi.add(ProgressBar::new(0).with_style(style).with_prefix("sending"));
        loop {
            hashing.set_length(progress.hash_total.load(Ordering::Relaxed));
            hashing.set_position(progress.hashed.load(Ordering::Relaxed));
            sending.set_length(progress.send_total.load(Ordering::Relaxed));
            sending.set_position(progress.sent.load(Ordering::Relaxed));
            let phase = match progress.phase() {
                Phase::Comparing => "comparing hash trees",
                Phase::Flushing => "waiting for the master target to flush",
                _ => "",
            };
            sending.set_message(phase);
            if progress.hash_total.load(Ordering::Relaxed) == 0
                && matches!(progress.phase(), Phase::Sending | Phase::Flushing)
            {
                hashing.set_message("not needed: new replica, hashed while sending");
            }
            match stopped.recv_timeout(REDRAW) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        hashing.finish_and_clear();
        sending.finish_and_clear();
    });
    Bars {
        stop: Some(stop),
        thread: Some(thread),
    }
}
