//! High availability on PostgreSQL: several queens share one database; one leads, the
//! others stand by, and any of them takes over when the leader's lease lapses.
//!
//! A queen here alternates between two states for as long as it runs:
//!
//! - **Standby.** It campaigns for the leader lease (`store::pg::Election`), answers
//!   `/healthz`, answers `/readyz` and every other request with 503 naming the leader, and
//!   refuses drones with a `not_leader` reject naming the leader's drone port.
//! - **Leader, for one term (epoch).** It opens the store with its epoch (which fences
//!   every commit in the database), loads the tasks as a restart does (running tasks wait
//!   for their drones to re-attach) and serves. The term ends when the lease lapses or is
//!   taken (a watchdog stops the term before the lease can lapse on the database), when a
//!   commit fails (its outcome is unknown: step down, the next term reloads), or on
//!   SIGTERM, which releases the lease at once so a standby takes over within a poll.
//!
//! The listeners are bound once; each state serves on duplicates of them, so a drone or
//! client that connects during a switch waits in the accept queue instead of being refused.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::store::pg::{self, Election, Role};
use crate::{http, metrics, net, server, Listeners, Queen, QueenError};

/// How often Postgres is tried while it cannot be reached at start.
const SETUP_RETRY: Duration = Duration::from_secs(1);

/// Most often the watchdog looks at the lease while a term runs.
const WATCHDOG_TICK: Duration = Duration::from_millis(20);

fn dup(listener: &std::net::TcpListener) -> std::io::Result<TcpListener> {
    TcpListener::from_std(listener.try_clone()?)
}

fn io(e: std::io::Error) -> QueenError {
    QueenError::Store(crate::store::StoreError::Io {
        path: "listener".into(),
        source: e,
    })
}

/// What must stop a queen on PostgreSQL before it listens, as a bad data dir stops a
/// sled queen: a URL or CA file that cannot work, or a schema newer than this queen's.
/// A database that cannot be reached yet is not one of them: the queen then stands by
/// and keeps trying (see [`serve`]).
pub fn precheck(cfg: &Config) -> Result<(), QueenError> {
    let unbound = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let settings = pg::Settings::from_config(cfg, unbound, unbound)?;
    match pg::prepare(&settings) {
        Ok(()) => Ok(()),
        Err(e @ crate::store::StoreError::NewerSchema { .. }) => Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "postgres is not reachable yet; standing by until it is");
            Ok(())
        }
    }
}

