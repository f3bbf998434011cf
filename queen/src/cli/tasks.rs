//! `queen task ID`, `queen tasks`, `queen cancel ID`, `queen retry ID`.

use std::io::Write;

use serde_json::{json, Value};
use shared::api::{LossVerdict, Suspicion, TaskPage, TaskState, TaskView};
use shared::TaskId;

use super::table::{fields, Table};
use super::{encode, parse_id, time, CliError, Ctx, Exit};

/// Largest page the API serves (`limit`), used by `tasks --all`.
const MAX_PAGE: usize = 1_000;

/// Show one task: state, attempts, lease, times, every attempt's error, result, checkpoint.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  queen task 0192f0c5-2d3e-7c41-9a55-6f1c2b3a4d5e
  queen task 0192f0c5-2d3e-7c41-9a55-6f1c2b3a4d5e --wait --timeout 60")]
pub struct TaskArgs {
    /// The task id (a UUID, as `submit` printed it).
    #[arg(value_parser = parse_id)]
    id: TaskId,
    /// Wait until the task has ended (the queen holds each request until it does, up to
    /// 10 s at a time: `GET /v1/tasks/{id}?wait_ms=`); exit 1 if it failed or was
    /// cancelled.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds, show the task as it is and exit 1.
    #[arg(long, value_name = "SECS", requires = "wait")]
    timeout: Option<u64>,
}

/// List tasks, newest first, as a table (id, queue, kind, state, attempts, created).
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  queen tasks --state failed --queue reports
  queen tasks --all --json | jq -r '.tasks[].id'")]
pub struct ListArgs {
    /// Only tasks in this state: pending, scheduled, blocked, running, succeeded, failed
    /// or cancelled.
    #[arg(long, value_name = "STATE")]
    state: Option<TaskState>,
    /// Only tasks of this queue.
    #[arg(long, value_name = "QUEUE")]
    queue: Option<String>,
    /// At most this many tasks (1-1000; the API's default is 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000),
          conflicts_with = "all")]
    limit: Option<u16>,
    /// Only tasks older than this one (the `next` cursor of a previous page).
    #[arg(long, value_name = "ID", value_parser = parse_id)]
    before: Option<TaskId>,
    /// Every matching task, following the pages to the end.
    #[arg(long)]
    all: bool,
}

/// Cancel a task that has not ended; a running one is stopped on its drone.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The task id.
    #[arg(value_parser = parse_id)]
    id: TaskId,
    /// Why, kept with the task (default: "cancelled through the API").
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
}

/// Run a failed or cancelled task again, with a fresh set of attempts (its error history
/// stays). Retrying a task that has not ended is refused (exit 2).
#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// The task id.
    #[arg(value_parser = parse_id)]
    id: TaskId,
}

