//! `queen submit`: one task from flags (or `-- CMD ARGS` for `exec`), or a file of specs sent
//! through the batch endpoint in atomic chunks; `--wait` follows them to the end.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use shared::api::{BatchRequest, Dependency, RetrySpec, TaskSpec, TaskState, TaskView};
use shared::TaskId;

use super::{CliError, Ctx, Exit};

/// Tasks per batch request. Each chunk is one atomic write on the queen; 1,000 keeps a
/// request well under the default `tasks.max_batch` (10,000) and body limit, and one
/// chunk's commit short enough not to stall other clients.
pub const BATCH_CHUNK: usize = 1_000;
/// Largest `--file` read. The whole file is read and every spec checked before the first
/// chunk is sent, so a typo on line 90,000 does not leave 89 chunks submitted.
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;
/// The fastest `--wait` asks about one task: only a queen that ignores `wait_ms` (older than
/// the long poll) answers faster, and it is then polled at this pace.
pub const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long `--wait` lets the queen hold a request for an unfinished task (`?wait_ms=`):
/// the answer comes when the task ends, not at the next poll. Well inside the client's
/// request timeout.
pub const WAIT_HOLD_MS: u64 = 10_000;
/// Width of the `--wait` progress bar, in characters.
const BAR_WIDTH: usize = 24;

/// Submit a task, or a file of tasks, and print the new id(s), one per line.
///
/// The task's fields are flags; `-- CMD ARGS...` submits an `exec` task running that command
/// (payload `{"cmd": [CMD, ARGS...]}`).
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("spec").multiple(true)))]
#[command(after_help = "\
Examples:
  queen submit echo --payload '{\"n\": 1}' --queue reports --priority 5
  queen submit --label linux --timeout-ms 60000 -- sh -c 'echo hi from $HIVE_TASK_ID'
  queen submit --file batch.json --wait          # {\"tasks\": [...]}
  generate-specs | queen submit --file -         # NDJSON, one spec per line

With --json, prints the API's answer: the task (one submit) or {\"tasks\": [...]} (--file);
with --wait, their final state.")]
pub struct SubmitArgs {
    /// What runs the task: `exec` or `echo` (the shipped drone's kinds), or any kind a
    /// connected drone announces. Defaults to `exec` when a command follows `--`.
    #[arg(required_unless_present_any = ["cmd", "file"], conflicts_with = "file")]
    kind: Option<String>,
    /// The payload, as JSON (default null). Not with `-- CMD`, which makes the payload.
    #[arg(long, value_name = "JSON", conflicts_with_all = ["cmd", "file"])]
    payload: Option<String>,
    /// Queue (default `default`); queues can be paused and limited.
    #[arg(long, value_name = "QUEUE", group = "spec")]
    queue: Option<String>,
    /// Higher runs first (default 0; may be negative).
    #[arg(long, value_name = "N", allow_negative_numbers = true, group = "spec")]
    priority: Option<i32>,
    /// Run no sooner than this many milliseconds from now.
    #[arg(long, value_name = "MS", conflicts_with = "run_at", group = "spec")]
    delay_ms: Option<u64>,
    /// Run no sooner than this instant, e.g. 2026-01-01T12:00:00Z.
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339, group = "spec")]
    run_at: Option<DateTime<Utc>>,
    /// Attempts before the task fails for good (default: the queen's tasks.max_attempts).
    #[arg(long, value_name = "N", group = "spec")]
    max_attempts: Option<u32>,
    /// Per attempt; the drone kills an attempt that runs longer.
    #[arg(long, value_name = "MS", group = "spec")]
    timeout_ms: Option<u64>,
    /// Only a drone with this label takes the task (repeat for several; it needs all).
    #[arg(long = "label", value_name = "LABEL", group = "spec")]
    labels: Vec<String>,
    /// A second submit with the same key returns the first task instead of a new one.
    #[arg(long, value_name = "KEY", group = "spec")]
    idempotency_key: Option<String>,
    /// Run only after this task succeeded (repeat for several).
    #[arg(long = "depends-on", value_name = "ID", value_parser = super::parse_id, group = "spec")]
    depends_on: Vec<TaskId>,
    /// Retry backoff: the first wait, in milliseconds (default: the queen's).
    #[arg(
        long,
        value_name = "MS",
        group = "spec",
        help_heading = "Retry backoff"
    )]
    retry_initial_ms: Option<u64>,
    /// Retry backoff: each wait is this times the previous one.
    #[arg(long, value_name = "X", group = "spec", help_heading = "Retry backoff")]
    retry_factor: Option<f64>,
    /// Retry backoff: the longest wait, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        group = "spec",
        help_heading = "Retry backoff"
    )]
    retry_max_ms: Option<u64>,
    /// Retry backoff: take up to this fraction (0-1) off each wait, at random.
    #[arg(long, value_name = "F", group = "spec", help_heading = "Retry backoff")]
    retry_jitter: Option<f64>,
    /// Submit the task specs in PATH (`-` reads stdin): a JSON batch {"tasks": [...]}, or
    /// NDJSON with one spec per line. Every spec is checked first; then they go to the
    /// batch endpoint in chunks of at most 1000 tasks. Each chunk is atomic (all of its
    /// tasks are created or none), but if a later chunk is refused the earlier ones stay
    /// submitted (their ids are printed). A `ref` can only be depended on within its chunk.
    #[arg(long, short, value_name = "PATH", conflicts_with_all = ["spec", "cmd"])]
    file: Option<PathBuf>,
    /// Wait until every submitted task has ended, showing progress on stderr; exit 1 if
    /// any failed or was cancelled.
    #[arg(long)]
    wait: bool,
    /// The command an `exec` task runs, after `--`.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn parse_rfc3339(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 timestamp like 2026-01-01T12:00:00Z ({e})"))
}

