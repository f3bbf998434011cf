//! A small WebDriver client for the dashboard test: it starts `chromedriver`, opens one
//! headless Chromium session, and drives it over the W3C WebDriver protocol (navigate, find
//! by CSS selector, click, type, read text, run a script, take a screenshot) with blocking
//! `ureq` calls.
//!
//! The browser and the driver are Debian's `chromium` and `chromium-driver` at [`CHROMIUM`]
//! and [`CHROMEDRIVER`]; [`available`] says whether both are installed, so a test can skip
//! where they are not. Dropping a [`Browser`] deletes the session, SIGKILLs any Chromium
//! process still using its profile, then kills and reaps the driver (a [`Proc`], so the
//! driver also dies with the test thread and its log is dumped on failure).

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::process::{Proc, Stdout};
use crate::wait::{wait_until, DEADLINE};

/// The browser binary (Debian package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The driver binary (Debian package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long chromedriver may take to answer `/status` once started: milliseconds when
/// healthy, seconds on a loaded 2-core machine.
const DRIVER_START: Duration = Duration::from_secs(20);

/// Per-command deadline. Creating a session launches Chromium, which can take several
/// seconds under load; every other command answers in milliseconds.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long dropping a browser waits for the session to close before killing what is left.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Ports tried for chromedriver: a free port found by binding `127.0.0.1:0` can be taken by
/// another process before chromedriver binds it, which makes chromedriver exit at once.
const PORT_ATTEMPTS: u32 = 3;

/// The viewport screenshots show: wide enough for the dashboard's two-column layout.
const WINDOW_SIZE: &str = "1440,1100";

/// The JSON key of an element reference, fixed by the W3C spec.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Whether both the browser and the driver are installed.
pub fn available() -> bool {
    Path::new(CHROMIUM).is_file() && Path::new(CHROMEDRIVER).is_file()
}

/// Why a WebDriver command failed.
#[derive(Debug, Clone, PartialEq)]
pub enum WdError {
    /// The driver answered with a WebDriver error, such as `no such element` or `stale
    /// element reference` (the page re-rendered the element).
    Driver {
        status: u16,
        error: String,
        message: String,
    },
    /// No answer, or one that was not WebDriver JSON.
    Transport(String),
}

impl fmt::Display for WdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WdError::Driver {
                status,
                error,
                message,
            } => {
                // Chromium appends a multi-line session info block; the first line says it.
                let first = message.lines().next().unwrap_or_default();
                write!(f, "webdriver {status} {error}: {first}")
            }
            WdError::Transport(e) => write!(f, "webdriver transport error: {e}"),
        }
    }
}

/// The `value` of a WebDriver answer, or its error.
fn answer(r: Result<ureq::Response, ureq::Error>) -> Result<Value, WdError> {
    match r {
        Ok(resp) => {
            let mut body: Value = resp
                .into_json()
                .map_err(|e| WdError::Transport(format!("unreadable answer: {e}")))?;
            Ok(body
                .get_mut("value")
                .map(Value::take)
                .unwrap_or(Value::Null))
        }
        Err(ureq::Error::Status(status, resp)) => {
            let text = resp.into_string().unwrap_or_default();
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let field = |k: &str| body["value"][k].as_str().map(str::to_owned);
            Err(WdError::Driver {
                status,
                error: field("error").unwrap_or_else(|| "unknown error".into()),
                message: field("message").unwrap_or(text),
            })
        }
        Err(e) => Err(WdError::Transport(e.to_string())),
    }
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// Where screenshots go: `<target>/debug/hive-screenshots`, next to the test binary
/// (`<target>/debug/deps/<test>`), so they outlive the test's temp dirs and stay out of
/// the repository.
pub fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    exe.ancestors()
        .nth(2)
        .unwrap_or_else(|| panic!("cannot derive the target dir from {}", exe.display()))
        .join("hive-screenshots")
}

