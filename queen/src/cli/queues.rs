//! `queen queues`, and `queues pause|resume|limit NAME`.

use std::io::Write;
use std::str::FromStr;

use serde_json::{Map, Value};
use shared::api::{QueueView, QueuesResponse};

use super::table::Table;
use super::{encode, CliError, Ctx, Exit};

/// List queues with their task counts, pause state and limits; or change one.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QueuesArgs {
    #[command(subcommand)]
    action: Option<QueuesAction>,
}

#[derive(Debug, clap::Subcommand)]
enum QueuesAction {
    /// Stop starting tasks of a queue (running ones finish; new ones are still accepted).
    Pause {
        /// The queue.
        name: String,
    },
    /// Start tasks of a paused queue again.
    Resume {
        /// The queue.
        name: String,
    },
    /// Set or remove a queue's concurrency and rate limits (a flag left out keeps its value).
    Limit(LimitArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("limits").required(true).multiple(true)))]
#[command(after_help = "\
Examples:
  queen queues limit reports --max-running 4 --rate 10
  queen queues limit reports --rate none")]
struct LimitArgs {
    /// The queue.
    name: String,
    /// Most tasks of the queue running at once across the hive; `none` removes the limit.
    #[arg(long, value_name = "N|none", value_parser = parse_limit::<u32>, group = "limits")]
    max_running: Option<Limit<u32>>,
    /// Most tasks of the queue started per second; `none` removes the limit.
    #[arg(long, value_name = "PER_S|none", value_parser = parse_limit::<f64>, group = "limits")]
    rate: Option<Limit<f64>>,
}

/// A limit to set, or `none` to remove it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limit<T>(Option<T>);

fn parse_limit<T: FromStr>(s: &str) -> Result<Limit<T>, String>
where
    T::Err: std::fmt::Display,
{
    if s == "none" {
        return Ok(Limit(None));
    }
    s.parse()
        .map(|v| Limit(Some(v)))
        .map_err(|e| format!("expected a number or `none` ({e})"))
}

pub fn run(ctx: &Ctx, out: &mut impl Write, args: QueuesArgs) -> Result<Exit, CliError> {
    let doc = match args.action {
        None => {
            let doc = ctx.client.get("/v1/queues")?;
            if ctx.json {
                ctx.print_json(out, &doc)?;
                return Ok(Exit::Ok);
            }
            let resp: QueuesResponse = ctx.client.decode(doc)?;
            if resp.queues.is_empty() {
                writeln!(out, "no queues")?;
            } else {
                write_table(out, &resp.queues)?;
            }
            return Ok(Exit::Ok);
        }
        Some(QueuesAction::Pause { name }) => ctx
            .client
            .post(&format!("/v1/queues/{}/pause", encode(&name)), None)?,
        Some(QueuesAction::Resume { name }) => ctx
            .client
            .post(&format!("/v1/queues/{}/resume", encode(&name)), None)?,
        Some(QueuesAction::Limit(l)) => {
            // Absent: keep; null: remove (see shared::api::QueueLimits).
            let mut body = Map::new();
            if let Some(Limit(v)) = l.max_running {
                body.insert("max_running".into(), v.map_or(Value::Null, Value::from));
            }
            if let Some(Limit(v)) = l.rate {
                body.insert("rate_per_s".into(), v.map_or(Value::Null, Value::from));
            }
            ctx.client.post(
                &format!("/v1/queues/{}", encode(&l.name)),
                Some(&Value::Object(body)),
            )?
        }
    };
    if ctx.json {
        ctx.print_json(out, &doc)?;
        return Ok(Exit::Ok);
    }
    let view: QueueView = ctx.client.decode(doc)?;
    write_table(out, &[view])?;
    Ok(Exit::Ok)
}

fn write_table(out: &mut impl Write, queues: &[QueueView]) -> Result<(), CliError> {
    let counts = ["PENDING", "SCHEDULED", "BLOCKED", "RUNNING"];
    let mut header = vec!["QUEUE"];
    header.extend(counts);
    header.extend(["STATE", "MAX RUNNING", "RATE/S"]);
    let mut table = Table::new(&header).right(&counts);
    for q in queues {
        table.row(vec![
            q.name.clone(),
            q.pending.to_string(),
            q.scheduled.to_string(),
            q.blocked.to_string(),
            q.running.to_string(),
            if q.paused { "paused" } else { "active" }.to_string(),
            q.max_running.map_or("-".into(), |n| n.to_string()),
            q.rate_per_s.map_or("-".into(), |r| r.to_string()),
        ]);
    }
    table.write(out)?;
    Ok(())
}