pub fn run(ctx: &Ctx, out: &mut impl Write, args: SubmitArgs) -> Result<Exit, CliError> {
    let wait = args.wait;
    if let Some(path) = &args.file {
        let specs = read_specs(path)?;
        return submit_batch(ctx, out, specs, wait);
    }
    let spec = spec_from_flags(args)?;
    let doc = ctx.client.post(
        "/v1/tasks",
        Some(&serde_json::to_value(&spec).map_err(|e| CliError::Invalid(e.to_string()))?),
    )?;
    let view: TaskView = ctx.client.decode(doc.clone())?;
    if !wait {
        if ctx.json {
            ctx.print_json(out, &doc)?;
        } else {
            writeln!(out, "{}", view.id)?;
        }
        return Ok(Exit::Ok);
    }
    if !ctx.json {
        writeln!(out, "{}", view.id)?;
        out.flush()?;
    }
    let (mut docs, exit) = wait_for(ctx, &[view.id])?;
    if ctx.json {
        ctx.print_json(out, &docs.pop().unwrap_or(doc))?;
    }
    Ok(exit)
}

fn spec_from_flags(a: SubmitArgs) -> Result<TaskSpec, CliError> {
    let (kind, payload) = if a.cmd.is_empty() {
        let payload = match &a.payload {
            Some(raw) => serde_json::from_str(raw)
                .map_err(|e| CliError::Invalid(format!("invalid --payload: not JSON ({e})")))?,
            None => Value::Null,
        };
        // clap requires KIND unless a command or a file is given, and --file returned earlier.
        let kind = a
            .kind
            .ok_or_else(|| CliError::Invalid("give a task KIND or `-- CMD ARGS...`".into()))?;
        (kind, payload)
    } else {
        (
            a.kind.unwrap_or_else(|| "exec".into()),
            json!({ "cmd": a.cmd }),
        )
    };
    let retry = a.retry_initial_ms.is_some()
        || a.retry_factor.is_some()
        || a.retry_max_ms.is_some()
        || a.retry_jitter.is_some();
    Ok(TaskSpec {
        kind,
        payload,
        queue: a.queue,
        priority: a.priority,
        run_at: a.run_at,
        delay_ms: a.delay_ms,
        max_attempts: a.max_attempts,
        timeout_ms: a.timeout_ms,
        labels: a.labels,
        idempotency_key: a.idempotency_key,
        depends_on: a.depends_on.into_iter().map(Dependency::Id).collect(),
        reference: None,
        retry: retry.then_some(RetrySpec {
            initial_ms: a.retry_initial_ms,
            factor: a.retry_factor,
            max_ms: a.retry_max_ms,
            jitter: a.retry_jitter,
        }),
    })
}