/// Serves as a standby or a leader, as the lease decides, until `shutdown`.
pub async fn serve(
    cfg: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), QueenError> {
    let tls = net::Tls::from_config(&cfg)?;
    for warning in cfg.warnings() {
        tracing::warn!("{warning}");
    }
    let drones_at = listeners.drones.local_addr().map_err(io)?;
    let http_at = listeners.http.local_addr().map_err(io)?;
    let drones = listeners.drones.into_std().map_err(io)?;
    let http_std = listeners.http.into_std().map_err(io)?;
    let settings = pg::Settings::from_config(&cfg, drones_at, http_at)?;
    let cfg = Arc::new(cfg);
    let metrics = metrics::Metrics::new();

    // Standby from the first moment, even while Postgres cannot be reached yet.
    let mut role = tokio::sync::watch::channel(Role::Standby(None)).1;
    let standby = Standby::start(&cfg, &tls, &drones, &http_std, role.clone())?;
    loop {
        let s = settings.clone();
        match tokio::task::spawn_blocking(move || pg::prepare(&s)).await {
            Ok(Ok(())) => break,
            Ok(Err(e @ crate::store::StoreError::NewerSchema { .. })) => {
                standby.stop().await;
                return Err(e.into());
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot prepare the postgres schema yet; retrying")
            }
            Err(e) => tracing::error!(error = %e, "schema setup panicked; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => { standby.stop().await; return Ok(()); }
            _ = tokio::time::sleep(SETUP_RETRY) => {}
        }
    }
    let election = Election::start(settings.clone())?;
    role = election.role();
    standby.stop().await;

    let mut standby: Option<Standby> = None;
    // The epoch of the last term this queen ended: leading again takes a newer one (the
    // lease thread may not have processed the release of the old one yet).
    let mut last_ended: Option<i64> = None;
    loop {
        let standby_now = match standby.take() {
            Some(s) => s,
            None => Standby::start(&cfg, &tls, &drones, &http_std, role.clone())?,
        };
        tracing::info!(holder = %settings.name, "standing by");
        let epoch = loop {
            if let Role::Leading(epoch) = *role.borrow_and_update() {
                if last_ended.is_none_or(|ended| epoch > ended) {
                    break Some(epoch);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                changed = role.changed() => if changed.is_err() { break None },
            }
        };
        standby_now.stop().await;
        let Some(epoch) = epoch else { break };

        let started = std::time::Instant::now();
        let term_cfg = (*cfg).clone();
        let (s, m, trust) = (settings.clone(), metrics.clone(), election.trust());
        let opened =
            tokio::task::spawn_blocking(move || Queen::open_term(term_cfg, &s, epoch, trust, m))
                .await;
        let queen = match opened {
            Ok(Ok(queen)) => queen,
            Ok(Err(e)) => {
                tracing::error!(epoch, error = %e, "cannot open the store for this term; giving it up");
                last_ended = Some(epoch);
                election.release(epoch);
                continue;
            }
            Err(e) => {
                tracing::error!(epoch, error = %e, "opening the store panicked; giving the term up");
                last_ended = Some(epoch);
                election.release(epoch);
                continue;
            }
        };
        tracing::info!(
            epoch,
            open_ms = started.elapsed().as_millis() as u64,
            "leading"
        );
        let term = shutdown.child_token();
        let watchdog =
            watch_lease(election.trust(), role.clone(), epoch, term.clone()).map_err(io)?;
        // The moment the term ends, standby servers take the listeners over: drones and
        // clients are told who leads while the term's own tasks are still winding down.
        let after_term = {
            let (cfg, tls, role, term) = (cfg.clone(), tls.clone(), role.clone(), term.clone());
            let (drones, http) = (
                drones.try_clone().map_err(io)?,
                http_std.try_clone().map_err(io)?,
            );
            tokio::spawn(async move {
                term.cancelled().await;
                Standby::start(&cfg, &tls, &drones, &http, role)
            })
        };
        let listeners = Listeners {
            drones: dup(&drones).map_err(io)?,
            http: dup(&http_std).map_err(io)?,
        };
        let result = queen.serve(listeners, term.clone()).await;
        term.cancel();
        let _ = tokio::task::spawn_blocking(move || watchdog.join()).await;
        standby = match after_term.await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, "starting the standby servers panicked");
                None
            }
        };
        if shutdown.is_cancelled() {
            // Every queued commit is durable (or failed): hand over now.
            if let Some(s) = standby.take() {
                s.stop().await;
            }
            break;
        }
        match result {
            Ok(()) => tracing::warn!(epoch, "the term ended: the lease lapsed or was taken"),
            Err(e) => tracing::error!(epoch, error = %e, "the term ended"),
        }
        last_ended = Some(epoch);
        election.release(epoch);
    }
    // Releases the lease if this queen still holds it: a standby takes over at its next poll.
    let _ = tokio::task::spawn_blocking(move || election.stop()).await;
    Ok(())
}

/// Ends the term (`term`) as soon as this queen no longer leads in `epoch` or its lease
/// is past the time it may trust it. A thread of its own, not a task: the runtime's
/// workers may be busy (a read waiting on a database that stopped answering), and the
/// term must end on time regardless.
fn watch_lease(
    trust: pg::Trust,
    role: tokio::sync::watch::Receiver<Role>,
    epoch: i64,
    term: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("hive-lease-watchdog".into())
        .spawn(move || loop {
            if term.is_cancelled() {
                return;
            }
            if *role.borrow() != Role::Leading(epoch) {
                tracing::warn!(epoch, "no longer the leader: ending the term");
                term.cancel();
                return;
            }
            let until = trust.until();
            let now = std::time::Instant::now();
            if now >= until {
                tracing::warn!(epoch, "the leader lease could not be renewed in time: ending the term before it lapses");
                term.cancel();
                return;
            }
            std::thread::sleep((until - now).min(WATCHDOG_TICK));
        })
}

/// The standby's servers on the shared listeners.
struct Standby {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Standby {
    fn start(
        cfg: &Arc<Config>,
        tls: &net::Tls,
        drones: &std::net::TcpListener,
        http_listener: &std::net::TcpListener,
        role: tokio::sync::watch::Receiver<Role>,
    ) -> Result<Standby, QueenError> {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let leader = |pick: fn(&pg::LeaderInfo) -> String| {
            let role = role.clone();
            move || match &*role.borrow() {
                Role::Standby(Some(l)) => Some(pick(l)),
                _ => None,
            }
        };
        tracker.spawn(server::serve(
            dup(drones).map_err(io)?,
            server::Target::Standby(Arc::new(leader(|l| l.drones.clone()))),
            server::Limits::from_config(cfg),
            server::Admission::from_config(cfg),
            tls.drones.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        tracker.spawn(net::serve_http(
            dup(http_listener).map_err(io)?,
            http::standby_router(Arc::new(leader(|l| l.http.clone()))),
            cfg.clone(),
            tls.http.clone(),
            stop.clone(),
        ));
        Ok(Standby { stop, tracker })
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
