//! The fuzzers' inputs, as proptest strategies: JSON values, task specs near valid and
//! wild, mutated bodies, HTTP requests, and drone messages and frames naming real and
//! unknown tasks.

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};
use shared::frame;
use shared::protocol::{
    Checkpoint, DroneMessage, Heartbeat, Held, Hello, TaskComplete, TaskFailed,
};
use shared::{DroneId, Fence, TaskId};

// ----- generators --------------------------------------------------------------------------

/// Any JSON value, a few levels deep.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Mostly short strings, now and then a long one (up to 4 KiB).
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => any::<String>(),
        1 => (any::<char>(), 0usize..4096).prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
}

/// Names as the API takes them (kind, queue, label, schedule): good ones, edge cases and
/// junk.
pub fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(&["echo", "exec", "default", "q1", "a:b/c.d_e-f"][..])
            .prop_map(str::to_string),
        2 => "[a-zA-Z0-9._:/-]{1,12}",
        1 => Just(String::new()),
        1 => Just("x".repeat(129)),
        1 => Just("x".repeat(128)),
        2 => text(),
    ]
}

pub fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..10_000).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(
            &[
                0,
                1,
                u32::MAX as u64,
                u32::MAX as u64 + 1,
                i64::MAX as u64,
                u64::MAX
            ][..]
        )
        .prop_map(Value::from),
        prop::sample::select(&[-1.0, 0.5, 1e308, -1e308, 1e-300][..]).prop_map(Value::from),
        json_value(),
    ]
}

pub fn timestamp() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(
            &[
                "2026-01-01T12:00:00Z",
                "1970-01-01T00:00:00Z",
                "0000-01-01T00:00:00Z",
                "9999-12-31T23:59:59Z",
                "9999-12-31T23:59:59-23:59",
                "0000-01-01T00:00:00+23:59",
                "2026-13-01T00:00:00Z",
                "yesterday",
                "",
            ][..]
        )
        .prop_map(Value::from),
        json_value(),
    ]
}

pub fn uuid_text() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string())
}

/// A task spec: half of them valid but for at most one field, the rest with every field
/// wild.
pub fn spec() -> impl Strategy<Value = Value> {
    prop_oneof![near_valid_spec(), wild_spec()]
}

/// A valid spec with at most one field replaced by a wild value (or one unknown field
/// added), so validation is reached field by field and specs are also accepted.
pub fn near_valid_spec() -> impl Strategy<Value = Value> {
    let valid = (
        (
            prop_oneof![
                3 => Just(json!({"kind": "echo"})),
                1 => Just(json!({"kind": "exec", "payload": {"cmd": ["true"], "env": {"A": "1"}}})),
            ],
            prop::option::of(json_value()),
            prop::option::of(prop::sample::select(
                &["default", "q1", "q-2", "a:b/c.d_e"][..],
            )),
            prop::option::of(any::<i32>()),
            prop::option::of(0u64..10_000_000),
            prop::option::of(1u32..20),
        ),
        (
            prop::option::of(1u64..1_000_000),
            prop::option::of(prop::collection::vec("[a-z0-9]{1,8}", 0..3)),
            prop::option::of("[a-zA-Z0-9/_-]{1,24}"),
            prop::option::weighted(
                0.2,
                (1u64..1000, 1.0f64..10.0, 1000u64..100_000, 0.0f64..1.0),
            ),
        ),
    )
        .prop_map(
            |((base, payload, queue, priority, delay, attempts), (timeout, labels, key, retry))| {
                let mut m = base.as_object().cloned().unwrap_or_default();
                if let (Some(p), false) = (payload, m.contains_key("payload")) {
                    m.insert("payload".into(), p);
                }
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                };
                put("queue", queue.map(Value::from));
                put("priority", priority.map(Value::from));
                put("delay_ms", delay.map(Value::from));
                put("max_attempts", attempts.map(Value::from));
                put("timeout_ms", timeout.map(Value::from));
                put("labels", labels.map(Value::from));
                put("idempotency_key", key.map(Value::from));
                put(
                    "retry",
                    retry.map(|(i, f, m, j)| {
                        json!({"initial_ms": i, "factor": f, "max_ms": m, "jitter": j})
                    }),
                );
                Value::Object(m)
            },
        );
    const FIELDS: &[&str] = &[
        "kind",
        "payload",
        "queue",
        "priority",
        "run_at",
        "delay_ms",
        "max_attempts",
        "timeout_ms",
        "labels",
        "idempotency_key",
        "depends_on",
        "ref",
        "retry",
        "priorty",
    ];
    let wild = prop_oneof![
        number(),
        name().prop_map(Value::from),
        timestamp(),
        json_value(),
    ];
    (
        valid,
        prop::option::of((prop::sample::select(FIELDS), wild)),
    )
        .prop_map(|(mut v, change)| {
            if let (Some((k, x)), Some(m)) = (change, v.as_object_mut()) {
                m.insert(k.to_string(), x);
            }
            v
        })
}

