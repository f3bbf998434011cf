//! The dashboard (`GET /`) in a real browser: headless Chromium driven over WebDriver
//! against a real queen and drone. The page must show what the API says as it changes, its
//! buttons must act on the queen (checked through the API, not the page), it must ask for
//! the API token when the queen wants one, and nothing a task carries may become markup.
//!
//! Needs Debian's `chromium` and `chromium-driver`; without them each test prints that it
//! was skipped and passes (CI installs both, so there it always runs). Screenshots land in
//! `<target>/debug/hive-screenshots/`.

use std::time::Duration;

use hive_tests::webdriver::{self, Browser};
use hive_tests::{echo, sh, wait_until, Hive, DEADLINE};
use serde_json::{json, Value};
use shared::api::{QueueView, QueuesResponse, TaskSpec, TaskState, TaskView};

/// Long enough for a 30-task burst on a loaded 2-core machine; a healthy hive needs well
/// under a second.
const BURST_DONE: Duration = Duration::from_secs(30);

/// A payload that runs script if the page ever parses task data as HTML.
const XSS: &str =
    r#"<img src=x onerror="window.__hive_xss=1"><script>window.__hive_xss=2</script>"#;

/// Whether Chromium is missing, having said so: the test then skips.
fn no_chromium() -> bool {
    if webdriver::available() {
        return false;
    }
    eprintln!(
        "chromium not installed; dashboard test skipped (needs {} and {})",
        webdriver::CHROMIUM,
        webdriver::CHROMEDRIVER
    );
    true
}

/// The queue `name` as `GET /v1/queues` shows it.
fn queue(hive: &Hive, name: &str) -> Option<QueueView> {
    let (status, body) = hive.api().get_raw("/v1/queues").ok()?;
    assert_eq!(status, 200, "GET /v1/queues: {body}");
    let all: QueuesResponse = serde_json::from_str(&body).expect("a queues answer");
    all.queues.into_iter().find(|q| q.name == name)
}

fn wait_paused(hive: &Hive, name: &str, paused: bool) {
    wait_until(
        DEADLINE,
        &format!("queue {name} paused={paused} through the API"),
        || {
            let q = queue(hive, name);
            if q.as_ref().is_some_and(|q| q.paused == paused) {
                Ok(())
            } else {
                Err(format!("{q:?}"))
            }
        },
    );
}

