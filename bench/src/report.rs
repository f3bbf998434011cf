//! How results are shown: the machine and settings, a human table, and one JSON line per
//! result (`{"bench", "metric", "value", "unit", settings...}`), so a script can grep the
//! JSON lines while a person reads the table. With several trials, every trial's value is
//! printed as it is measured, then the median (min–max) of each metric.

use serde_json::{json, Map, Value};

/// What the benchmarks ran on, repeated in every JSON line so a line stands on its own.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
    /// The 1-minute load average when the bench started: other work on the machine (a
    /// build, say) shows up here and in the figures.
    pub loadavg: f64,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_default();
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(f64::NAN);
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_gib,
            kernel,
            loadavg,
        }
    }
}

/// One metric's values, one per trial.
#[derive(Debug)]
struct Series {
    metric: String,
    unit: &'static str,
    values: Vec<f64>,
}

/// Prints one benchmark's results.
#[derive(Debug)]
pub struct Reporter {
    bench: &'static str,
    /// The settings (and machine) added to every JSON line.
    settings: Map<String, Value>,
    json_only: bool,
    series: Vec<Series>,
    header_done: bool,
    /// JSON lines not printed yet: in the human mode they follow the tables, so the tables
    /// stay readable; with `--json-only` each is printed at once.
    pending_json: Vec<String>,
}

impl Reporter {
    /// Prints the machine and `settings` (an object) unless `json_only`.
    pub fn new(bench: &'static str, machine: &Machine, settings: Value, json_only: bool) -> Self {
        let mut map = match settings {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if !json_only {
            println!();
            println!("== {bench} ==");
            println!(
                "machine: {} cores, {}, {:.1} GiB RAM, Linux {}, load average {:.2} at start",
                machine.cores, machine.cpu, machine.memory_gib, machine.kernel, machine.loadavg
            );
            let shown: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("settings: {}", shown.join(" "));
        }
        map.insert("cores".into(), json!(machine.cores));
        map.insert("cpu".into(), json!(machine.cpu));
        map.insert("loadavg".into(), json!(machine.loadavg));
        Reporter {
            bench,
            settings: map,
            json_only,
            series: Vec::new(),
            header_done: false,
            pending_json: Vec::new(),
        }
    }

    /// A human note (what a metric means, a warning); not printed with `--json-only`.
    pub fn note(&self, text: &str) {
        if !self.json_only {
            println!("  {text}");
        }
    }

    /// Records and prints one trial's value of one metric.
    pub fn value(&mut self, trial: u32, metric: &str, unit: &'static str, value: f64) {
        if !self.json_only {
            if !self.header_done {
                println!("{:>5}  {:<40} {:>14}  unit", "trial", "metric", "value");
                self.header_done = true;
            }
            println!(
                "{trial:>5}  {metric:<40} {:>14}  {unit}",
                format_value(value, unit)
            );
        }
        let mut line = self.line(metric, unit, value);
        line.insert("trial".into(), json!(trial));
        self.json(line);
        match self.series.iter_mut().find(|s| s.metric == metric) {
            Some(s) => s.values.push(value),
            None => self.series.push(Series {
                metric: metric.to_string(),
                unit,
                values: vec![value],
            }),
        }
    }

    /// With more than one trial: the median (min–max) of every metric, as a table and as
    /// JSON lines with `"stat": "median"`.
    pub fn summary(&mut self) {
        let trials = self
            .series
            .iter()
            .map(|s| s.values.len())
            .max()
            .unwrap_or(0);
        if trials < 2 {
            self.flush_json();
            return;
        }
        if !self.json_only {
            println!();
            println!(
                "{:<40} {:>14} {:>14} {:>14}  unit   ({trials} trials)",
                "metric", "median", "min", "max"
            );
        }
        let mut lines = Vec::new();
        for s in &self.series {
            let mut sorted = s.values.clone();
            sorted.sort_by(f64::total_cmp);
            let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
            let median = median_of_sorted(&sorted);
            if !self.json_only {
                println!(
                    "{:<40} {:>14} {:>14} {:>14}  {}",
                    s.metric,
                    format_value(median, s.unit),
                    format_value(min, s.unit),
                    format_value(max, s.unit),
                    s.unit
                );
            }
            let mut line = self.line(&s.metric, s.unit, median);
            line.insert("stat".into(), json!("median"));
            line.insert("min".into(), json!(round(min, s.unit)));
            line.insert("max".into(), json!(round(max, s.unit)));
            line.insert("trials".into(), json!(sorted.len()));
            lines.push(line);
        }
        for line in lines {
            self.json(line);
        }
        self.flush_json();
    }

    fn json(&mut self, line: Map<String, Value>) {
        let line = Value::Object(line).to_string();
        if self.json_only {
            println!("{line}");
        } else {
            self.pending_json.push(line);
        }
    }

    fn flush_json(&mut self) {
        for line in self.pending_json.drain(..) {
            println!("{line}");
        }
    }

    fn line(&self, metric: &str, unit: &str, value: f64) -> Map<String, Value> {
        let mut line = Map::new();
        line.insert("bench".into(), json!(self.bench));
        line.insert("metric".into(), json!(metric));
        line.insert("value".into(), json!(round(value, unit)));
        line.insert("unit".into(), json!(unit));
        for (k, v) in &self.settings {
            line.insert(k.clone(), v.clone());
        }
        line
    }
}

impl Drop for Reporter {
    /// A run that failed half way still prints the JSON lines of what it measured.
    fn drop(&mut self) {
        self.flush_json();
    }
}

/// Adds the fields of `extra` (an object) to `settings` (an object).
pub fn merge(settings: &mut Value, extra: Value) {
    if let (Value::Object(s), Value::Object(e)) = (settings, extra) {
        s.extend(e);
    }
}

fn median_of_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Whole numbers for counts, rates and bytes; three decimals for durations and MiB.
fn decimals(unit: &str) -> usize {
    match unit {
        "ms" | "s" | "µs" | "MiB" | "%" => 3,
        _ => 0,
    }
}

fn round(value: f64, unit: &str) -> f64 {
    let scale = 10f64.powi(decimals(unit) as i32);
    (value * scale).round() / scale
}

fn format_value(value: f64, unit: &str) -> String {
    format!("{value:.*}", decimals(unit))
}

/// The `p`-quantile (0–1) of `sorted` by the nearest-rank method: the smallest sample
/// with at least `p` of the samples at or below it.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Bytes to MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 500.0);
        assert_eq!(quantile(&v, 0.99), 990.0);
        assert_eq!(quantile(&v, 0.999), 999.0);
        assert_eq!(quantile(&v, 1.0), 1000.0);
        assert_eq!(quantile(&[7.0], 0.999), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median_of_sorted(&[1.0, 2.0, 3.0, 10.0]), 2.5);
        assert_eq!(median_of_sorted(&[1.0, 2.0, 30.0]), 2.0);
    }
}
