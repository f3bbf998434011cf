//! A whole hive for one test: a temp dir, a queen, its drones (directly connected or behind
//! a fault-injecting [`Proxy`]), an API client, an execution log, and a sampler watching the
//! queen's leases. Dropping it kills every process it started, then removes the dir.
//!
//! [`Hive::check`] ends every chaos scenario: it gathers the evidence the invariant checker
//! ([`crate::check`]) judges, and fails the test with a full report if any guarantee broke.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::api::{DroneView, Stats, TaskSpec, TaskState, TaskView};
use shared::{DroneId, TaskId};

use crate::api::Api;
use crate::check::{self, DroneLife, Evidence, Summary, QUEEN_DEFAULT_MAX_ATTEMPTS};
use crate::drone::{self, DroneProc, Harm};
use crate::execlog::{ExecLog, Execution};
use crate::process::{dump_logs, pid_alive};
use crate::proxy::{Fault, Proxy};
use crate::queen::QueenProc;
use crate::wait::{poll_until, wait_until, DEADLINE};

/// How long [`Hive::check`] waits for the processes of finished tasks to be gone, and for
/// live drones to be connected and idle. Milliseconds when healthy.
const QUIET_DEADLINE: Duration = Duration::from_secs(20);

/// How often the lease sampler asks the queen for its drones.
const LEASE_SAMPLE: Duration = Duration::from_millis(100);

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
    /// Put the queen's data dir on a tmpfs of this many MiB (a small filesystem to fill).
    data_tmpfs_mb: Option<u64>,
    /// Queens sharing a PostgreSQL database (HA): the first leads, the rest stand by.
    postgres: Option<(String, usize)>,
    /// Start a PostgreSQL cluster of the hive's own (in its temp dir) and run the queen on
    /// it (see [`hive_builder!`](crate::hive_builder)).
    own_postgres: bool,
}

