//! A whole hive for one test: a temp dir, a queen, its drones, an API client and an
//! execution log. Dropping it kills every process it started, then removes the dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shared::api::{DroneView, Stats, TaskState, TaskView};
use shared::{DroneId, TaskId};

use crate::api::Api;
use crate::drone::DroneProc;
use crate::execlog::ExecLog;
use crate::process::dump_logs;
use crate::queen::QueenProc;
use crate::wait::{wait_until, DEADLINE};

/// Lease timings that make failure detection fast: a heartbeat every 200 ms, a drone silent
/// for 1 s loses its leases, a closed connection is given 300 ms to come back, and a failed
/// attempt is retried after ~100 ms.
pub const FAST_LEASES: [(&str, &str); 4] = [
    ("HIVE_LEASES__HEARTBEAT_INTERVAL_MS", "200"),
    ("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", "1000"),
    ("HIVE_LEASES__RECONNECT_GRACE_MS", "300"),
    ("HIVE_TASKS__RETRY_BASE_MS", "100"),
];

/// How a hive's queen is configured.
#[derive(Debug, Clone)]
pub struct HiveBuilder {
    env: BTreeMap<String, String>,
    config_toml: Option<String>,
}

impl HiveBuilder {
    /// Sets (or overrides) one `HIVE_<SECTION>__<KEY>` variable for the queen.
    pub fn env(mut self, key: &str, value: &str) -> HiveBuilder {
        self.env.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Gives the queen `--config` with this TOML.
    pub fn config_toml(mut self, toml: &str) -> HiveBuilder {
        self.config_toml = Some(toml.to_owned());
        self
    }

    pub fn start(self) -> Hive {
        let dir = tempfile::Builder::new()
            .prefix("hive-test-")
            .tempdir()
            .expect("create a temp dir");
        let config = self.config_toml.map(|toml| {
            let path = dir.path().join("hive.toml");
            std::fs::write(&path, toml).expect("write the config file");
            path
        });
        let queen = QueenProc::start(
            &dir.path().join("data"),
            &dir.path().join("queen.log"),
            self.env,
            config,
        );
        let api = Api::new(queen.http_addr);
        let exec_log = ExecLog::new(dir.path().join("exec.log"));
        Hive {
            drones: Vec::new(),
            queen,
            api,
            exec_log,
            dir,
        }
    }
}

/// See the module docs. Fields drop in order: drones, then the queen, then the temp dir —
/// which is kept (and its path printed) when the test failed or `HIVE_TEST_KEEP` is set.
#[derive(Debug)]
pub struct Hive {
    drones: Vec<DroneProc>,
    pub queen: QueenProc,
    api: Api,
    exec_log: ExecLog,
    dir: tempfile::TempDir,
}

impl Hive {
    /// A queen with [`FAST_LEASES`] and no drones.
    pub fn start() -> Hive {
        Hive::builder().start()
    }

    /// A builder preset with [`FAST_LEASES`].
    pub fn builder() -> HiveBuilder {
        HiveBuilder {
            env: FAST_LEASES
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            config_toml: None,
        }
    }

