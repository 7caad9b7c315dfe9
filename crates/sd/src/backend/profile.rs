//! Per-op wall time of the CPU backend, for finding where a step goes: enabled by the
//! environment variable `FERRY_OP_PROFILE=1` (read once), off otherwise at the cost of one load.
//!
//! Each op call is timed under a label that names the op and the shape class that decides its
//! speed (for example `conv2d 3x3 320->320 @64x64`); [`report`] lists the labels by total time.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Calls and total time per label.
type Table = HashMap<String, (u64, Duration)>;

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether op profiling is on (`FERRY_OP_PROFILE` set to anything but `0`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FERRY_OP_PROFILE").is_ok_and(|v| v != "0"))
}

/// Runs `f`, adding its wall time to `label()`'s total when profiling is on.
pub fn timed<T>(label: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let out = f();
    let dt = t.elapsed();
    let mut tab = table().lock().unwrap_or_else(|e| e.into_inner());
    let e = tab.entry(label()).or_default();
    e.0 += 1;
    e.1 += dt;
    out
}

/// Forgets everything timed so far.
pub fn reset() {
    table().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// One line per label, largest total first: total ms, share, calls, label.
pub fn report() -> String {
    let tab = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = tab.iter().collect();
    rows.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
    let total: f64 = rows.iter().map(|r| r.1 .1.as_secs_f64()).sum();
    let mut s = format!(
        "{:>10}  {:>6}  {:>6}  op (total {:.3} s)\n",
        "ms", "share", "calls", total
    );
    for (label, (n, d)) in rows {
        let ms = d.as_secs_f64() * 1e3;
        let share = 100.0 * d.as_secs_f64() / total.max(1e-12);
        s.push_str(&format!("{ms:>10.1}  {share:>5.1}%  {n:>6}  {label}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_labels_by_total_time() {
        // Exercise the table directly: `enabled()` depends on the process environment.
        reset();
        {
            let mut tab = table().lock().unwrap();
            tab.insert("small".into(), (3, Duration::from_millis(2)));
            tab.insert("big".into(), (1, Duration::from_millis(8)));
        }
        let r = report();
        let big = r.find("big").unwrap();
        let small = r.find("small").unwrap();
        assert!(big < small, "{r}");
        assert!(r.contains("80.0%"), "{r}");
        reset();
    }
}
