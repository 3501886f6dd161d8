//! What `coordinator run` shows while it works. On a terminal: a progress bar (indicatif)
//! of evaluations with the rate, accuracies and fitness. Elsewhere (containers, CI, a log
//! file): an `info!` line every [`LOG_EVERY`], because a redrawn bar is noise in a log.
//!
//! Both read the event loop's [`Telemetry`] from its watch channel, so they cost the loop
//! nothing. Log lines and a bar share stderr: [`LogWriter`] hides the bar while a log line
//! is written, so lines scroll above the bar instead of being drawn through it.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::state::Telemetry;

/// Interval of the plain progress lines.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bar on screen, if any, for [`LogWriter`].
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn set_active(bar: Option<ProgressBar>) {
    *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// The progress display of one run; dropping it stops the display.
pub struct Progress {
    task: JoinHandle<()>,
    bar: Option<ProgressBar>,
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(bar) = &self.bar {
            set_active(None);
            bar.finish_and_clear();
        }
    }
}

/// Starts the display that suits stderr: a bar on a terminal, log lines otherwise.
/// `budget_evaluations` gives the bar its length (a spinner without it).
pub fn spawn(
    telemetry: watch::Receiver<Option<Telemetry>>,
    budget_evaluations: Option<u64>,
) -> Progress {
    if std::io::stderr().is_terminal() {
        let bar = new_bar(budget_evaluations);
        set_active(Some(bar.clone()));
        let task = tokio::spawn(drive_bar(bar.clone(), telemetry));
        Progress {
            task,
            bar: Some(bar),
        }
    } else {
        let task = tokio::spawn(log_lines(telemetry, budget_evaluations, LOG_EVERY));
        Progress { task, bar: None }
    }
}

fn new_bar(length: Option<u64>) -> ProgressBar {
    let (bar, template) = match length {
        Some(n) => (
            ProgressBar::new(n),
            "{spinner} {elapsed_precise} [{bar:20}] {human_pos}/{human_len}  {wide_msg}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} {elapsed_precise} {human_pos} evaluations  {wide_msg}",
        ),
    };
    let style = ProgressStyle::with_template(template)
        .expect("the template is valid")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message("setting up: float reference and quantization");
    // Ticks keep the spinner and clock moving between telemetry updates.
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

async fn drive_bar(bar: ProgressBar, mut rx: watch::Receiver<Option<Telemetry>>) {
    loop {
        let done = match rx.borrow_and_update().as_ref() {
            Some(t) => {
                bar.set_position(t.status.evaluations);
                bar.set_message(bar_message(t));
                t.status.phase == "done"
            }
            None => false,
        };
        if done || rx.changed().await.is_err() {
            break;
        }
    }
    // Cleared rather than left: a finished bar keeps the cursor at the end of its line, so
    // the next log line would start there. The run's last log lines say where it ended.
    set_active(None);
    bar.finish_and_clear();
}

async fn log_lines(
    mut rx: watch::Receiver<Option<Telemetry>>,
    budget_evaluations: Option<u64>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; nothing has happened yet.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(t) = rx.borrow().as_ref() {
                    // Numbers for machines are at the metrics endpoint; this line is for people.
                    info!("progress: {}", summary(t, budget_evaluations));
                }
            }
            changed = rx.changed() => {
                let done = rx.borrow().as_ref().is_some_and(|t| t.status.phase == "done");
                if changed.is_err() || done {
                    break;
                }
            }
        }
    }
}

/// One line for logs: where the run is and how well it does.
pub fn summary(t: &Telemetry, budget_evaluations: Option<u64>) -> String {
    let s = &t.status;
    let mut out = format!("generation {}, {} ", t.generations, s.evaluations);
    if let Some(b) = budget_evaluations.filter(|&b| b > 0) {
        out += &format!(
            "of {b} evaluations ({:.0} %)",
            100.0 * s.evaluations as f64 / b as f64
        );
    } else {
        out += "evaluations";
    }
    out += &format!(" at {:.1}/s", s.evaluations_per_sec);
    if !s.waiting_for_workers.is_empty() {
        out += ", WAITING: no worker connected";
    }
    out += &accuracy_text(t);
    if let Some(eta) = s.eta_secs {
        out += &format!(", eta {}", duration(eta));
    }
    out
}