impl HiveBuilder {
    /// Sets (or overrides) one `HIVE_<SECTION>__<KEY>` variable for the queen.
    pub fn env(mut self, key: &str, value: &str) -> HiveBuilder {
        self.env.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Puts the queen's data dir on a tmpfs of `size_mb` MiB, unmounted when the hive is
    /// dropped (mounting needs root, which CI has).
    pub fn data_on_tmpfs(mut self, size_mb: u64) -> HiveBuilder {
        self.data_tmpfs_mb = Some(size_mb);
        self
    }

    /// Stores the hive in the PostgreSQL database at `url` and runs `queens` queens on it
    /// (the first is started first and leads; the others stand by). Drones are given every
    /// queen's address.
    pub fn postgres(mut self, url: &str, queens: usize) -> HiveBuilder {
        self.env
            .insert("HIVE_STORAGE__BACKEND".into(), "postgres".into());
        self.env.insert("HIVE_POSTGRES__URL".into(), url.to_owned());
        self.postgres = Some((url.to_owned(), queens.max(1)));
        self
    }

    /// Runs the hive on a PostgreSQL cluster of its own, started in its temp dir and
    /// stopped with it: one queen, which leads. The scenario is otherwise unchanged.
    pub fn on_own_postgres(mut self) -> HiveBuilder {
        self.own_postgres = true;
        self
    }

    /// Gives the queen `--config` with this TOML.
    pub fn config_toml(mut self, toml: &str) -> HiveBuilder {
        self.config_toml = Some(toml.to_owned());
        self
    }

    pub fn start(mut self) -> Hive {
        let dir = tempfile::Builder::new()
            .prefix("hive-test-")
            .tempdir()
            .expect("create a temp dir");
        let own_pg = self.own_postgres.then(|| {
            let pg = crate::pg::PgCluster::primary(dir.path());
            self = self.clone().postgres(&pg.url(), 1);
            pg
        });
        let config = self.config_toml.map(|toml| {
            let path = dir.path().join("hive.toml");
            std::fs::write(&path, toml).expect("write the config file");
            path
        });
        let data_mount = self
            .data_tmpfs_mb
            .map(|mb| TmpfsMount::mount(&dir.path().join("data"), mb));
        let default_max_attempts = self
            .env
            .get("HIVE_TASKS__MAX_ATTEMPTS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(QUEEN_DEFAULT_MAX_ATTEMPTS);
        let mut queen = QueenProc::start(
            &dir.path().join("data"),
            &dir.path().join("queen.log"),
            self.env.clone(),
            config.clone(),
        );
        queen.lead_on_start = matches!(self.postgres, Some((_, 1)));
        let api = Api::new(queen.http_addr);
        let mut others = Vec::new();
        if let Some((_, queens)) = &self.postgres {
            // The first queen leads before the standbys start, so tests know who leads.
            wait_ready(&api, "the first queen to lead");
            for i in 1..*queens {
                others.push(QueenProc::start(
                    &dir.path().join(format!("data-{i}")),
                    &dir.path().join(format!("queen-{i}.log")),
                    self.env.clone(),
                    config.clone(),
                ));
            }
        }
        let exec_log = ExecLog::new(dir.path().join("exec.log"));
        Hive {
            lease_watch: LeaseWatch::start(api.clone()),
            drones: Vec::new(),
            retired: Vec::new(),
            proxies: BTreeMap::new(),
            queen,
            others,
            _pg: own_pg,
            api,
            exec_log,
            default_max_attempts,
            _data_mount: data_mount,
            dir,
        }
    }
}

/// A [`HiveBuilder`] for the calling test binary: on sled, or on PostgreSQL when the
/// binary's name ends in `_postgres` (see [`Hive::builder_for`]). The same scenario file
/// runs against both engines.
#[macro_export]
macro_rules! hive_builder {
    () => {
        $crate::Hive::builder_for(module_path!())
    };
}

/// Waits until the queen behind `api` answers `/readyz` with 200.
fn wait_ready(api: &Api, what: &str) {
    wait_until(DEADLINE, what, || match api.get_raw("/readyz") {
        Ok((200, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

/// A tmpfs mounted for one test, unmounted (lazily, so a process still holding a file
/// there cannot block it) when dropped.
#[derive(Debug)]
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    pub fn mount(path: &Path, size_mb: u64) -> TmpfsMount {
        std::fs::create_dir_all(path).expect("create the mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {size_mb} MiB tmpfs on {} failed ({status}); this test needs root, as CI runs",
            path.display()
        );
        TmpfsMount {
            path: path.to_owned(),
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Samples `GET /v1/drones` on its own thread and notes every time one task is listed
/// under two drones at once: two live leases as the queen itself sees them (G4).
#[derive(Debug)]
struct LeaseWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseWatch {
    fn start(api: Api) -> LeaseWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::Builder::new()
                .name("hive-test-lease-watch".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        // A queen that is down or restarting simply has nothing to show.
                        if let Ok(views) = api.try_drones() {
                            if let Some(double) = double_lease(&views) {
                                let mut seen = seen.lock().expect("lease watch lock");
                                if seen.len() < 20 {
                                    seen.push(double);
                                }
                            }
                        }
                        std::thread::sleep(LEASE_SAMPLE);
                    }
                })
                .expect("start the lease sampler")
        };
        LeaseWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lease watch lock").clone()
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A task listed as running on two drones in one answer of `GET /v1/drones`, described.
fn double_lease(views: &[DroneView]) -> Option<String> {
    let mut holder: BTreeMap<TaskId, &DroneView> = BTreeMap::new();
    for v in views {
        for t in &v.running {
            if let Some(first) = holder.insert(*t, v) {
                return Some(format!(
                    "the queen listed task {t} as running on {} ({}) and {} ({}) at once",
                    first.name, first.id, v.name, v.id
                ));
            }
        }
    }
    None
}

/// Whether `pid` is alive and is a process of `task` under `fence` (its environment says
/// so), so a recycled pid is never mistaken for a task's process.
fn task_process_alive(pid: i32, task: TaskId, fence: u64) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want_task = format!("HIVE_TASK_ID={task}");
    let want_fence = format!("HIVE_FENCE={fence}");
    let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
    vars.contains(&want_task.as_bytes()) && vars.contains(&want_fence.as_bytes())
}

/// The pids of `run` still alive as its processes.
pub fn lingering(run: &Execution) -> Vec<i32> {
    run.pids
        .iter()
        .copied()
        .filter(|p| task_process_alive(*p, run.task, run.fence))
        .collect()
}

/// See the module docs. Fields drop in order: the lease sampler, drones, proxies, then the
/// queen, then the temp dir — which is kept (and its path printed) when the test failed or
/// `HIVE_TEST_KEEP` is set.
#[derive(Debug)]
pub struct Hive {
    lease_watch: LeaseWatch,
    drones: Vec<DroneProc>,
    /// Drone processes replaced by [`Hive::restart_drone`]: dead, kept for the checker.
    retired: Vec<DroneProc>,
    /// The proxy in front of each drone started with [`Hive::start_drone_behind_proxy`].
    proxies: BTreeMap<String, Proxy>,
    pub queen: QueenProc,
    /// The other queens sharing the database (HA on PostgreSQL), standbys at the start.
    pub others: Vec<QueenProc>,
    /// The hive's own PostgreSQL cluster, if it has one: stopped after the queens.
    _pg: Option<crate::pg::PgCluster>,
    api: Api,
    exec_log: ExecLog,
    /// The queen's `[tasks] max_attempts`, for the checker.
    default_max_attempts: u32,
    /// Held for its drop: after the queen's (declared after it), before the temp dir
    /// holding it.
    _data_mount: Option<TmpfsMount>,
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
            data_tmpfs_mb: None,
            postgres: None,
            own_postgres: false,
        }
    }

    /// [`Hive::builder`] for the test binary `module_path` belongs to: a binary whose
    /// crate name ends in `_postgres` (a file that includes a scenario file with
    /// `#[path]`) runs every hive on a PostgreSQL cluster of its own. Use
    /// [`hive_builder!`](crate::hive_builder), which passes the caller's `module_path!()`.
    pub fn builder_for(module_path: &str) -> HiveBuilder {
        let krate = module_path.split("::").next().unwrap_or_default();
        if krate.ends_with("_postgres") {
            Hive::builder().on_own_postgres()
        } else {
            Hive::builder()
        }
    }

    /// Queen `i`: 0 is [`Hive::queen`], then [`Hive::others`] in order.
    pub fn queen_at(&mut self, i: usize) -> &mut QueenProc {
        if i == 0 {
            &mut self.queen
        } else {
            &mut self.others[i - 1]
        }
    }

    /// Every queen's drone address, as drones are given them (`A,B,...`).
    pub fn queen_addrs(&self) -> String {
        std::iter::once(&self.queen)
            .chain(&self.others)
            .map(|q| q.drones_addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits (up to `within`) until queen `i` is the only one answering `/readyz` with
    /// 200, and points the API client at it.
    pub fn wait_leader_is(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.wait_leader(left) == i {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queen {i} did not become the only leader within {within:?}\n{}",
                dump_logs()
            );
            std::thread::sleep(LEASE_SAMPLE);
        }
    }

    /// Waits (up to `within`) until exactly one queen answers `/readyz` with 200, points
    /// the API client at it and returns its index (see [`Hive::queen_at`]).
    pub fn wait_leader(&mut self, within: Duration) -> usize {
        let addrs: Vec<_> = std::iter::once(&self.queen)
            .chain(&self.others)
            .map(|q| q.http_addr)
            .collect();
        let leader = wait_until(within, "exactly one queen to lead", || {
            let ready: Vec<usize> = addrs
                .iter()
                .enumerate()
                .filter(|(_, a)| {
                    Api::new(**a)
                        .get_raw("/readyz")
                        .is_ok_and(|(code, _)| code == 200)
                })
                .map(|(i, _)| i)
                .collect();
            match ready.as_slice() {
                [one] => Ok(*one),
                other => Err(format!("ready queens: {other:?}")),
            }
        });
        self.api.retarget(addrs[leader]);
        leader
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
        let addrs = self.queen_addrs();
        self.spawn_drone_at(addrs, name, slots, extra)
    }

    fn spawn_drone_at(
        &mut self,
        queen: impl std::fmt::Display,
        name: &str,
        slots: u32,
        extra: &[&str],
    ) -> &mut DroneProc {
        assert!(
            self.drones.iter().all(|d| d.name != name),
            "drone name {name} is already used in this hive"
        );
        let log = self.dir.path().join(format!("drone-{name}.log"));
        self.drones
            .push(DroneProc::start(queen, name, slots, extra, &log));
        self.drones.last_mut().expect("just pushed")
    }

    /// Starts a drone that reaches the queen through its own [`Proxy`] (see
    /// [`Hive::set_fault`]) and waits until the queen lists it; returns its id.
    pub fn start_drone_behind_proxy(&mut self, name: &str, slots: u32, extra: &[&str]) -> DroneId {
        let proxy = Proxy::start(self.queen.drones_addr);
        let addr = proxy.addr();
        self.proxies.insert(name.to_owned(), proxy);
        self.spawn_drone_at(addr, name, slots, extra);
        let id = self.wait_drone_connected(name);
        self.drone(name).id = Some(id);
        id
    }

    /// The proxy in front of drone `name`.
    pub fn proxy(&self, name: &str) -> &Proxy {
        self.proxies
            .get(name)
            .unwrap_or_else(|| panic!("drone {name} was not started behind a proxy"))
    }

    /// Switches the fault on drone `name`'s link; anything but [`Fault::Pass`] marks the
    /// drone's current process as cut off for the checker.
    pub fn set_fault(&mut self, name: &str, fault: Fault) {
        self.proxy(name).set(fault);
        if fault != Fault::Pass {
            let d = self.drone(name);
            if !d.harms.contains(&Harm::CutOff) {
                d.harms.push(Harm::CutOff);
            }
        }
    }

    /// Starts drone `name` again as a new process (same arguments, same proxy if it has
    /// one) after `kill -9`ing it if it still runs, and waits until the queen lists the new
    /// process; returns its id.
    pub fn restart_drone(&mut self, name: &str) -> DroneId {
        self.restart_drone_as(name, Died::Panic)
            .unwrap_or_else(|| unreachable!("Died::Panic panics instead"))
    }

    /// [`Hive::restart_drone`] in a scenario where a drone may be killed at any moment,
    /// even before the harness sees it connected (a poison task that kills every drone it
    /// runs on may reach the fresh one first): `None` when it died, for the scenario to
    /// account for and restart again.
    pub fn restart_drone_may_die(&mut self, name: &str) -> Option<DroneId> {
        self.restart_drone_as(name, Died::Return)
    }

    fn restart_drone_as(&mut self, name: &str, died: Died) -> Option<DroneId> {
        let i = self
            .drones
            .iter()
            .position(|d| d.name == name)
            .unwrap_or_else(|| panic!("no drone named {name} in this hive"));
        if self.drones[i].is_running() {
            self.drones[i].kill9();
        }
        let old_id = self.drones[i].id;
        let new = self.drones[i].respawn();
        let old = std::mem::replace(&mut self.drones[i], new);
        self.retired.push(old);
        let id = self.wait_drone_connected_as(name, old_id, died)?;
        self.drones[i].id = Some(id);
        Some(id)
    }

    /// The drones started so far under a name and still alive, by name.
    pub fn live_drones(&mut self) -> Vec<String> {
        self.drones
            .iter_mut()
            .filter_map(|d| d.is_running().then(|| d.name.clone()))
            .collect()
    }

    /// Names of drones whose process has exited.
    pub fn dead_drones(&mut self) -> Vec<String> {
        self.drones
            .iter_mut()
            .filter_map(|d| (!d.is_running()).then(|| d.name.clone()))
            .collect()
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
        self.wait_drone_connected_other_than(name, None)
    }

    /// [`Hive::wait_drone_connected`], ignoring a listing with id `not` (a previous
    /// process of that name the queen may not have dropped yet).
    fn wait_drone_connected_other_than(&mut self, name: &str, not: Option<DroneId>) -> DroneId {
        self.wait_drone_connected_as(name, not, Died::Panic)
            .unwrap_or_else(|| unreachable!("Died::Panic panics instead"))
    }

    fn wait_drone_connected_as(
        &mut self,
        name: &str,
        not: Option<DroneId>,
        died: Died,
    ) -> Option<DroneId> {
        let api = self.api.clone();
        let drones = &mut self.drones;
        wait_until(
            DEADLINE,
            &format!("drone {name} to be connected to the queen"),
            || {
                if let Some(d) = drones.iter_mut().find(|d| d.name == name) {
                    if let Some(status) = d.exit_status() {
                        if died == Died::Return {
                            return Ok(None);
                        }
                        panic!(
                            "drone {name} exited ({status}) instead of connecting\n{}",
                            dump_logs()
                        );
                    }
                }
                let views = api.try_drones().map_err(|e| e.to_string())?;
                views
                    .iter()
                    .find(|v| v.name == name && v.connected && Some(v.id) != not)
                    .map(|v| Some(v.id))
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

impl Hive {
    /// Every drone process this hive started, and what became of it.
    pub fn drone_lives(&mut self) -> Vec<DroneLife> {
        self.retired
            .iter_mut()
            .chain(self.drones.iter_mut())
            .map(|d| DroneLife {
                exited: !d.is_running(),
                name: d.name.clone(),
                pid: d.pid(),
                harms: d.harms.clone(),
                died_at: d.died_at,
            })
            .collect()
    }

    /// Ends a scenario: checks every guarantee the run must have kept (see
    /// [`crate::check`]) over every task this hive's client got acknowledged, allowing
    /// `within` for all of them to reach a terminal state. Fails the test with the seed,
    /// the violations, the records and runs involved and the logs; otherwise prints and
    /// returns a summary.
    ///
    /// Every drone that is alive must be able to reconnect (thaw frozen ones and lift
    /// faults first): each runs a barrier task, so anything it still had to say has been
    /// said before the records are read the second time.
    pub fn check(&mut self, within: Duration) -> Summary {
        let mut ev = Evidence {
            acked: self.api.acknowledged(),
            default_max_attempts: self.default_max_attempts,
            ..Evidence::default()
        };
        if self.others.is_empty() {
            self.queen.assert_running();
        } else {
            self.wait_leader(DEADLINE);
        }

        // G1 and G2: read every record until all are terminal or the bound runs out.
        let ids: Vec<TaskId> = ev.acked.keys().copied().collect();
        let mut pending: Vec<TaskId> = ids.clone();
        // Reads records in order, stopping at the first one still active (polled again from
        // there); once the bound has run out, one last pass reads all that are left.
        let mut read = |pending: &[TaskId], stop_at_active: bool| -> Vec<TaskId> {
            for (i, id) in pending.iter().enumerate() {
                match self.read(*id) {
                    Ok(view) if view.state.is_terminal() => {
                        ev.first.insert(*id, view);
                    }
                    Ok(view) => {
                        ev.first.insert(*id, view);
                        if stop_at_active {
                            return pending[i..].to_vec();
                        }
                    }
                    Err(e) => {
                        ev.missing.insert(*id, e);
                    }
                }
            }
            Vec::new()
        };
        let settled = poll_until(within, || {
            pending = read(&pending, true);
            if pending.is_empty() {
                Ok(())
            } else {
                Err(())
            }
        });
        if settled.is_err() {
            read(&pending, false);
        }

        // G6: no process of any run outlives its task.
        let runs = self.exec_log.executions();
        let quiet = Instant::now() + QUIET_DEADLINE;
        let gone = poll_until(QUIET_DEADLINE, || {
            let alive: Vec<(Execution, Vec<i32>)> = runs
                .iter()
                .filter_map(|r| {
                    let pids = lingering(r);
                    (!pids.is_empty()).then(|| (r.clone(), pids))
                })
                .collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(alive)
            }
        });
        ev.lingering = gone.err().unwrap_or_default();

        // Every live drone connected, idle, and through a barrier task of its own.
        self.barriers(&mut ev, quiet);

        // G3: terminal records do not change.
        for id in &ids {
            if ev.missing.contains_key(id) {
                continue;
            }
            match self.read(*id) {
                Ok(view) => {
                    ev.second.insert(*id, view);
                }
                Err(e) => ev
                    .gathering
                    .push(format!("task {id} could not be read again: {e}")),
            }
        }
        ev.runs = self.exec_log.executions();
        ev.drones = self.drone_lives();
        ev.double_leases = self.lease_watch.seen();

        let (found, summary) = check::violations(&ev);
        if !found.is_empty() {
            let log = self.exec_log.clone();
            panic!(
                "{}
{}
exec log: {}
{}",
                match crate::seed::current() {
                    Some(seed) => format!(
                        "chaos seed {seed} (replay with {}={seed})",
                        crate::seed::SEED_VAR
                    ),
                    None => "this scenario uses no random choices".into(),
                },
                check::report(&ev, &found, |id| log.lines_of(id)),
                self.exec_log.path().display(),
                dump_logs()
            );
        }
        eprintln!("invariants hold: {summary}");
        summary
    }

    /// One record; a transport error (the queen busy) is retried, an HTTP error is the
    /// answer.
    fn read(&self, id: TaskId) -> Result<TaskView, String> {
        poll_until(DEADLINE, || match self.api.try_task(id) {
            Ok(v) => Ok(Ok(v)),
            Err(e @ crate::api::ApiError::Status(..)) => Ok(Err(e.to_string())),
            Err(e) => Err(e.to_string()),
        })
        .unwrap_or_else(Err)
    }

    /// Waits until every live drone is connected with no lease, then runs an `echo` task
    /// pinned to each and waits for all of them to succeed.
    fn barriers(&mut self, ev: &mut Evidence, deadline: Instant) {
        let names = self.live_drones();
        let unsettled = |views: &[DroneView]| -> Vec<String> {
            names
                .iter()
                .filter(|n| {
                    !views
                        .iter()
                        .any(|v| &v.name == *n && v.connected && v.running.is_empty())
                })
                .cloned()
                .collect()
        };
        let mut last = names.clone();
        let _ = poll_until(deadline.saturating_duration_since(Instant::now()), || {
            if let Ok(views) = self.api.try_drones() {
                last = unsettled(&views);
            }
            if last.is_empty() {
                Ok(())
            } else {
                Err(())
            }
        });
        if !last.is_empty() {
            ev.gathering.push(format!(
                "live drones {last:?} were not connected and idle within {QUIET_DEADLINE:?}"
            ));
            return;
        }
        let barriers: Vec<(String, TaskId)> = names
            .iter()
            .filter_map(|n| {
                let spec = TaskSpec {
                    labels: vec![drone::label(n)],
                    ..crate::api::echo(serde_json::json!({"barrier": n}))
                };
                match self.api.try_submit(&spec) {
                    Ok(v) => Some((n.clone(), v.id)),
                    Err(e) => {
                        ev.gathering
                            .push(format!("the barrier task for drone {n} was refused: {e}"));
                        None
                    }
                }
            })
            .collect();
        let mut open: BTreeSet<TaskId> = barriers.iter().map(|(_, id)| *id).collect();
        let _ = poll_until(deadline.saturating_duration_since(Instant::now()), || {
            open.retain(|id| {
                self.api
                    .try_task(*id)
                    .map_or(true, |v| !v.state.is_terminal())
            });
            if open.is_empty() {
                Ok(())
            } else {
                Err(())
            }
        });
        for (name, id) in &barriers {
            match self.api.try_task(*id) {
                Ok(v) if v.state == TaskState::Succeeded => {}
                other => ev.gathering.push(format!(
                    "the barrier task {id} pinned to drone {name} did not succeed: {other:?}"
                )),
            }
        }
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

/// What waiting for a (re)started drone does when its process exits first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Died {
    /// Fail the test, with every log: the drone could not start.
    Panic,
    /// Return `None`: the scenario kills drones and accounts for each death itself.
    Return,
}