pub fn show(ctx: &Ctx, out: &mut impl Write, args: TaskArgs) -> Result<Exit, CliError> {
    let (view, doc, exit) = if args.wait {
        // A deadline too far to represent is no deadline.
        let deadline = args
            .timeout
            .and_then(|s| std::time::Instant::now().checked_add(std::time::Duration::from_secs(s)));
        let (view, doc, ended) = super::submit::wait_until_ended(ctx, args.id, deadline)?;
        if !ended {
            eprintln!(
                "queen: task {} has not ended after {} s (it is {})",
                args.id,
                args.timeout.unwrap_or_default(),
                view.state
            );
        }
        let exit = if view.state == TaskState::Succeeded {
            Exit::Ok
        } else {
            Exit::TaskFailed
        };
        (view, doc, exit)
    } else {
        let doc = ctx.client.get(&format!("/v1/tasks/{}", args.id))?;
        let view: TaskView = ctx.client.decode(doc.clone())?;
        (view, doc, Exit::Ok)
    };
    if ctx.json {
        ctx.print_json(out, &doc)?;
        return Ok(exit);
    }
    write_detail(out, &view)?;
    Ok(exit)
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// The evidence of a task's lost leases: whether it is a suspect (it runs alone on a
/// drone), and how each lost lease was judged.
fn suspicion(s: &Suspicion) -> String {
    let mut lines = vec![match s.suspect_since {
        Some(at) => format!(
            "suspect since {} (runs alone on a drone); {} isolated loss(es) count toward quarantine",
            time(&at),
            s.isolated_losses()
        ),
        None => "not a suspect".to_string(),
    }];
    for l in &s.losses {
        let drone = l
            .drone
            .map(|d| format!(" on drone {d}"))
            .unwrap_or_default();
        let why = match l.verdict {
            LossVerdict::Shared => {
                format!("shared with {} other task(s): no evidence", l.co_tenants)
            }
            LossVerdict::Alone => "alone by chance (not yet a suspect): no evidence".to_string(),
            LossVerdict::Isolated => {
                "isolated, no other drone lost around it: evidence".to_string()
            }
            LossVerdict::Inconclusive => {
                "isolated, but other drones were lost around it (or it did not die): no evidence"
                    .to_string()
            }
            LossVerdict::Awaiting => {
                "isolated, no other drone lost so far: the verdict waits for the window".to_string()
            }
        };
        lines.push(format!(
            "attempt {} (fence {}){drone} at {}: {why}",
            l.attempt,
            l.fence.0,
            time(&l.at)
        ));
    }
    lines.join("\n") + "\n"
}

fn write_detail(out: &mut impl Write, t: &TaskView) -> Result<(), CliError> {
    let mut f: Vec<(&str, String)> = vec![
        ("id", t.id.to_string()),
        ("state", t.state.to_string()),
        ("attempts", format!("{} of {}", t.attempts, t.max_attempts)),
        ("fence", t.fence.0.to_string()),
        ("queue", t.queue.clone()),
        ("kind", t.kind.clone()),
        ("priority", t.priority.to_string()),
    ];
    if !t.labels.is_empty() {
        f.push(("labels", t.labels.join(", ")));
    }
    if !t.depends_on.is_empty() {
        let ids: Vec<String> = t.depends_on.iter().map(ToString::to_string).collect();
        f.push(("depends on", ids.join(", ")));
    }
    if let Some(k) = &t.idempotency_key {
        f.push(("idempotency key", k.clone()));
    }
    if let Some(ms) = t.timeout_ms {
        f.push(("timeout", format!("{ms} ms")));
    }
    if let Some(lease) = &t.lease {
        let who = if lease.drone_name.is_empty() {
            lease.drone.to_string()
        } else {
            format!("{} ({})", lease.drone_name, lease.drone)
        };
        f.push(("lease", format!("{who}, fence {}", t.fence.0)));
    }
    f.push(("created", time(&t.created_at)));
    if let Some(at) = &t.run_at {
        f.push(("run at", time(at)));
    }
    if let Some(at) = &t.started_at {
        f.push(("started", time(at)));
    }
    if let Some(at) = &t.finished_at {
        f.push(("finished", time(at)));
    }
    if let Some(r) = &t.cancel_reason {
        f.push(("cancelled", r.clone()));
    }
    if let Some(p) = t.progress {
        f.push(("progress", format!("{p}")));
    }
    f.push(("payload", pretty(&t.payload)));
    if !t.errors.is_empty() {
        let lines: Vec<String> = t
            .errors
            .iter()
            .map(|e| {
                let drone = e.drone.map(|d| format!(", drone {d}")).unwrap_or_default();
                format!(
                    "attempt {} (fence {}{drone}) at {}: {}",
                    e.attempt,
                    e.fence.0,
                    time(&e.at),
                    e.error
                )
            })
            .collect();
        // Always a block under the label, even for one error.
        f.push(("errors", lines.join("\n") + "\n"));
    }
    if let Some(s) = &t.suspicion {
        f.push(("suspicion", suspicion(s)));
    }
    if let Some(r) = &t.result {
        f.push(("result", pretty(r)));
    }
    if let Some(c) = &t.checkpoint {
        f.push(("checkpoint", pretty(c)));
    }
    fields(out, &f)?;
    Ok(())
}

pub fn list(ctx: &Ctx, out: &mut impl Write, args: ListArgs) -> Result<Exit, CliError> {
    let mut query: Vec<String> = Vec::new();
    if let Some(s) = args.state {
        query.push(format!("state={s}"));
    }
    if let Some(q) = &args.queue {
        query.push(format!("queue={}", encode(q)));
    }
    let limit = if args.all {
        Some(MAX_PAGE)
    } else {
        args.limit.map(usize::from)
    };
    if let Some(n) = limit {
        query.push(format!("limit={n}"));
    }
    let page_path = |before: Option<TaskId>| {
        let mut q = query.clone();
        if let Some(b) = before {
            q.push(format!("before={b}"));
        }
        format!("/v1/tasks?{}", q.join("&"))
    };
    if !args.all {
        let doc = ctx.client.get(&page_path(args.before))?;
        if ctx.json {
            ctx.print_json(out, &doc)?;
            return Ok(Exit::Ok);
        }
        let page: TaskPage = ctx.client.decode(doc)?;
        return write_table(out, &page.tasks, page.next);
    }
    // Every page, as one document shaped like a page without `next`.
    let mut before = args.before;
    let mut docs: Vec<Value> = Vec::new();
    loop {
        let doc = ctx.client.get(&page_path(before))?;
        let page: TaskPage = ctx.client.decode(doc.clone())?;
        if let Value::Object(mut o) = doc {
            if let Some(Value::Array(mut t)) = o.remove("tasks") {
                docs.append(&mut t);
            }
        }
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    if ctx.json {
        ctx.print_json(out, &json!({ "tasks": docs }))?;
        return Ok(Exit::Ok);
    }
    let tasks: Vec<TaskView> = ctx.client.decode(Value::Array(docs))?;
    write_table(out, &tasks, None)
}

fn write_table(
    out: &mut impl Write,
    tasks: &[TaskView],
    next: Option<TaskId>,
) -> Result<Exit, CliError> {
    if tasks.is_empty() {
        writeln!(out, "no tasks")?;
        return Ok(Exit::Ok);
    }
    let mut table =
        Table::new(&["ID", "QUEUE", "KIND", "STATE", "ATTEMPTS", "CREATED"]).right(&["ATTEMPTS"]);
    for t in tasks {
        table.row(vec![
            t.id.to_string(),
            t.queue.clone(),
            t.kind.clone(),
            t.state.to_string(),
            format!("{}/{}", t.attempts, t.max_attempts),
            time(&t.created_at),
        ]);
    }
    table.write(out)?;
    if let Some(next) = next {
        // On stderr, so the table on stdout stays clean for `grep`/`awk`.
        eprintln!(
            "(the newest {} shown; older ones with --before {next}, or all with --all)",
            tasks.len()
        );
    }
    Ok(Exit::Ok)
}

pub fn cancel(ctx: &Ctx, out: &mut impl Write, args: CancelArgs) -> Result<Exit, CliError> {
    let body = args.reason.map(|r| json!({ "reason": r }));
    let doc = ctx
        .client
        .post(&format!("/v1/tasks/{}/cancel", args.id), body.as_ref())?;
    changed(ctx, out, doc)
}

pub fn retry(ctx: &Ctx, out: &mut impl Write, args: RetryArgs) -> Result<Exit, CliError> {
    let doc = ctx
        .client
        .post(&format!("/v1/tasks/{}/retry", args.id), None)?;
    changed(ctx, out, doc)
}

/// After a cancel or retry: the task's new state.
fn changed(ctx: &Ctx, out: &mut impl Write, doc: Value) -> Result<Exit, CliError> {
    if ctx.json {
        ctx.print_json(out, &doc)?;
        return Ok(Exit::Ok);
    }
    let t: TaskView = ctx.client.decode(doc)?;
    writeln!(out, "task {} is {}", t.id, t.state)?;
    Ok(Exit::Ok)
}