/// Accuracy first: a narrow terminal cuts the message from the right.
fn bar_message(t: &Telemetry) -> String {
    let s = &t.status;
    let mut parts = Vec::new();
    if let Some(v) = s.test_top1 {
        parts.push(format!("test {v:.2} %"));
    }
    if let Some(v) = s.val_top1 {
        parts.push(format!("val {v:.2} %"));
    }
    if s.best_fitness.is_finite() {
        parts.push(format!("fitness {:.3}", s.best_fitness));
    }
    if !s.waiting_for_workers.is_empty() {
        parts.push("WAITING: no worker connected".into());
    }
    parts.push(format!("{:.0} evals/s", s.evaluations_per_sec));
    parts.push(format!("gen {}", t.generations));
    if let Some(eta) = s.eta_secs {
        parts.push(format!("eta {}", duration(eta)));
    }
    parts.join("  ")
}

fn accuracy_text(t: &Telemetry) -> String {
    let s = &t.status;
    let mut out = String::new();
    if s.best_fitness.is_finite() {
        out += &format!(", fitness {:.4}", s.best_fitness);
    }
    if let Some(v) = s.val_top1 {
        out += &format!(", val {v:.2} %");
    }
    if let Some(v) = s.test_top1 {
        out += &format!(", test {v:.2} %");
    }
    out
}

/// `1h02m`, `3m05s`, `42s`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// Stderr for tracing that keeps an active progress bar intact: the bar is hidden while
/// the line is written and redrawn below it. `ccq_proto::process::init_tracing` passes it to `with_writer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    /// tracing's formatter hands over one whole event per call, so one call is one line.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Histogram;
    use crate::state::RunStatus;

    fn telemetry(phase: &str) -> Telemetry {
        let empty = Histogram {
            bounds: vec![],
            counts: vec![0],
            sum: 0.0,
            count: 0,
        };
        Telemetry {
            status: RunStatus {
                phase: phase.into(),
                evaluations: 5000,
                evaluations_per_sec: 151.26,
                best_fitness: 0.94677,
                val_top1: Some(65.6),
                test_top1: Some(65.5),
                eta_secs: Some(125.4),
                ..Default::default()
            },
            generations: 312,
            adoptions: 0,
            jobs_completed: 0,
            jobs_retried: 0,
            job_seconds: empty,
            worker_job_seconds: Default::default(),
        }
    }

    #[test]
    fn summary_reads_like_a_sentence() {
        assert_eq!(
            summary(&telemetry("training"), Some(20_000)),
            "generation 312, 5000 of 20000 evaluations (25 %) at 151.3/s, fitness 0.9468, \
             val 65.60 %, test 65.50 %, eta 2m05s"
        );
        let mut t = telemetry("training");
        t.status.best_fitness = f64::NAN;
        t.status.val_top1 = None;
        t.status.eta_secs = None;
        assert_eq!(
            summary(&t, None),
            "generation 312, 5000 evaluations at 151.3/s, test 65.50 %"
        );
    }

    #[test]
    fn bar_message_puts_accuracy_first() {
        assert_eq!(
            bar_message(&telemetry("training")),
            "test 65.50 %  val 65.60 %  fitness 0.947  151 evals/s  gen 312  eta 2m05s"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(59.6), "1m00s");
        assert_eq!(duration(3599.0), "59m59s");
        assert_eq!(duration(3723.0), "1h02m");
        assert_eq!(duration(-5.0), "0s");
    }

    #[tokio::test]
    async fn log_lines_end_with_the_run() {
        // Ends when the phase is done...
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(log_lines(rx, None, Duration::from_secs(3600)));
        tx.send_replace(Some(telemetry("training")));
        tx.send_replace(Some(telemetry("done")));
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ends after phase done")
            .unwrap();
        // ...or when the loop is gone.
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(log_lines(rx, None, Duration::from_secs(3600)));
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ends when the sender is dropped")
            .unwrap();
    }
}