/// Reads and checks every spec of a `--file` (or stdin for `-`).
fn read_specs(path: &std::path::Path) -> Result<Vec<TaskSpec>, CliError> {
    let name = if path.as_os_str() == "-" {
        "stdin".to_string()
    } else {
        path.display().to_string()
    };
    let mut raw = Vec::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut raw)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut raw))
    };
    read.map_err(|e| CliError::Invalid(format!("cannot read {name}: {e}")))?;
    if raw.len() as u64 > MAX_FILE_BYTES {
        return Err(CliError::Invalid(format!(
            "{name} is larger than {MAX_FILE_BYTES} bytes; split it"
        )));
    }
    let text = String::from_utf8(raw)
        .map_err(|e| CliError::Invalid(format!("{name} is not UTF-8 text ({e})")))?;
    let specs = parse_specs(&text).map_err(|e| CliError::Invalid(format!("{name}: {e}")))?;
    if specs.is_empty() {
        return Err(CliError::Invalid(format!("{name} holds no task specs")));
    }
    check_refs(&specs, BATCH_CHUNK).map_err(|e| CliError::Invalid(format!("{name}: {e}")))?;
    Ok(specs)
}

/// A JSON batch `{"tasks": [...]}` (or a bare array of specs), else NDJSON: one spec per
/// line, blank lines skipped. Errors name the entry or line, and the field when serde does.
fn parse_specs(text: &str) -> Result<Vec<TaskSpec>, String> {
    let spec = |v: Value, at: &dyn Fn() -> String| {
        serde_json::from_value::<TaskSpec>(v)
            .map_err(|e| format!("invalid task spec {}: {e}", at()))
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut obj)) if obj.contains_key("tasks") => {
            let tasks = obj.remove("tasks");
            if let Some(extra) = obj.keys().next() {
                return Err(format!(
                    "unknown field `{extra}` in the batch, expected only `tasks`"
                ));
            }
            let Some(Value::Array(tasks)) = tasks else {
                return Err("`tasks` must be an array of task specs".into());
            };
            tasks
                .into_iter()
                .enumerate()
                .map(|(i, v)| spec(v, &|| format!("at tasks[{i}]")))
                .collect()
        }
        Ok(Value::Array(tasks)) => tasks
            .into_iter()
            .enumerate()
            .map(|(i, v)| spec(v, &|| format!("at [{i}]")))
            .collect(),
        // One object: an NDJSON file of one line (or a spec spread over several lines).
        Ok(v @ Value::Object(_)) => Ok(vec![spec(v, &|| "".into())?]),
        Ok(_) => Err("expected {\"tasks\": [...]} or NDJSON task specs".into()),
        Err(_) => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: Value = serde_json::from_str(l)
                    .map_err(|e| format!("line {}: not JSON ({e})", i + 1))?;
                spec(v, &|| format!("at line {}", i + 1))
            })
            .collect(),
    }
}

