//! Periodic schedules: a task spec submitted on a cron pattern (5 or 6 fields, UTC) or
//! every N milliseconds. Pure: callers pass `now`.
//!
//! Catch-up policy: a schedule never bursts. After downtime (or a slow tick) it runs once
//! for the latest tick it missed, then follows its pattern from now on. Each run's task has
//! the idempotency key `schedule/<name>/<tick ms>`, so one tick never runs twice, even
//! when the queen dies between submitting the run and recording the tick.

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// How often a schedule fires.
#[derive(Debug, Clone)]
pub enum Every {
    Cron { pattern: String, cron: Box<Cron> },
    Interval { ms: u64 },
}

/// The shortest interval allowed: one run per second at most per schedule.
pub const MIN_EVERY_MS: u64 = 1_000;
/// Longest interval: a schedule that runs less than once a year is a calendar entry, and
/// longer intervals reach the end of representable time.
pub const MAX_EVERY_MS: u64 = 366 * 24 * 3600 * 1000;

impl Every {
    pub fn cron(pattern: &str) -> Result<Every, String> {
        let fields = pattern.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "cron `{pattern}` has {fields} fields; expected 5 (minute hour day month weekday) or 6 (with seconds first)"
            ));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        let cron = parser
            .parse(pattern)
            .map_err(|e| format!("invalid cron `{pattern}`: {e}"))?;
        Ok(Every::Cron {
            pattern: pattern.to_string(),
            cron: Box::new(cron),
        })
    }

    pub fn interval(ms: u64) -> Result<Every, String> {
        if !(MIN_EVERY_MS..=MAX_EVERY_MS).contains(&ms) {
            return Err(format!(
                "every_ms must be between {MIN_EVERY_MS} and {MAX_EVERY_MS} (366 days), got {ms}"
            ));
        }
        Ok(Every::Interval { ms })
    }
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub every: Every,
    /// The task spec as submitted (API JSON), validated when the schedule was created.
    pub task: serde_json::Value,
    pub created_at: DateTime<Utc>,
    /// The last tick that ran (or the creation time): earlier ticks never run.
    pub last_tick: DateTime<Utc>,
}

impl Schedule {
    /// The latest tick at or before `now` that has not run yet.
    pub fn due(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let tick = match &self.every {
            Every::Cron { cron, .. } => cron.find_previous_occurrence(&now, true).ok()?,
            Every::Interval { ms } => {
                let elapsed = (now - self.created_at).num_milliseconds();
                let k = elapsed.checked_div(*ms as i64)?;
                if k < 1 {
                    return None;
                }
                self.created_at + chrono::Duration::milliseconds(k * *ms as i64)
            }
        };
        (tick > self.last_tick && tick > self.created_at).then_some(tick)
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.every {
            Every::Cron { cron, .. } => cron.find_next_occurrence(&after, false).ok(),
            Every::Interval { ms } => {
                // Checked throughout: an interval near the end of representable time has
                // no next tick rather than an overflow.
                let step = i64::try_from(*ms).ok().filter(|s| *s > 0)?;
                let elapsed = (after - self.created_at).num_milliseconds().max(0);
                let offset = (elapsed / step + 1).checked_mul(step)?;
                self.created_at
                    .checked_add_signed(chrono::Duration::try_milliseconds(offset)?)
            }
        }
    }

    /// When the core should next look at this schedule.
    pub fn wake_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.due(now).is_some() {
            return Some(now);
        }
        self.next_after(now.max(self.last_tick))
    }

    pub fn idempotency_key(&self, tick: DateTime<Utc>) -> String {
        format!("schedule/{}/{}", self.name, tick.timestamp_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, h, m, s)
            .single()
            .expect("valid time")
    }

    fn schedule(every: Every, created: DateTime<Utc>) -> Schedule {
        Schedule {
            name: "s".into(),
            every,
            task: serde_json::json!({"kind": "echo"}),
            created_at: created,
            last_tick: created,
        }
    }

    #[test]
    fn cron_accepts_five_or_six_fields_and_names_what_is_wrong() {
        assert!(Every::cron("*/5 * * * *").is_ok());
        assert!(Every::cron("30 */5 * * * *").is_ok());
        assert!(Every::cron("* * * *").unwrap_err().contains("4 fields"));
        assert!(Every::cron("0 0 0 1 1 * 2030")
            .unwrap_err()
            .contains("7 fields"));
        assert!(Every::cron("99 * * * *")
            .unwrap_err()
            .contains("invalid cron"));
        assert!(Every::interval(10).unwrap_err().contains("every_ms"));
    }

    #[test]
    fn a_cron_schedule_runs_once_per_tick_and_once_after_downtime() {
        let mut s = schedule(Every::cron("*/5 * * * *").expect("valid"), at(10, 1, 0));
        assert_eq!(s.due(at(10, 4, 59)), None);
        assert_eq!(s.due(at(10, 5, 0)), Some(at(10, 5, 0)));
        s.last_tick = at(10, 5, 0);
        assert_eq!(s.due(at(10, 7, 0)), None, "one run per tick");
        assert_eq!(s.next_after(at(10, 7, 0)), Some(at(10, 10, 0)));
        // Down from 10:07 to 11:02: only the latest missed tick runs (no burst).
        assert_eq!(s.due(at(11, 2, 0)), Some(at(11, 0, 0)));
        s.last_tick = at(11, 0, 0);
        assert_eq!(s.wake_at(at(11, 2, 0)), Some(at(11, 5, 0)));
    }

    #[test]
    fn an_interval_schedule_ticks_from_its_creation() {
        let mut s = schedule(Every::interval(60_000).expect("valid"), at(10, 0, 30));
        assert_eq!(s.due(at(10, 1, 29)), None);
        assert_eq!(s.due(at(10, 1, 30)), Some(at(10, 1, 30)));
        s.last_tick = at(10, 1, 30);
        assert_eq!(s.next_after(at(10, 1, 30)), Some(at(10, 2, 30)));
        assert_eq!(
            s.due(at(10, 9, 45)),
            Some(at(10, 9, 30)),
            "latest missed tick only"
        );
        assert_eq!(
            s.idempotency_key(at(10, 9, 30)),
            format!("schedule/s/{}", at(10, 9, 30).timestamp_millis())
        );
    }
}