/// Guards against a dashboard that stops reflecting the hive: a task that succeeded must
/// show as succeeded with the counts by state and by queue, the drone with the task it is
/// running, and a throughput above zero once tasks finish. Also guards the task detail view
/// and its cancel button, and against task data (a payload holding markup) being rendered as
/// HTML.
#[test]
fn the_dashboard_shows_tasks_queues_drones_and_throughput_as_they_change() {
    if no_chromium() {
        return;
    }
    let mut hive = Hive::start();
    hive.start_drone("d1", 2);
    // Started after the hive so it is dropped first: a failure screenshot shows the page
    // while the queen still runs.
    let browser = Browser::start("live");
    let api = hive.api().clone();
    browser.goto(&api.url("/")).expect("open the dashboard");
    browser.wait_text("#status", "the dashboard to be live", |t| {
        t.starts_with("live")
    });

    let task = api.submit(&TaskSpec {
        queue: Some("dash".into()),
        ..echo(json!({ "html": XSS }))
    });
    let id = task.id;
    browser.wait_text(
        &format!("#tasks tr[data-task-id='{id}'] [data-field=state]"),
        "the echo task listed as succeeded",
        |t| t == "succeeded",
    );
    browser.wait_text(
        "#counts [data-state=succeeded] .n",
        "one succeeded task counted",
        |t| t == "1",
    );
    browser.wait_text(
        "#queues tr[data-queue=dash] td[data-state=succeeded]",
        "queue dash counting its succeeded task",
        |t| t == "1",
    );
    browser.wait_text("#drones tr[data-drone=d1]", "drone d1 connected", |t| {
        t.contains("connected")
    });

    // The detail view shows the payload and result as JSON text: nothing in them ran or
    // became an element.
    let shown = serde_json::to_string(XSS).expect("a string serialises");
    browser.click(&format!("#tasks a[data-task-id='{id}']"));
    browser.wait_text(
        &format!("#detail[data-task-id='{id}'] #detail-result"),
        "the result in the detail view",
        |t| t.contains(&shown),
    );
    let payload = browser
        .find("#detail-payload")
        .and_then(|e| e.text())
        .expect("the payload in the detail view");
    assert!(payload.contains(&shown), "{payload}");
    let injected = browser
        .execute(
            "return [window.__hive_xss === undefined, \
             document.querySelectorAll('main img, main script, #detail img, #detail script').length]",
            &[],
        )
        .expect("run a script");
    assert_eq!(
        injected,
        json!([true, 0]),
        "task data must never be parsed as HTML"
    );
    browser.click("#detail button[data-action=close]");
    browser.wait_count("#detail:not([hidden])", 0);

    // A running task shows under its drone and can be cancelled from its detail view.
    let sleeper = api.submit(&TaskSpec {
        queue: Some("dash".into()),
        ..sh("sleep 30")
    });
    let link = format!("#drones tr[data-drone=d1] a[data-task-id='{}']", sleeper.id);
    browser.wait_count(&link, 1);
    browser.click(&link);
    browser.wait_text(
        &format!("#detail[data-task-id='{}'] [data-field=state]", sleeper.id),
        "the running task's detail",
        |t| t == "running",
    );
    browser.screenshot("detail-running").expect("screenshot");
    browser.click("#detail button[data-action=cancel]");
    hive.wait_task(sleeper.id, "cancelled from the dashboard", |t| {
        t.state == TaskState::Cancelled
    });
    browser.wait_text(
        "#detail [data-field=state]",
        "the detail view showing the cancel",
        |t| t == "cancelled",
    );
    browser.click("#detail button[data-action=close]");

    // A task whose drone dies shows the lost lease and its verdict.
    let orphan = api.submit(&TaskSpec {
        queue: Some("dash".into()),
        max_attempts: Some(5),
        ..sh("sleep 30")
    });
    hive.wait_task(orphan.id, "running on d1", |t| {
        t.state == TaskState::Running
    });
    hive.drone("d1").kill9();
    hive.wait_task(orphan.id, "its lease lost", |t| t.suspicion.is_some());
    hive.restart_drone("d1");
    browser
        .goto(&api.url(&format!("/#task/{}", orphan.id)))
        .expect("open the task's detail");
    browser.wait_text(
        &format!(
            "#detail[data-task-id='{}'] #detail-losses [data-field=verdict]",
            orphan.id
        ),
        "the lost lease and its verdict in the detail view",
        |t| t == "alone" || t == "shared",
    );
    browser.screenshot("detail-lost-lease").expect("screenshot");
    api.try_cancel(orphan.id).expect("cancel the orphaned task");
    browser.click("#detail button[data-action=close]");

    // A burst of finished tasks moves the throughput off zero.
    let burst: Vec<TaskSpec> = (0..30)
        .map(|i| TaskSpec {
            queue: Some("burst".into()),
            ..echo(json!({ "i": i }))
        })
        .collect();
    let ids: Vec<_> = api.batch(burst).into_iter().map(|v| v.id).collect();
    hive.wait_all_succeeded(BURST_DONE, &ids);
    browser.wait_text(
        "#queues tr[data-queue=burst] td[data-state=succeeded]",
        "the burst counted in its queue",
        |t| t == "30",
    );
    wait_until(DEADLINE, "a throughput sample above zero", || {
        let peak = browser
            .find("#sparkline")
            .and_then(|e| e.attr("data-peak"))
            .map_err(|e| e.to_string())?;
        match peak.as_deref().map(str::parse::<f64>) {
            Some(Ok(p)) if p > 0.0 => Ok(p),
            other => Err(format!("peak {other:?}")),
        }
    });
    browser.screenshot("overview").expect("screenshot");
}