/// A task spec, each field present or not, with plausible, edge and wild values, and now
/// and then a field the spec does not have.
pub fn wild_spec() -> impl Strategy<Value = Value> {
    let exec_payload = prop_oneof![
        Just(json!({"cmd": ["true"]})),
        Just(json!({"cmd": []})),
        Just(json!({"cmd": "ls"})),
        Just(json!({"cmd": ["sh"], "env": {"A": 1}, "cwd": 3})),
        Just(json!({"cmd": ["sh"], "permanent_exit_codes": [0, 256, -1]})),
        Just(json!({"cmd": ["sh"], "bogus": true})),
    ];
    let payload = prop_oneof![
        4 => json_value(),
        1 => exec_payload,
        1 => (3_000usize..6_000).prop_map(|n| Value::from("p".repeat(n))),
    ];
    let retry = prop::collection::vec(
        (
            prop::sample::select(&["initial_ms", "factor", "max_ms", "jitter", "bogus"][..]),
            number(),
        ),
        0..4,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
    let depends = prop::collection::vec(
        prop_oneof![
            uuid_text().prop_map(Value::from),
            prop::sample::select(&["a", "b", "c"][..]).prop_map(Value::from),
            json_value(),
        ],
        0..4,
    )
    .prop_map(Value::Array);
    let fields = (
        (
            prop::option::weighted(
                0.9,
                prop_oneof![9 => name().prop_map(Value::from), 1 => json_value()],
            ),
            prop::option::of(payload),
            prop::option::of(prop_oneof![name().prop_map(Value::from), json_value()]),
            prop::option::of(number()),
            prop::option::weighted(0.2, timestamp()),
            prop::option::weighted(0.3, number()),
        ),
        (
            prop::option::weighted(0.3, number()),
            prop::option::weighted(0.3, number()),
            prop::option::weighted(
                0.3,
                prop::collection::vec(name().prop_map(Value::from), 0..40).prop_map(Value::Array),
            ),
            prop::option::weighted(0.3, prop_oneof![name().prop_map(Value::from), json_value()]),
            prop::option::weighted(0.3, depends),
            prop::option::weighted(0.3, prop::sample::select(&["a", "b", "c", ""][..])),
            prop::option::weighted(0.2, retry),
            prop::option::weighted(0.1, (name(), json_value())),
        ),
    );
    fields.prop_map(
        |(
            (kind, payload, queue, priority, run_at, delay_ms),
            (max_attempts, timeout_ms, labels, key, depends_on, reference, retry, extra),
        )| {
            let mut m = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            };
            put("kind", kind);
            put("payload", payload);
            put("queue", queue);
            put("priority", priority);
            put("run_at", run_at);
            put("delay_ms", delay_ms);
            put("max_attempts", max_attempts);
            put("timeout_ms", timeout_ms);
            put("labels", labels);
            put("idempotency_key", key);
            put("depends_on", depends_on);
            put("ref", reference.map(Value::from));
            put("retry", retry);
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        },
    )
}