    pub fn api(&self) -> &Api {
        &self.api
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn exec_log(&self) -> &ExecLog {
        &self.exec_log
    }

    /// A path in the hive's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a drone without waiting for it to connect.
    pub fn spawn_drone(&mut self, name: &str, slots: u32, extra: &[&str]) -> &mut DroneProc {
        assert!(
            self.drones.iter().all(|d| d.name != name),
            "drone name {name} is already used in this hive"
        );
        let log = self.dir.path().join(format!("drone-{name}.log"));
        self.drones.push(DroneProc::start(
            self.queen.drones_addr,
            name,
            slots,
            extra,
            &log,
        ));
        self.drones.last_mut().expect("just pushed")
    }

    /// Starts a drone and waits until the queen lists it as connected; returns its id.
    pub fn start_drone(&mut self, name: &str, slots: u32) -> DroneId {
        self.start_drone_with(name, slots, &[])
    }

    /// [`Hive::start_drone`] with extra command-line arguments (e.g. `--label x`).
    pub fn start_drone_with(&mut self, name: &str, slots: u32, extra: &[&str]) -> DroneId {
        self.spawn_drone(name, slots, extra);
        let id = self.wait_drone_connected(name);
        self.drone(name).id = Some(id);
        id
    }

    /// The drone started under `name`.
    pub fn drone(&mut self, name: &str) -> &mut DroneProc {
        self.drones
            .iter_mut()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no drone named {name} in this hive"))
    }

    /// Waits until the queen lists a connected drone called `name` (failing at once if that
    /// drone's process exits) and returns its id.
    pub fn wait_drone_connected(&mut self, name: &str) -> DroneId {
        let api = self.api.clone();
        let drones = &mut self.drones;
        wait_until(
            DEADLINE,
            &format!("drone {name} to be connected to the queen"),
            || {
                if let Some(d) = drones.iter_mut().find(|d| d.name == name) {
                    if let Some(status) = d.exit_status() {
                        panic!(
                            "drone {name} exited ({status}) instead of connecting\n{}",
                            dump_logs()
                        );
                    }
                }
                let views = api.try_drones().map_err(|e| e.to_string())?;
                views
                    .iter()
                    .find(|v| v.name == name && v.connected)
                    .map(|v| v.id)
                    .ok_or_else(|| {
                        format!(
                            "connected drones: {:?}",
                            views.iter().map(|v| &v.name).collect::<Vec<_>>()
                        )
                    })
            },
        )
    }

    /// The queen's view of the drone called `name`, if listed.
    pub fn drone_view(&self, name: &str) -> Option<DroneView> {
        self.api.drones().into_iter().find(|v| v.name == name)
    }

    /// Waits until the queen's stats satisfy `cond`; returns them.
    pub fn wait_stats(
        &self,
        within: Duration,
        what: &str,
        mut cond: impl FnMut(&Stats) -> bool,
    ) -> Stats {
        wait_until(within, what, || {
            let stats = self.api.try_stats().map_err(|e| e.to_string())?;
            if cond(&stats) {
                Ok(stats)
            } else {
                Err(format!("{stats:?}"))
            }
        })
    }

    /// Waits until task `id` satisfies `cond`; returns its record.
    pub fn wait_task(
        &self,
        id: TaskId,
        what: &str,
        mut cond: impl FnMut(&TaskView) -> bool,
    ) -> TaskView {
        wait_until(DEADLINE, &format!("task {id}: {what}"), || {
            let view = self.api.try_task(id).map_err(|e| e.to_string())?;
            if cond(&view) {
                Ok(view)
            } else {
                Err(format!("{view:?}"))
            }
        })
    }

    /// Waits until every task in `ids` is terminal; returns their records in `ids` order.
    pub fn wait_all_terminal(&self, within: Duration, ids: &[TaskId]) -> Vec<TaskView> {
        let mut done: BTreeMap<TaskId, TaskView> = BTreeMap::new();
        wait_until(
            within,
            &format!("all {} tasks to reach a terminal state", ids.len()),
            || {
                // Re-check only what is not known terminal, stopping at the first one that is
                // still active, so a poll costs little while most tasks are still queued.
                for id in ids {
                    if done.contains_key(id) {
                        continue;
                    }
                    let view = self.api.try_task(*id).map_err(|e| e.to_string())?;
                    if !view.state.is_terminal() {
                        return Err(format!(
                            "{} of {} terminal; first active: {view:?}",
                            done.len(),
                            ids.len()
                        ));
                    }
                    done.insert(*id, view);
                }
                Ok(())
            },
        );
        ids.iter()
            .map(|id| done.remove(id).expect("every id was seen terminal"))
            .collect()
    }

    /// Waits until every task in `ids` is terminal and asserts each one succeeded.
    pub fn wait_all_succeeded(&self, within: Duration, ids: &[TaskId]) -> Vec<TaskView> {
        let views = self.wait_all_terminal(within, ids);
        let failed: Vec<&TaskView> = views
            .iter()
            .filter(|v| v.state != TaskState::Succeeded)
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} tasks did not succeed, e.g. {:#?}\n{}",
            failed.len(),
            views.len(),
            failed.iter().take(3).collect::<Vec<_>>(),
            dump_logs()
        );
        views
    }
}

impl Drop for Hive {
    fn drop(&mut self) {
        let keep = std::env::var_os("HIVE_TEST_KEEP").is_some_and(|v| !v.is_empty());
        if keep || std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "hive test dir kept for inspection: {}",
                self.dir.path().display()
            );
        }
    }
}