/// Refuses a `depends_on` ref defined in another chunk: refs resolve within one batch
/// request, and failing early beats a half-submitted file.
fn check_refs(specs: &[TaskSpec], chunk: usize) -> Result<(), String> {
    let defined: HashMap<&str, usize> = specs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.reference.as_deref().map(|r| (r, i)))
        .collect();
    for (i, s) in specs.iter().enumerate() {
        for d in &s.depends_on {
            if let Dependency::Ref(r) = d {
                if let Some(&j) = defined.get(r.as_str()) {
                    if i / chunk != j / chunk {
                        return Err(format!(
                            "task {i} depends on ref `{r}` of task {j}, which goes in another \
                             chunk of {chunk}; refs resolve within a chunk, so keep a task \
                             and its dependents within the same {chunk} or use task ids"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn submit_batch(
    ctx: &Ctx,
    out: &mut impl Write,
    specs: Vec<TaskSpec>,
    wait: bool,
) -> Result<Exit, CliError> {
    let total = specs.len();
    let mut docs: Vec<Value> = Vec::with_capacity(total);
    let mut ids: Vec<TaskId> = Vec::with_capacity(total);
    let mut specs = specs.into_iter().peekable();
    let mut start = 0;
    while specs.peek().is_some() {
        let chunk: Vec<TaskSpec> = specs.by_ref().take(BATCH_CHUNK).collect();
        let n = chunk.len();
        let body = serde_json::to_value(BatchRequest { tasks: chunk })
            .map_err(|e| CliError::Invalid(e.to_string()))?;
        let answer = ctx.client.post("/v1/tasks/batch", Some(&body));
        let doc = match answer {
            Ok(doc) => doc,
            Err(e) if start == 0 => return Err(e),
            Err(e) => {
                eprintln!(
                    "queen: the chunk of tasks {start}-{} was refused and later ones were not \
                     sent; the first {start} tasks were submitted{}",
                    start + n - 1,
                    if ctx.json { "" } else { " (ids above)" }
                );
                if ctx.json {
                    ctx.print_json(out, &json!({ "tasks": docs }))?;
                }
                return Err(e);
            }
        };
        let mut tasks = match doc {
            Value::Object(mut o) => match o.remove("tasks") {
                Some(Value::Array(t)) => t,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        if tasks.len() != n {
            return Err(CliError::BadResponse {
                addr: ctx.client.addr(),
                reason: format!("sent {n} tasks, got {} back", tasks.len()),
            });
        }
        for t in &tasks {
            let view: TaskView = ctx.client.decode(t.clone())?;
            if !ctx.json {
                writeln!(out, "{}", view.id)?;
            }
            ids.push(view.id);
        }
        docs.append(&mut tasks);
        start += n;
    }
    if !wait {
        if ctx.json {
            ctx.print_json(out, &json!({ "tasks": docs }))?;
        }
        return Ok(Exit::Ok);
    }
    out.flush()?;
    let (finals, exit) = wait_for(ctx, &ids)?;
    if ctx.json {
        ctx.print_json(out, &json!({ "tasks": finals }))?;
    }
    Ok(exit)
}

/// Waits until every task has ended, drawing progress on stderr, without polling: each task
/// in turn through the server's long poll ([`wait_until_ended`]), so a task that ended while
/// an earlier one ran costs one request when its turn comes. Returns their final documents
/// (in order) and `TaskFailed` if any failed or was cancelled.
fn wait_for(ctx: &Ctx, ids: &[TaskId]) -> Result<(Vec<Value>, Exit), CliError> {
    let mut views: Vec<Option<(TaskView, Value)>> = vec![None; ids.len()];
    let mut progress = Progress::new(ids.len());
    let mut counts: HashMap<TaskState, usize> = HashMap::new();
    progress.draw(&counts);
    for (id, slot) in ids.iter().zip(views.iter_mut()) {
        let (view, doc, _) = wait_until_ended(ctx, *id, None)?;
        *counts.entry(view.state).or_default() += 1;
        progress.draw(&counts);
        *slot = Some((view, doc));
    }
    progress.finish();
    let mut failed = 0;
    let mut docs = Vec::with_capacity(views.len());
    for (view, doc) in views.into_iter().flatten() {
        match view.state {
            TaskState::Failed => {
                failed += 1;
                let why = view
                    .errors
                    .last()
                    .map(|e| e.error.as_str())
                    .unwrap_or("no error recorded");
                eprintln!("queen: task {} failed: {why}", view.id);
            }
            TaskState::Cancelled => {
                failed += 1;
                let why = view.cancel_reason.as_deref().unwrap_or("no reason given");
                eprintln!("queen: task {} was cancelled: {why}", view.id);
            }
            _ => {}
        }
        docs.push(doc);
    }
    let exit = if failed == 0 {
        Exit::Ok
    } else {
        Exit::TaskFailed
    };
    Ok((docs, exit))
}

/// Waits for one task to end through the server's long poll: the queen holds each request
/// until the task ends, [`WAIT_HOLD_MS`] at a time (never past `deadline`). Returns its
/// last view and document, and whether it ended (`false`: the deadline passed first).
pub(super) fn wait_until_ended(
    ctx: &Ctx,
    id: TaskId,
    deadline: Option<std::time::Instant>,
) -> Result<(TaskView, Value, bool), CliError> {
    let path = format!("/v1/tasks/{id}");
    let left = || deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
    loop {
        let hold = left().map_or(WAIT_HOLD_MS, |l| {
            (l.as_millis() as u64).clamp(1, WAIT_HOLD_MS)
        });
        let asked = std::time::Instant::now();
        let doc = ctx.client.get(&format!("{path}?wait_ms={hold}"))?;
        let view: TaskView = ctx.client.decode(doc.clone())?;
        if view.state.is_terminal() {
            return Ok((view, doc, true));
        }
        let left = left();
        if left.is_some_and(|l| l.is_zero()) {
            return Ok((view, doc, false));
        }
        // A queen from before `wait_ms` answers at once: never ask faster than the poll
        // interval, nor sleep past the deadline.
        let mut pause = WAIT_POLL_INTERVAL.saturating_sub(asked.elapsed());
        if let Some(l) = left {
            pause = pause.min(l);
        }
        std::thread::sleep(pause);
    }
}

/// The `--wait` progress line on stderr: redrawn in place on a terminal, one line per
/// change otherwise (logs, CI).
#[derive(Debug)]
struct Progress {
    total: usize,
    tty: bool,
    last: String,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
        }
    }

    fn draw(&mut self, counts: &HashMap<TaskState, usize>) {
        let n = |s: TaskState| counts.get(&s).copied().unwrap_or(0);
        let done = n(TaskState::Succeeded) + n(TaskState::Failed) + n(TaskState::Cancelled);
        let mut line = format!(
            "{done}/{} done: {} succeeded, {} failed, {} cancelled",
            self.total,
            n(TaskState::Succeeded),
            n(TaskState::Failed),
            n(TaskState::Cancelled),
        );
        if line == self.last {
            return;
        }
        self.last = line.clone();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let filled = (done * BAR_WIDTH)
                .checked_div(self.total)
                .unwrap_or(BAR_WIDTH);
            let bar: String = std::iter::repeat_n('#', filled)
                .chain(std::iter::repeat_n('-', BAR_WIDTH - filled.min(BAR_WIDTH)))
                .collect();
            line = format!("\r\x1b[2K[{bar}] {line}");
            let _ = write!(err, "{line}");
        } else {
            let _ = writeln!(err, "waiting: {line}");
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty && !self.last.is_empty() {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_json_batches_or_ndjson_and_errors_name_the_line_and_field() {
        let batch = parse_specs(
            r#"{"tasks": [{"kind": "echo"}, {"kind": "exec", "payload": {"cmd": ["true"]}}]}"#,
        );
        assert_eq!(batch.map(|s| s.len()), Ok(2));
        let nd = parse_specs("{\"kind\": \"echo\"}\n\n{\"kind\": \"echo\", \"priority\": 2}\n");
        assert_eq!(nd.map(|s| s.len()), Ok(2));
        let err = parse_specs("{\"kind\": \"echo\"}\n{\"kind\": \"echo\", \"priorty\": 2}\n")
            .err()
            .unwrap_or_default();
        assert!(err.contains("line 2") && err.contains("priorty"), "{err}");
        let err = parse_specs(r#"{"tasks": [{"kind": "echo"}, {"bogus": 1}]}"#)
            .err()
            .unwrap_or_default();
        assert!(err.contains("tasks[1]") && err.contains("bogus"), "{err}");
    }

    #[test]
    fn a_ref_across_chunks_is_refused_before_anything_is_sent() {
        let mut specs: Vec<TaskSpec> = (0..3)
            .map(|_| TaskSpec {
                kind: "echo".into(),
                ..Default::default()
            })
            .collect();
        specs[0].reference = Some("a".into());
        specs[1].depends_on = vec![Dependency::Ref("a".into())];
        assert!(check_refs(&specs, 2).is_ok());
        specs[2].depends_on = vec![Dependency::Ref("a".into())];
        assert!(check_refs(&specs, 2).is_err());
    }
}
