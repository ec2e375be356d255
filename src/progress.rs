//! Progress of long work, for a person at a terminal and for a log file alike: an indicatif bar
//! when stderr is a terminal; otherwise (nohup, CI, a cluster job) a one-line record on stderr
//! — stage, position / total, the caller's message (loss, images/s), ETA — at every tenth of the
//! stage and at least every [`RECORD_EVERY`] while it moves. indicatif hides its bar without a
//! terminal, and an MAE pretraining stage, which has no evaluation tables, then printed nothing
//! for 25 minutes.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest silence between two records without a terminal.
pub const RECORD_EVERY: Duration = Duration::from_secs(30);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing (`output.progress = false`).
    Off,
    /// An indicatif bar (stderr is a terminal).
    Bar,
    /// One-line records on stderr (stderr is not a terminal).
    Records,
}

impl Mode {
    /// The mode for `output.progress = enabled` in this process.
    pub fn detect(enabled: bool) -> Mode {
        Mode::choose(enabled, std::io::stderr().is_terminal())
    }

    pub fn choose(enabled: bool, terminal: bool) -> Mode {
        match (enabled, terminal) {
            (false, _) => Mode::Off,
            (true, true) => Mode::Bar,
            (true, false) => Mode::Records,
        }
    }
}

/// When the last record was printed.
struct Last {
    at: Instant,
    tenth: u64,
}

/// What the records need besides the bar's own position and message.
struct Records {
    start: Instant,
    /// Position when this process started the stage (a resumed stage starts part way).
    first: u64,
    last: Mutex<Last>,
}

/// A progress bar or its line records; `&self` methods, usable from rayon workers.
pub struct Progress {
    bar: ProgressBar,
    records: Option<Records>,
    stage: String,
    unit: &'static str,
}

/// Whether a record is due at `pos` of `total`: a new tenth reached (the end included) or
/// [`RECORD_EVERY`] passed since the last one.
pub fn record_due(pos: u64, total: u64, last_tenth: u64, since_last: Duration) -> bool {
    tenth(pos, total) > last_tenth || since_last >= RECORD_EVERY
}

fn tenth(pos: u64, total: u64) -> u64 {
    (pos.min(total) * 10).checked_div(total).unwrap_or(10)
}

/// "1h 02m", "3m 05s", "12s".
pub fn duration_words(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

impl Progress {
    /// Progress of `stage` over `total` `unit`s (e.g. "steps", "images"), starting at `pos`.
    /// `template` is the bar's indicatif template (`{prefix}` is the stage).
    pub fn new(mode: Mode, stage: &str, unit: &'static str, total: u64, pos: u64, template: &str) -> Progress {
        let bar = match mode {
            Mode::Bar => ProgressBar::new(total),
            Mode::Off | Mode::Records => ProgressBar::hidden(),
        };
        // The bar's length and position are kept even when hidden: the records read them.
        bar.set_length(total);
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(stage.to_string());
        bar.set_position(pos);
        let now = Instant::now();
        let records = (mode == Mode::Records).then(|| Records {
            start: now,
            first: pos,
            last: Mutex::new(Last {
                at: now,
                tenth: tenth(pos, total),
            }),
        });
        Progress {
            bar,
            records,
            stage: stage.to_string(),
            unit,
        }
    }

    /// No progress at all.
    pub fn hidden() -> Progress {
        Progress::new(Mode::Off, "", "", 0, 0, "")
    }

    /// The message shown after the position (bar) or in the records, e.g. "loss 0.41  3000 img/s".
    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.maybe_record();
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.maybe_record();
    }

    /// Print `text` above the bar, or to stderr when there is no bar (indicatif drops the lines
    /// of a hidden bar, and logs need them).
    pub fn println(&self, text: &str) {
        if self.bar.is_hidden() {
            eprintln!("{}", text.trim_end());
        } else {
            self.bar.println(text.trim_end());
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }

    pub fn abandon(&self) {
        self.bar.abandon();
    }

    fn maybe_record(&self) {
        let Some(r) = &self.records else { return };
        let (pos, total) = (self.bar.position(), self.bar.length().unwrap_or(0));
        let Ok(mut last) = r.last.lock() else { return };
        if !record_due(pos, total, last.tenth, last.at.elapsed()) {
            return;
        }
        *last = Last {
            at: Instant::now(),
            tenth: tenth(pos, total),
        };
        drop(last);
        eprintln!("{}", self.record(pos, total, r));
    }

    /// `[progress] train: step 1200/9375 (12.8%)  loss 0.4512  3051 img/s  elapsed 4m 10s  ETA 28m 24s`
    fn record(&self, pos: u64, total: u64, r: &Records) -> String {
        let elapsed = r.start.elapsed().as_secs_f64();
        let done = pos.saturating_sub(r.first);
        let eta = match (done, pos >= total) {
            (_, true) => "done".to_string(),
            (0, false) => "unknown".to_string(),
            _ => duration_words(elapsed / done as f64 * (total - pos) as f64),
        };
        let pct = if total == 0 {
            100.0
        } else {
            100.0 * pos as f64 / total as f64
        };
        let msg = self.bar.message();
        let msg = if msg.is_empty() {
            String::new()
        } else {
            format!("  {msg}")
        };
        let unit = self.unit.trim_end_matches('s');
        format!(
            "[progress] {}: {unit} {pos}/{total} ({pct:.1}%){msg}  elapsed {}  ETA {eta}",
            self.stage,
            duration_words(elapsed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_due_at_every_tenth_and_after_a_silence() {
        let quiet = Duration::from_secs(1);
        // 95 steps: tenths at 10, 19, 29, ..., 95; none in between while the clock is quiet.
        let mut last = 0;
        let mut at = Vec::new();
        for pos in 1..=95 {
            if record_due(pos, 95, last, quiet) {
                at.push(pos);
                last = tenth(pos, 95);
            }
        }
        assert_eq!(at, vec![10, 19, 29, 38, 48, 57, 67, 76, 86, 95]);
        assert!(record_due(3, 95, 0, RECORD_EVERY));
        assert!(!record_due(3, 95, 0, RECORD_EVERY - Duration::from_millis(1)));
        // An empty stage is done at once.
        assert!(record_due(0, 0, 0, quiet));
    }

    #[test]
    fn records_only_without_a_terminal_and_nothing_when_off() {
        assert_eq!(Mode::choose(true, true), Mode::Bar);
        assert_eq!(Mode::choose(true, false), Mode::Records);
        assert_eq!(Mode::choose(false, true), Mode::Off);
        assert_eq!(Mode::choose(false, false), Mode::Off);
    }

    #[test]
    fn a_record_names_stage_position_message_and_eta() {
        let p = Progress::new(
            Mode::Records,
            "pretrain",
            "steps",
            200,
            50,
            "{prefix} {pos}/{len} {msg}",
        );
        p.set_message("loss 0.1234  900 img/s".into());
        let r = p.records.as_ref().unwrap();
        let line = p.record(100, 200, r);
        assert!(
            line.starts_with("[progress] pretrain: step 100/200 (50.0%)  loss 0.1234  900 img/s  elapsed "),
            "{line}"
        );
        assert!(line.contains("ETA "), "{line}");
        assert!(p.record(200, 200, r).ends_with("ETA done"));
        assert!(p.record(50, 200, r).ends_with("ETA unknown"));
        assert_eq!(duration_words(59.4), "59s");
        assert_eq!(duration_words(185.0), "3m 05s");
        assert_eq!(duration_words(3720.0), "1h 02m");
    }
}