/// The pids of live processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// One headless Chromium session behind its own chromedriver. See the module docs.
#[derive(Debug)]
pub struct Browser {
    /// Names this browser's screenshots and log.
    name: String,
    /// `http://127.0.0.1:<port>/session/<id>`: every command's URL starts with it.
    session: String,
    agent: ureq::Agent,
    /// The driver process; killed after the session is closed.
    driver: Option<Proc>,
    /// Holds the driver's log and the browser profile (`--user-data-dir`), which is unique
    /// to this browser and so also identifies its Chromium processes.
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session with a
    /// fresh profile. `name` labels its screenshots.
    pub fn start(name: &str) -> Browser {
        let dir = tempfile::Builder::new()
            .prefix("hive-browser-")
            .tempdir()
            .expect("create a temp dir for the browser");
        let agent = ureq::AgentBuilder::new().timeout(COMMAND_TIMEOUT).build();
        let log = dir.path().join("chromedriver.log");
        let mut attempt = 0;
        let (driver, base) = loop {
            attempt += 1;
            let port = free_port();
            let mut cmd = Command::new(CHROMEDRIVER);
            cmd.arg(format!("--port={port}"));
            let mut driver = Proc::spawn("chromedriver", cmd, &log, Stdout::Log);
            let base = format!("http://127.0.0.1:{port}");
            let status = format!("{base}/status");
            let up = wait_until(DRIVER_START, "chromedriver to answer /status", || {
                if !driver.is_running() {
                    return Ok(false);
                }
                match answer(agent.get(&status).call()) {
                    Ok(v) if v["ready"] == json!(true) => Ok(true),
                    Ok(v) => Err(format!("not ready: {v}")),
                    Err(e) => Err(e.to_string()),
                }
            });
            if up {
                break (driver, base);
            }
            assert!(
                attempt < PORT_ATTEMPTS,
                "chromedriver exited at start {PORT_ATTEMPTS} times; its log:\n{}",
                crate::process::tail(&log, 40)
            );
        };
        let profile = dir.path().join("profile");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--password-store=basic".to_owned(),
            format!("--window-size={WINDOW_SIZE}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
                }
            }
        });
        let created = answer(agent.post(&format!("{base}/session")).send_json(caps))
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not start chromium: {e}\n{}",
                    crate::process::tail(&log, 40)
                )
            });
        let id = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in the new-session answer: {created}"));
        Browser {
            name: name.to_owned(),
            session: format!("{base}/session/{id}"),
            agent,
            driver: Some(driver),
            dir,
        }
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WdError> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.session));
        answer(match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        })
    }

    /// Opens `url` and waits for its load event.
    pub fn goto(&self, url: &str) -> Result<(), WdError> {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// The first element matching a CSS selector (`no such element` when none does).
    pub fn find(&self, css: &str) -> Result<Element<'_>, WdError> {
        let v = self.command(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        self.element(&v)
    }

    /// Every element matching a CSS selector, in document order.
    pub fn find_all(&self, css: &str) -> Result<Vec<Element<'_>>, WdError> {
        let v = self.command(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v.as_array()
            .ok_or_else(|| WdError::Transport(format!("elements answer is not a list: {v}")))?
            .iter()
            .map(|e| self.element(e))
            .collect()
    }

    fn element(&self, v: &Value) -> Result<Element<'_>, WdError> {
        let id = v[ELEMENT_KEY]
            .as_str()
            .ok_or_else(|| WdError::Transport(format!("not an element reference: {v}")))?;
        Ok(Element {
            browser: self,
            id: id.to_owned(),
        })
    }

    /// Runs `script` as a function body with `args` as `arguments`; returns what it returns.
    pub fn execute(&self, script: &str, args: &[Value]) -> Result<Value, WdError> {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Writes a PNG of the viewport to [`screenshot_dir`] as `<browser name>-<label>.png`,
    /// prints its path and returns it.
    pub fn screenshot(&self, label: &str) -> Result<PathBuf, WdError> {
        let v = self.command("GET", "/screenshot", None)?;
        let b64 = v
            .as_str()
            .ok_or_else(|| WdError::Transport(format!("screenshot is not a string: {v}")))?;
        let png = base64_decode(b64).map_err(WdError::Transport)?;
        let dir = screenshot_dir();
        let path = dir.join(format!("{}-{label}.png", self.name));
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, png))
            .map_err(|e| WdError::Transport(format!("writing {}: {e}", path.display())))?;
        eprintln!("screenshot: {}", path.display());
        Ok(path)
    }

    /// Waits until the first element matching `css` has visible text satisfying `ok`;
    /// returns the text.
    pub fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        wait_until(DEADLINE, &format!("{what} (`{css}`)"), || {
            let text = self
                .find(css)
                .and_then(|e| e.text())
                .map_err(|e| e.to_string())?;
            if ok(&text) {
                Ok(text)
            } else {
                Err(format!("text {text:?}"))
            }
        })
    }

    /// Waits until exactly `n` elements match `css`.
    pub fn wait_count(&self, css: &str, n: usize) {
        wait_until(DEADLINE, &format!("{n} elements matching `{css}`"), || {
            let found = self.find_all(css).map_err(|e| e.to_string())?.len();
            if found == n {
                Ok(())
            } else {
                Err(format!("{found} match"))
            }
        });
    }

    /// Clicks the first element matching `css` once it exists and can be clicked. A page
    /// that re-renders between finding and clicking (a stale element) is simply retried.
    pub fn click(&self, css: &str) {
        wait_until(DEADLINE, &format!("a clickable `{css}`"), || {
            self.find(css).and_then(|e| e.click())
        });
    }

    /// Clears the input matching `css` and types `text` into it.
    pub fn type_into(&self, css: &str, text: &str) {
        wait_until(DEADLINE, &format!("typing into `{css}`"), || {
            let input = self.find(css)?;
            input.clear()?;
            input.send_keys(text)
        });
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The page as the failure left it; best effort, the test is failing anyway.
            if let Err(e) = self.screenshot("failure") {
                eprintln!("no failure screenshot: {e}");
            }
        }
        let closed = self
            .agent
            .delete(&self.session)
            .timeout(CLOSE_TIMEOUT)
            .call();
        if let Err(e) = answer(closed) {
            eprintln!("closing the browser session failed: {e}");
        }
        // Chromium's processes (browser, renderers, crash handler) are the driver's
        // children, not ours: find them by the profile dir only they were given, so a hung
        // or orphaned one never outlives the test.
        let profile = self.dir.path().join("profile");
        for pid in pids_mentioning(&profile.display().to_string()) {
            // SAFETY: kill(2) has no memory effects; `pid` is one positive process id.
            let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
            if rc != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::ESRCH) {
                    eprintln!("cannot kill chromium process {pid}: {err}");
                }
            }
        }
        // Dropping the driver's Proc SIGKILLs and reaps it.
        self.driver.take();
    }
}

