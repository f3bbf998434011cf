//! `queen drones`: the drones the queen knows, connected or recently gone.

use std::io::Write;

use shared::api::DronesResponse;

use super::table::Table;
use super::{ago, CliError, Ctx, Exit};

/// List drones: name, id, state, busy slots, labels, kinds, last heard from.
#[derive(Debug, clap::Args)]
pub struct DronesArgs {}

pub fn run(ctx: &Ctx, out: &mut impl Write, _args: DronesArgs) -> Result<Exit, CliError> {
    let doc = ctx.client.get("/v1/drones")?;
    if ctx.json {
        ctx.print_json(out, &doc)?;
        return Ok(Exit::Ok);
    }
    let resp: DronesResponse = ctx.client.decode(doc)?;
    if resp.drones.is_empty() {
        writeln!(out, "no drones")?;
        return Ok(Exit::Ok);
    }
    let now = chrono::Utc::now();
    let mut table = Table::new(&[
        "NAME",
        "ID",
        "STATE",
        "RUNNING",
        "LABELS",
        "KINDS",
        "LAST SEEN",
    ])
    .right(&["RUNNING"]);
    for d in &resp.drones {
        let state = match (d.connected, d.draining) {
            (false, _) => "disconnected",
            (true, true) => "draining",
            (true, false) => "connected",
        };
        table.row(vec![
            d.name.clone(),
            d.id.to_string(),
            state.to_string(),
            format!("{}/{}", d.running.len(), d.slots),
            dash_if_empty(d.labels.join(",")),
            dash_if_empty(d.kinds.join(",")),
            ago(&d.last_seen, now),
        ]);
    }
    table.write(out)?;
    Ok(Exit::Ok)
}

fn dash_if_empty(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}