#[derive(Debug, Clone)]
pub enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            bytes.push(b'{');
        }
        let n = bytes.len();
        match m {
            Mutation::Flip(i, bit) => bytes[i.index(n)] ^= 1 << bit,
            Mutation::Insert(i, b) => bytes.insert(i.index(n + 1), *b),
            Mutation::Delete(i) => {
                bytes.remove(i.index(n));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(n)),
        }
    }
    bytes
}

/// A JSON body: as generated, with a few bytes mutated, or replaced by random bytes or
/// by some other JSON value.
pub fn body_from(v: impl Strategy<Value = Value>) -> impl Strategy<Value = Vec<u8>> {
    (
        v,
        0u8..11,
        prop::collection::vec(mutation(), 1..4),
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(v, mode, mutations, random)| match mode {
            0..=5 => v.to_string().into_bytes(),
            6..=8 => mutate(v.to_string().into_bytes(), &mutations),
            9 => random,
            _ => Value::Array(vec![v]).to_string().into_bytes(),
        })
}

/// Percent-encodes everything but unreserved characters, so any bytes make a valid URI.
pub fn pct(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(
            &["v1", "tasks", "queues", "schedules", "drones", "stats", "metrics", "healthz",
              "batch", "cancel", "retry", "pause", "resume", "default", ""][..]
        )
        .prop_map(str::to_string),
        2 => uuid_text(),
        2 => prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| pct(&b)),
        1 => name().prop_map(|n| pct(n.as_bytes())),
    ]
}