/// Guards against dashboard buttons that do nothing, or the wrong thing: pausing a queue
/// from the page must pause it in the queen (new tasks wait) and resuming must release
/// them; retrying a failed task from its detail view must run it again, keeping the first
/// attempt's error.
#[test]
fn the_dashboard_buttons_pause_and_resume_a_queue_and_retry_a_failed_task() {
    if no_chromium() {
        return;
    }
    let mut hive = Hive::start();
    hive.start_drone("d1", 2);
    let browser = Browser::start("buttons");
    let api = hive.api().clone();
    let failing = api.submit(&TaskSpec {
        queue: Some("flaky".into()),
        max_attempts: Some(1),
        ..sh("exit 3")
    });
    hive.wait_task(failing.id, "failed", |t| t.state == TaskState::Failed);

    browser.goto(&api.url("/")).expect("open the dashboard");
    let row = format!("#failures tr[data-task-id='{}']", failing.id);
    browser.wait_text(
        &format!("{row} [data-field=error]"),
        "the failure listed with its error",
        |t| t.contains("exit code 3"),
    );

    // Retry from the detail view.
    browser.click(&format!("{row} a[data-task-id='{}']", failing.id));
    browser.wait_count("#detail-errors tbody tr", 1);
    browser.click(&format!(
        "#detail[data-task-id='{}'] button[data-action=retry]",
        failing.id
    ));
    let again = hive.wait_task(failing.id, "retried and failed again", |t| {
        t.state == TaskState::Failed && t.errors.len() == 2
    });
    assert!(
        again.errors.iter().all(|e| e.error.contains("exit code 3")),
        "{again:#?}"
    );
    assert!(
        again.errors[1].fence > again.errors[0].fence,
        "the retry ran under a new fence: {again:#?}"
    );
    browser.wait_count("#detail-errors tbody tr", 2);
    browser.screenshot("detail-retried").expect("screenshot");
    browser.click("#detail button[data-action=close]");

    // Pause, and a new task waits; resume, and it runs.
    browser.click("#queues button[data-action=pause][data-queue=flaky]");
    wait_paused(&hive, "flaky", true);
    browser.wait_count("#queues tr[data-queue=flaky][data-paused=true]", 1);
    let held = api.submit(&TaskSpec {
        queue: Some("flaky".into()),
        ..echo(json!("held"))
    });
    browser.wait_text(
        &format!("#tasks tr[data-task-id='{}'] [data-field=state]", held.id),
        "the task in the paused queue listed as pending",
        |t| t == "pending",
    );
    assert_eq!(
        api.task(held.id).state,
        TaskState::Pending,
        "a task in a paused queue must not start"
    );
    browser.screenshot("paused").expect("screenshot");
    browser.click("#queues button[data-action=resume][data-queue=flaky]");
    wait_paused(&hive, "flaky", false);
    hive.wait_task(held.id, "run once its queue is resumed", |t| {
        t.state == TaskState::Succeeded
    });
    browser.wait_text(
        &format!("#tasks tr[data-task-id='{}'] [data-field=state]", held.id),
        "the released task listed as succeeded",
        |t| t == "succeeded",
    );
}

/// Guards against a dashboard that fails silently (or shows nothing useful) when the queen
/// requires an API token: without one, and with a wrong one, the page must say the token
/// is missing or refused; with the right one it must show the data, and remember the token
/// across a reload.
#[test]
fn the_dashboard_asks_for_the_api_token_and_shows_data_once_given() {
    const TOKEN: &str = "dash-s3cret";
    if no_chromium() {
        return;
    }
    let hive = Hive::builder()
        .config_toml(&format!("[auth]\ntoken = \"{TOKEN}\"\n"))
        .start();
    let browser = Browser::start("token");
    let api = hive.api().clone();
    // The harness's client sends no token; this queen has no drones, so the task waits.
    let submitted = ureq::post(&api.url("/v1/tasks"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(echo(json!("behind a token")))
        .expect("submit with the token");
    let task: TaskView = submitted.into_json().expect("a task record");
    assert_eq!(
        api.get_raw("/v1/stats").expect("an answer").0,
        401,
        "the queen must want the token"
    );

    browser.goto(&api.url("/")).expect("open the dashboard");
    browser.wait_text("#auth-error", "the page asking for the token", |t| {
        t.contains("Unauthorized") && t.contains("requires an API token")
    });
    browser.wait_text("#status", "the status saying so", |t| t == "unauthorized");
    assert_eq!(
        browser
            .find_all("[data-task-id]")
            .expect("query the page")
            .len(),
        0,
        "no data without the token"
    );
    browser.screenshot("no-token").expect("screenshot");

    browser.type_into("#token", "wrong-token");
    browser.click("#token-save");
    browser.wait_text("#auth-error", "the page refusing a wrong token", |t| {
        t.contains("refused")
    });

    browser.type_into("#token", TOKEN);
    browser.click("#token-save");
    let row = format!("#tasks tr[data-task-id='{}'] [data-field=state]", task.id);
    browser.wait_text(&row, "the task shown once the token is given", |t| {
        t == "pending"
    });
    let banner = browser.find("#auth-error").expect("the banner element");
    assert!(
        !banner.displayed().expect("ask if displayed"),
        "the auth error must go once the token works"
    );

    // The token is kept in the browser: a reload shows the data without asking again.
    browser.goto(&api.url("/")).expect("reload the dashboard");
    browser.wait_text(&row, "the task shown after a reload", |t| t == "pending");
    let stored: Value = browser
        .execute("return localStorage.getItem('hive-token')", &[])
        .expect("read localStorage");
    assert_eq!(stored, json!(TOKEN));
}
