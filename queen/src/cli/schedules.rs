//! `queen schedules`, `schedules add NAME ...`, `schedules delete NAME`.

use std::io::Write;

use serde_json::Value;
use shared::api::{ScheduleRequest, ScheduleView, SchedulesResponse, TaskSpec};

use super::table::Table;
use super::{encode, time, CliError, Ctx, Exit};

/// List periodic schedules; or add or delete one.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SchedulesArgs {
    #[command(subcommand)]
    action: Option<SchedulesAction>,
}

#[derive(Debug, clap::Subcommand)]
enum SchedulesAction {
    /// Add a schedule, or replace the one of that name. It submits its task once per
    /// tick; after downtime it runs once for the latest missed tick, never a burst.
    Add(AddArgs),
    /// Delete a schedule (tasks it already submitted are not touched).
    Delete {
        /// The schedule.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("every").required(true)))]
#[command(after_help = "\
Examples:
  queen schedules add nightly --cron '0 3 * * *' --spec '{\"kind\": \"exec\", \"payload\": {\"cmd\": [\"backup\"]}}'
  queen schedules add heartbeat --every-ms 60000 --spec '{\"kind\": \"echo\", \"queue\": \"ops\"}'")]
struct AddArgs {
    /// The schedule's name (A-Z a-z 0-9 - _ . : /).
    name: String,
    /// A cron expression, 5 or 6 fields (with seconds), in UTC.
    #[arg(long, value_name = "EXPR", group = "every")]
    cron: Option<String>,
    /// Every this many milliseconds.
    #[arg(long, value_name = "MS", group = "every")]
    every_ms: Option<u64>,
    /// The task to submit at each tick: a task spec as JSON, as for `submit --file`
    /// (without `idempotency_key`, which the schedule sets per tick).
    #[arg(long, value_name = "JSON")]
    spec: String,
}

pub fn run(ctx: &Ctx, out: &mut impl Write, args: SchedulesArgs) -> Result<Exit, CliError> {
    let doc = match args.action {
        None => {
            let doc = ctx.client.get("/v1/schedules")?;
            if ctx.json {
                ctx.print_json(out, &doc)?;
                return Ok(Exit::Ok);
            }
            let resp: SchedulesResponse = ctx.client.decode(doc)?;
            if resp.schedules.is_empty() {
                writeln!(out, "no schedules")?;
            } else {
                write_table(out, &resp.schedules)?;
            }
            return Ok(Exit::Ok);
        }
        Some(SchedulesAction::Add(a)) => {
            let task: TaskSpec = serde_json::from_str(&a.spec)
                .map_err(|e| CliError::Invalid(format!("invalid --spec: {e}")))?;
            let req = ScheduleRequest {
                name: a.name,
                cron: a.cron,
                every_ms: a.every_ms,
                task,
            };
            let body = serde_json::to_value(&req).map_err(|e| CliError::Invalid(e.to_string()))?;
            ctx.client.post("/v1/schedules", Some(&body))?
        }
        Some(SchedulesAction::Delete { name }) => {
            let doc = ctx
                .client
                .delete(&format!("/v1/schedules/{}", encode(&name)))?;
            if !ctx.json {
                writeln!(out, "deleted schedule {name}")?;
                return Ok(Exit::Ok);
            }
            doc
        }
    };
    if ctx.json {
        ctx.print_json(out, &doc)?;
        return Ok(Exit::Ok);
    }
    let view: ScheduleView = ctx.client.decode(doc)?;
    write_table(out, &[view])?;
    Ok(Exit::Ok)
}

fn write_table(out: &mut impl Write, schedules: &[ScheduleView]) -> Result<(), CliError> {
    let mut table = Table::new(&["NAME", "EVERY", "KIND", "QUEUE", "NEXT RUN", "LAST RUN"]);
    let field = |task: &Value, key: &str, default: &str| {
        task.get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    for s in schedules {
        let every = match (&s.cron, s.every_ms) {
            (Some(c), _) => format!("cron {c}"),
            (None, Some(ms)) => format!("{ms} ms"),
            (None, None) => "-".into(),
        };
        table.row(vec![
            s.name.clone(),
            every,
            field(&s.task, "kind", "-"),
            field(&s.task, "queue", "default"),
            s.next_run_at.as_ref().map_or("-".into(), time),
            s.last_run_at.as_ref().map_or("-".into(), time),
        ]);
    }
    table.write(out)?;
    Ok(())
}