/// An element of the page, valid until the page replaces it (then commands on it fail with
/// `stale element reference`).
#[derive(Debug)]
pub struct Element<'b> {
    browser: &'b Browser,
    id: String,
}

impl Element<'_> {
    fn command(&self, method: &str, what: &str, body: Option<Value>) -> Result<Value, WdError> {
        self.browser
            .command(method, &format!("/element/{}/{what}", self.id), body)
    }

    pub fn click(&self) -> Result<(), WdError> {
        self.command("POST", "click", Some(json!({}))).map(drop)
    }

    /// The rendered text: empty for a hidden element.
    pub fn text(&self) -> Result<String, WdError> {
        let v = self.command("GET", "text", None)?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// An attribute's value, if the element has it.
    pub fn attr(&self, name: &str) -> Result<Option<String>, WdError> {
        let v = self.command("GET", &format!("attribute/{name}"), None)?;
        Ok(v.as_str().map(str::to_owned))
    }

    pub fn displayed(&self) -> Result<bool, WdError> {
        Ok(self.command("GET", "displayed", None)? == json!(true))
    }

    pub fn clear(&self) -> Result<(), WdError> {
        self.command("POST", "clear", Some(json!({}))).map(drop)
    }

    pub fn send_keys(&self, text: &str) -> Result<(), WdError> {
        self.command("POST", "value", Some(json!({ "text": text })))
            .map(drop)
    }
}

/// Decodes standard base64 (WebDriver screenshots), ignoring line breaks; a few lines here
/// spare the harness a dependency.
fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b'\r' | b'\n' => continue,
            _ => return Err(format!("invalid base64 byte {c:#04x}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from(acc >> bits).expect("at most 8 bits remain above `bits`"));
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode(""), Ok(Vec::new()));
        assert_eq!(base64_decode("aGl2ZQ=="), Ok(b"hive".to_vec()));
        assert_eq!(base64_decode("cXVlZW4="), Ok(b"queen".to_vec()));
        assert_eq!(base64_decode("ZHJvbmVz"), Ok(b"drones".to_vec()));
        assert_eq!(base64_decode("ZHJv\nbmVz"), Ok(b"drones".to_vec()));
        assert_eq!(
            base64_decode("/+8A"),
            Ok(vec![0xff, 0xef, 0x00]),
            "the two symbols past 0-9"
        );
        assert!(base64_decode("a*b").is_err());
    }
}
