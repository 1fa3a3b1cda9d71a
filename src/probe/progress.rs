//! What the probe says while it runs: one line per scenario × protocol as it starts and as it
//! ends, on stdout. On a terminal a status line under them shows what is running and for how
//! long, redrawn in place; anywhere else only the plain lines are written.

use super::judge::Verdict;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

pub struct Progress {
    live: bool,
    state: Mutex<State>,
}

struct State {
    running: Vec<String>,
    done: usize,
    total: usize,
    began: Instant,
    /// Whether the status line is on screen (and must be cleared before the next line).
    drawn: bool,
}

impl Progress {
    /// `live`: draw the status line (stdout is a terminal).
    pub fn new(live: bool) -> Progress {
        Progress {
            live,
            state: Mutex::new(State {
                running: Vec::new(),
                done: 0,
                total: 0,
                began: Instant::now(),
                drawn: false,
            }),
        }
    }

    /// How many scenario × protocol results will run.
    pub fn plan(&self, total: usize) {
        let mut s = self.state.lock().expect("progress lock");
        s.total = total;
        s.began = Instant::now();
    }

    pub fn start(&self, label: &str) {
        let mut s = self.state.lock().expect("progress lock");
        s.running.push(label.to_string());
        self.line(&mut s, &format!("started   {label}"));
    }

    pub fn finish(&self, label: &str, verdict: Verdict, detail: &str) {
        let mut s = self.state.lock().expect("progress lock");
        s.running.retain(|l| l != label);
        s.done += 1;
        let (done, total) = (s.done, s.total);
        let detail = crate::text::escaped(detail);
        self.line(&mut s, &format!("finished  {label}: {} — {detail} [{done}/{total}]", verdict.as_str()));
    }

    /// Redraws the status line every 200 ms (on a terminal) until dropped with its task.
    pub async fn tick(&self) {
        if !self.live {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut s = self.state.lock().expect("progress lock");
            self.draw(&mut s);
        }
    }

    /// Clears the status line before the report is printed.
    pub fn clear(&self) {
        let mut s = self.state.lock().expect("progress lock");
        if s.drawn {
            print!("\r\x1b[2K");
            let _ = std::io::stdout().flush();
            s.drawn = false;
        }
    }

    fn line(&self, s: &mut State, text: &str) {
        let mut out = std::io::stdout().lock();
        if s.drawn {
            let _ = write!(out, "\r\x1b[2K");
            s.drawn = false;
        }
        let _ = writeln!(out, "{text}");
        drop(out);
        self.draw(s);
    }

    fn draw(&self, s: &mut State) {
        if !self.live || s.total == 0 {
            return;
        }
        let mut status = format!(
            "{:>4.0} s  {}/{} done, running: {}",
            s.began.elapsed().as_secs_f64(),
            s.done,
            s.total,
            s.running.join(", ")
        );
        if status.chars().count() > 100 {
            status = status.chars().take(99).collect::<String>() + "…";
        }
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[2K{status}");
        let _ = out.flush();
        s.drawn = true;
    }
}