pub fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        4 => prop::sample::select(&["state", "queue", "before", "limit", "bogus", ""][..])
            .prop_map(|k| k.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..12),
    ];
    let value = prop_oneof![
        4 => prop::sample::select(
            &["pending", "running", "succeeded", "done", "default", "0", "1", "1000", "1001",
              "-1", "99999999999999999999", ""][..]
        )
        .prop_map(|v| v.as_bytes().to_vec()),
        2 => uuid_text().prop_map(String::into_bytes),
        2 => prop::collection::vec(any::<u8>(), 0..24),
    ];
    prop::collection::vec((key, value, any::<bool>()), 0..5).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v, raw)| {
                if raw {
                    // Unencoded bytes where the URI allows them; percent signs stay raw
                    // too, so half-encodings like `%G1` or `%` reach the query parser.
                    let keep = |b: &Vec<u8>| -> String {
                        b.iter()
                            .map(|&c| {
                                if c.is_ascii_alphanumeric() || b"-._~!$'()*+,;:@/?%".contains(&c) {
                                    (c as char).to_string()
                                } else {
                                    format!("%{c:02X}")
                                }
                            })
                            .collect()
                    };
                    format!("{}={}", keep(&k), keep(&v))
                } else {
                    format!("{}={}", pct(&k), pct(&v))
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// One HTTP request the fuzzer sends.
#[derive(Debug, Clone)]
pub struct Call {
    pub endpoint: &'static str,
    pub method: &'static str,
    pub uri: String,
    pub body: Vec<u8>,
}

pub fn call() -> impl Strategy<Value = Call> {
    let post = |endpoint: &'static str, uri: String, body: Vec<u8>| Call {
        endpoint,
        method: "POST",
        uri,
        body,
    };
    let batch = prop_oneof![
        4 => prop::collection::vec(spec(), 0..6).prop_map(|t| json!({ "tasks": t })),
        3 => prop::collection::vec(near_valid_spec(), 1..6).prop_map(|t| json!({ "tasks": t })),
        1 => (prop::collection::vec(spec(), 0..3), json_value())
            .prop_map(|(t, x)| json!({ "tasks": t, "extra": x })),
        1 => json_value().prop_map(|t| json!({ "tasks": t })),
    ];
    let limits = prop::collection::vec(
        (
            prop::sample::select(&["max_running", "rate_per_s", "paused", ""][..]),
            prop_oneof![Just(Value::Null), number()],
        ),
        0..3,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
    let cron = prop_oneof![
        prop::sample::select(
            &[
                "*/5 * * * *",
                "30 */5 * * * *",
                "* * * *",
                "99 * * * *",
                "0 0 31 2 *",
                "0 0 0 1 1 * 2030",
                "* * * * * * *",
                "",
                "@daily",
                "59 59 23 31 12 *"
            ][..]
        )
        .prop_map(Value::from),
        json_value(),
    ];
    let near_valid_schedule = (
        "[a-z0-9-]{1,12}",
        prop_oneof![
            prop::sample::select(&["*/5 * * * *", "0 0 1 1 *", "30 */5 * * * *"][..])
                .prop_map(|c| ("cron", Value::from(c))),
            (1_000u64..100_000_000).prop_map(|ms| ("every_ms", Value::from(ms))),
        ],
        near_valid_spec(),
        prop::option::of((
            prop::sample::select(&["name", "cron", "every_ms", "task", "bogus"][..]),
            prop_oneof![number(), name().prop_map(Value::from), json_value()],
        )),
    )
        .prop_map(|(name, (key, every), task, change)| {
            let mut m = Map::new();
            m.insert("name".into(), Value::from(name));
            m.insert(key.into(), every);
            m.insert("task".into(), task);
            if let Some((k, v)) = change {
                m.insert(k.into(), v);
            }
            Value::Object(m)
        });
    let schedule = (
        prop::option::weighted(0.9, name().prop_map(Value::from)),
        prop::option::of(cron),
        prop::option::of(number()),
        prop::option::weighted(0.9, spec()),
        prop::option::weighted(0.1, (name(), json_value())),
    )
        .prop_map(|(n, cron, every, task, extra)| {
            let mut m = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            };
            put("name", n);
            put("cron", cron);
            put("every_ms", every);
            put("task", task);
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        });
    prop_oneof![
        6 => body_from(spec()).prop_map(move |b| post("POST /v1/tasks", "/v1/tasks".into(), b)),
        3 => body_from(batch)
            .prop_map(move |b| post("POST /v1/tasks/batch", "/v1/tasks/batch".into(), b)),
        2 => (segment(), body_from(limits)).prop_map(move |(n, b)| {
            post("POST /v1/queues/{name}", format!("/v1/queues/{n}"), b)
        }),
        2 => body_from(near_valid_schedule)
            .prop_map(move |b| post("POST /v1/schedules", "/v1/schedules".into(), b)),
        2 => body_from(schedule)
            .prop_map(move |b| post("POST /v1/schedules", "/v1/schedules".into(), b)),
        1 => Just(()).prop_map(move |()| post(
            "POST /v1/tasks (over max_body_bytes)",
            "/v1/tasks".into(),
            vec![b' '; 70 * 1024],
        )),
        3 => query().prop_map(|q| Call {
            endpoint: "GET /v1/tasks?query",
            method: "GET",
            uri: format!("/v1/tasks?{q}"),
            body: vec![],
        }),
        3 => prop::collection::vec(segment(), 1..5).prop_map(|s| Call {
            endpoint: "GET random path",
            method: "GET",
            uri: format!("/{}", s.join("/")),
            body: vec![],
        }),
    ]
}

// ----- drone message fuzz ------------------------------------------------------------------

/// Ids and fences of tasks that exist, so fuzzed messages hit real records as well as
/// unknown ones.
#[derive(Debug, Clone)]
pub struct Known {
    pub ids: Vec<TaskId>,
}

pub fn fence() -> impl Strategy<Value = Fence> {
    prop_oneof![
        2 => (0u64..4).prop_map(Fence),
        1 => Just(Fence(u64::MAX)),
        1 => any::<u64>().prop_map(Fence),
    ]
}

pub fn task_id(known: &Known) -> impl Strategy<Value = TaskId> {
    prop_oneof![
        1 => any::<u128>().prop_map(|n| TaskId(uuid::Uuid::from_u128(n))),
        2 => prop::sample::select(known.ids.clone()),
    ]
}

pub fn held(known: &Known) -> impl Strategy<Value = Held> {
    (task_id(known), fence()).prop_map(|(task_id, fence)| Held { task_id, fence })
}

/// Valid drone messages of every variant with random ids (known and unknown), random
/// fences (current and stale), huge strings and arbitrary JSON.
pub fn drone_message(known: &Known) -> impl Strategy<Value = DroneMessage> {
    let hello = (
        any::<u32>(),
        any::<u128>(),
        text(),
        prop::collection::vec(text(), 0..3),
        any::<u32>(),
        prop::collection::vec(prop_oneof![Just("echo".to_string()), text()], 0..3),
        prop::collection::vec(held(known), 0..3),
    )
        .prop_map(|(v, id, name, labels, slots, kinds, held)| {
            DroneMessage::Hello(Hello {
                protocol_version: v % 3,
                drone_id: DroneId(uuid::Uuid::from_u128(id)),
                name,
                labels,
                slots,
                kinds,
                token: None,
                held,
                draining: false,
                pongs: false,
                pools: Vec::new(),
                encodings: Vec::new(),
            })
        });
    let checkpoint =
        (task_id(known), fence(), json_value()).prop_map(|(task_id, fence, data)| Checkpoint {
            task_id,
            fence,
            data,
        });
    let heartbeat = (
        prop::collection::vec(held(known), 0..6),
        any::<u64>(),
        prop::collection::vec(checkpoint, 0..3),
    )
        .prop_map(|(held, assigns_seen, checkpoints)| {
            DroneMessage::Heartbeat(Heartbeat {
                held,
                assigns_seen,
                checkpoints,
                pools: Vec::new(),
            })
        });
    let complete = (task_id(known), fence(), json_value()).prop_map(|(task_id, fence, result)| {
        DroneMessage::TaskComplete(TaskComplete {
            task_id,
            fence,
            result,
        })
    });
    let failed = (
        task_id(known),
        fence(),
        text(),
        prop::option::of(json_value()),
        any::<bool>(),
    )
        .prop_map(|(task_id, fence, error, result, retryable)| {
            DroneMessage::TaskFailed(TaskFailed {
                task_id,
                fence,
                error,
                result,
                retryable,
            })
        });
    prop_oneof![
        1 => hello,
        3 => heartbeat,
        3 => complete,
        3 => failed,
        1 => Just(DroneMessage::Drain),
    ]
}

/// JSON objects shaped like messages: a known (or unknown) `type` and protocol field names
/// with values of any type.
pub fn message_shaped_json(known: &Known) -> impl Strategy<Value = Value> {
    const TYPES: &[&str] = &[
        "hello",
        "heartbeat",
        "task_complete",
        "task_failed",
        "drain",
        "welcome",
        "ack",
        "launch_missiles",
    ];
    const FIELDS: &[&str] = &[
        "drone_id",
        "slots",
        "kinds",
        "held",
        "assigns_seen",
        "checkpoints",
        "task_id",
        "fence",
        "result",
        "error",
        "retryable",
    ];
    let ids: Vec<Value> = known
        .ids
        .iter()
        .map(|i| Value::from(i.to_string()))
        .collect();
    let field_value = prop_oneof![json_value(), prop::sample::select(ids)];
    (
        prop::sample::select(TYPES),
        prop::collection::vec((prop::sample::select(FIELDS), field_value), 0..6),
    )
        .prop_map(|(ty, fields)| {
            let mut m = Map::new();
            m.insert("type".into(), Value::from(ty));
            for (k, v) in fields {
                m.insert(k.to_string(), v);
            }
            Value::Object(m)
        })
}

/// A frame body the fuzz drone sends: a valid message, one with bytes mutated, JSON shaped
/// like a message, or random bytes.
pub fn frame_body(known: &Known) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => drone_message(known).prop_map(|m| frame::encode(&m).expect("encode").to_vec()),
        3 => (drone_message(known), prop::collection::vec(mutation(), 1..4)).prop_map(|(m, mu)| {
            mutate(frame::encode(&m).expect("encode").to_vec(), &mu)
        }),
        2 => message_shaped_json(known).prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}
