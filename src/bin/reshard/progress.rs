//! Progress bars on stderr for long operations. The library counts bytes
//! in a [`Progress`]; a bar here polls that counter from its own thread, so
//! the library never draws. Bars are for people: commands skip them with
//! `--json` or when stderr is not a terminal ([`wanted`]).

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reshard::exec::Progress;
use reshard::ops::bench::BenchObserver;

/// How often a bar reads its counter.
const POLL: Duration = Duration::from_millis(100);

/// Whether to draw bars: not for `--json`, and only on a terminal.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// One bar on stderr: bytes against a total while a [`Progress`] counter
/// is given, else a spinner with the elapsed time. Cleared when dropped.
pub struct ByteBar {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    poller: Option<JoinHandle<()>>,
}

impl ByteBar {
    /// Starts a bar labelled `what`, of `total` bytes (0: the total the
    /// job sets in `progress` once it is planned), following `progress`.
    pub fn start(what: &str, total: u64, progress: Option<Progress>) -> ByteBar {
        let stop = Arc::new(AtomicBool::new(false));
        let Some(progress) = progress else {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .expect("a valid template"),
            );
            bar.set_message(what.to_string());
            bar.enable_steady_tick(POLL);
            return ByteBar {
                bar,
                stop,
                poller: None,
            };
        };
        let bar = ProgressBar::with_draw_target(
            (total > 0).then_some(total),
            ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:28} [{bar:30}] {bytes:>10}/{total_bytes:10} {binary_bytes_per_sec:>12} {elapsed}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        let (b, flag) = (bar.clone(), stop.clone());
        let poller = std::thread::spawn(move || loop {
            if total == 0 && progress.total() > 0 {
                b.set_length(progress.total());
            }
            b.set_position(progress.bytes());
            if flag.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(POLL);
        });
        ByteBar {
            bar,
            stop,
            poller: Some(poller),
        }
    }
}

impl Drop for ByteBar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
        self.bar.finish_and_clear();
    }
}

impl fmt::Debug for ByteBar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByteBar").finish_non_exhaustive()
    }
}

/// A bar for a command that writes checkpoints, when bars are wanted:
/// returns the counter to hand to the library and the bar to drop when the
/// command is done.
pub fn for_command(what: &str, json: bool) -> (Option<Progress>, Option<ByteBar>) {
    if !wanted(json) {
        return (None, None);
    }
    let progress = Progress::new();
    let bar = ByteBar::start(what, 0, Some(progress.clone()));
    (Some(progress), Some(bar))
}

/// Draws a [`ByteBar`] for each run `reshard bench` reports.
#[derive(Debug, Default)]
pub struct BenchBars {
    current: Mutex<Option<ByteBar>>,
}

impl BenchObserver for BenchBars {
    fn started(&self, what: &str, total: u64, progress: Option<&Progress>) {
        let bar = ByteBar::start(what, total, progress.cloned());
        // A poisoned lock only means a bar's thread panicked; draw on.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current = Some(bar);
    }

    fn finished(&self) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.take();
    }
}
