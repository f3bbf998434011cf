//! Property fuzzing of the drone protocol's framing (G7 in docs/GUARANTEES.md: a malformed,
//! oversized or unknown message gets an error, never a panic). Random byte strings, random
//! JSON shaped like messages, and valid frames of every `DroneMessage` variant with bits
//! flipped, bytes inserted or deleted, lengths rewritten or cut short are fed — in random
//! chunk sizes, as a socket delivers them — to the length-delimited codec both sides use
//! and to `frame::decode`. Valid frames must round-trip; an oversized length prefix must be
//! an error; nothing may panic.
//!
//! Each property runs `HIVE_FUZZ_CASES` cases (default 10,000). A failure prints the shrunk
//! input; `PROPTEST_RNG_SEED=<n>` replays a run.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value};
use shared::frame::{self, Encoding, FrameError};
use shared::protocol::{
    Checkpoint, DroneMessage, Heartbeat, Held, Hello, QueenMessage, TaskComplete, TaskFailed,
};
use shared::{DroneId, Fence, TaskId};
use tokio_util::codec::{Decoder, Encoder};

/// Cases per property unless `HIVE_FUZZ_CASES` says otherwise.
const DEFAULT_CASES: u32 = 10_000;

fn config() -> Config {
    let cases = std::env::var("HIVE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    Config {
        // A failure is reported with its shrunk input and seed; no files are written into
        // the source tree.
        failure_persistence: None,
        max_shrink_time: 60_000,
        ..Config::with_cases(cases)
    }
}

fn run<S: Strategy>(
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> Result<(), String>
where
    S::Value: std::fmt::Debug,
{
    TestRunner::new(config())
        .run(&strategy, test)
        .map_err(|e| e.to_string())
}

/// Any JSON value, nested a few levels. Floats are multiples of 1/8 so they print and
/// parse back exactly.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i32>().prop_map(|n| Value::from(f64::from(n) / 8.0)),
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

fn task_id() -> impl Strategy<Value = TaskId> {
    any::<u128>().prop_map(|n| TaskId(uuid::Uuid::from_u128(n)))
}

fn fence() -> impl Strategy<Value = Fence> {
    prop_oneof![
        Just(Fence(0)),
        Just(Fence(u64::MAX)),
        any::<u64>().prop_map(Fence)
    ]
}

fn held() -> impl Strategy<Value = Held> {
    (task_id(), fence()).prop_map(|(task_id, fence)| Held { task_id, fence })
}

/// Mostly short strings, now and then a long (up to 4 KiB) one.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => any::<String>(),
        1 => (any::<char>(), 0usize..4096).prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
}

/// Read sizes: mostly what a socket delivers, sometimes a byte or a few at a time.
fn chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..16, 16usize..8192], 1..4)
}

/// Every drone message variant with arbitrary field values. `result: Some(null)` is left
/// out: it serializes as `null`, which is `None` on the way back by design.
fn drone_message() -> impl Strategy<Value = DroneMessage> {
    let hello = (
        (
            any::<u32>(),
            any::<u128>(),
            text(),
            prop::collection::vec(text(), 0..4),
        ),
        (
            any::<u32>(),
            prop::collection::vec(text(), 0..4),
            prop::option::of(text()),
            prop::collection::vec(held(), 0..4),
            any::<bool>(),
        ),
    )
        .prop_map(
            |((protocol_version, id, name, labels), (slots, kinds, token, held, draining))| {
                DroneMessage::Hello(Hello {
                    protocol_version,
                    drone_id: DroneId(uuid::Uuid::from_u128(id)),
                    name,
                    labels,
                    slots,
                    kinds,
                    token: token.map(shared::ids::Secret),
                    held,
                    draining,
                    pongs: !draining,
                    pools: Vec::new(),
                    encodings: Vec::new(),
                })
            },
        );
    let checkpoint = (task_id(), fence(), json()).prop_map(|(task_id, fence, data)| Checkpoint {
        task_id,
        fence,
        data,
    });
    let heartbeat = (
        prop::collection::vec(held(), 0..8),
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
    let complete = (task_id(), fence(), json()).prop_map(|(task_id, fence, result)| {
        DroneMessage::TaskComplete(TaskComplete {
            task_id,
            fence,
            result,
        })
    });
    let failed = (
        task_id(),
        fence(),
        text(),
        prop::option::of(json().prop_filter("null is None", |v| !v.is_null())),
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
        hello,
        heartbeat,
        complete,
        failed,
        Just(DroneMessage::Drain)
    ]
}

/// A JSON object that looks like a message: a known (or unknown) `type` and a random
/// subset of the protocol's field names with values of any type.
fn message_shaped_json() -> impl Strategy<Value = Value> {
    const TYPES: &[&str] = &[
        "hello",
        "heartbeat",
        "task_complete",
        "task_failed",
        "drain",
        "welcome",
        "assign",
        "ack",
        "error",
        "launch_missiles",
        "",
    ];
    const FIELDS: &[&str] = &[
        "protocol_version",
        "drone_id",
        "name",
        "labels",
        "slots",
        "kinds",
        "token",
        "held",
        "draining",
        "assigns_seen",
        "checkpoints",
        "task_id",
        "fence",
        "result",
        "error",
        "retryable",
        "message",
        "type",
    ];
    (
        prop::sample::select(TYPES),
        prop::collection::vec((prop::sample::select(FIELDS), json()), 0..8),
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

/// One frame as it travels: the 4-byte big-endian length, then the body.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut codec = frame::codec(usize::MAX >> 1);
    let mut buf = BytesMut::new();
    codec
        .encode(bytes::Bytes::copy_from_slice(body), &mut buf)
        .expect("encoding into memory cannot fail");
    buf.to_vec()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Overwrite(Index, u8),
    Truncate(Index),
    /// Rewrites the length prefix: a lie about the body's size, often a huge one.
    SetLen(u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        any::<u32>().prop_map(Mutation::SetLen),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            bytes.push(0);
        }
        let n = bytes.len();
        match m {
            Mutation::Flip(i, bit) => bytes[i.index(n)] ^= 1 << bit,
            Mutation::Insert(i, b) => bytes.insert(i.index(n + 1), *b),
            Mutation::Delete(i) => {
                bytes.remove(i.index(n));
            }
            Mutation::Overwrite(i, b) => bytes[i.index(n)] = *b,
            Mutation::Truncate(i) => bytes.truncate(i.index(n)),
            Mutation::SetLen(len) => {
                if n >= 4 {
                    bytes[..4].copy_from_slice(&len.to_be_bytes());
                }
            }
        }
    }
    bytes
}

/// What a stream of bytes decoded to.
#[derive(Debug, Default)]
struct Fed {
    frames: Vec<bytes::BytesMut>,
    error: bool,
}

/// Feeds `input` to a fresh codec in chunks of the given sizes (cycled), the way reads
/// from a socket arrive, then signals end of stream. Stops at the first error, as the
/// queen closes the connection there.
fn feed(max: usize, input: &[u8], chunks: &[usize]) -> Fed {
    let mut codec = frame::codec(max);
    let mut buf = BytesMut::new();
    let mut out = Fed::default();
    let mut rest = input;
    let mut sizes = chunks.iter().copied().cycle();
    loop {
        let take = sizes.next().unwrap_or(usize::MAX).max(1).min(rest.len());
        buf.put_slice(&rest[..take]);
        rest = &rest[take..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => out.frames.push(f),
                Ok(None) => break,
                Err(_) => {
                    out.error = true;
                    return out;
                }
            }
        }
        if rest.is_empty() {
            break;
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => out.frames.push(f),
            Ok(None) => break,
            Err(_) => {
                out.error = true;
                break;
            }
        }
    }
    out
}

/// What both peers do with a frame body: decode it as their message type. Must not panic;
/// whatever decodes must encode again and decode to an equal message.
fn decode_both(body: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(msg) = frame::decode::<DroneMessage>(body) {
        let again = frame::encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = frame::decode::<DroneMessage>(&again)
            .map_err(|e| TestCaseError::fail(format!("{msg:?} does not decode again: {e}")))?;
        prop_assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(&msg));
    }
    if let Ok(msg) = frame::decode::<QueenMessage>(body) {
        frame::encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    // The same bytes read as MessagePack (a connection that negotiated it).
    let binary = Encoding::MessagePack;
    if let Ok(msg) = binary.decode::<DroneMessage>(body) {
        let again = binary
            .encode(&msg)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = binary
            .decode::<DroneMessage>(&again)
            .map_err(|e| TestCaseError::fail(format!("{msg:?} does not decode again: {e}")))?;
        prop_assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(&msg));
    }
    if let Ok(msg) = binary.decode::<QueenMessage>(body) {
        binary
            .encode(&msg)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    Ok(())
}

/// `msg` through MessagePack and back is `msg`.
fn msgpack_round_trip<T>(msg: T) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let body = Encoding::MessagePack
        .encode(&msg)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back = Encoding::MessagePack
        .decode::<T>(&body)
        .map_err(|e| TestCaseError::fail(format!("{msg:?}: {e}")))?;
    prop_assert_eq!(&back, &msg);
    Ok(())
}

/// Guards the negotiated binary encoding: every variant, payloads of any JSON shape
/// included (floats, nesting, unicode), decodes from MessagePack to exactly the message
/// that went in, and the queen's messages do too.
#[test]
fn every_variant_round_trips_through_msgpack() {
    run(drone_message(), msgpack_round_trip).unwrap_or_else(|e| panic!("{e}"));
    let queen = (task_id(), fence(), json(), prop::option::of(json())).prop_map(
        |(task_id, fence, payload, checkpoint)| {
            // `Some(null)` is `None` on the wire in either encoding (and means the same).
            let checkpoint = checkpoint.filter(|c| !c.is_null());
            QueenMessage::Assign(shared::protocol::Assign {
                task_id,
                fence,
                attempt: 2,
                kind: "exec".into(),
                queue: "default".into(),
                payload,
                timeout_ms: Some(1000),
                checkpoint,
            })
        },
    );
    run(queen, msgpack_round_trip).unwrap_or_else(|e| panic!("{e}"));
}

/// Guards the happy path under any chunking: valid frames of every variant, several in a
/// row, come out of the codec whole and decode to the messages that went in.
#[test]
fn valid_frames_of_every_variant_round_trip_in_any_chunking() {
    let strategy = (prop::collection::vec(drone_message(), 1..4), chunks());
    run(strategy, |(msgs, chunks)| {
        let mut stream = Vec::new();
        for m in &msgs {
            let body = frame::encode(m).map_err(|e| TestCaseError::fail(e.to_string()))?;
            stream.extend_from_slice(&framed(&body));
        }
        let fed = feed(frame::DEFAULT_MAX_FRAME_LEN, &stream, &chunks);
        prop_assert!(!fed.error, "valid frames refused");
        prop_assert_eq!(fed.frames.len(), msgs.len());
        for (f, m) in fed.frames.iter().zip(&msgs) {
            let got = frame::decode::<DroneMessage>(f)
                .map_err(|e| TestCaseError::fail(format!("{m:?}: {e}")))?;
            prop_assert_eq!(&got, m);
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Guards G7 against garbage: random bytes, random JSON and message-shaped JSON with
/// wrong types, fed to the codec and the decoder, never panic; every frame that comes out
/// respects the limit.
#[test]
fn random_bytes_and_json_never_panic_the_codec_or_the_decoder() {
    let input = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        json().prop_map(|v| framed(v.to_string().as_bytes())),
        message_shaped_json().prop_map(|v| framed(v.to_string().as_bytes())),
        message_shaped_json().prop_map(|v| v.to_string().into_bytes()),
    ];
    let strategy = (input, 64usize..4096, chunks());
    run(strategy, |(bytes, max, chunks)| {
        // The body alone, as if a frame carried it.
        decode_both(&bytes)?;
        let fed = feed(max, &bytes, &chunks);
        for f in &fed.frames {
            prop_assert!(
                f.len() <= max,
                "a {} byte frame passed a {max} limit",
                f.len()
            );
            decode_both(f)?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Guards G7 against near misses: valid frames of every variant with flipped bits,
/// inserted, deleted or overwritten bytes, a cut-off tail or a lying length prefix. The
/// codec and decoder never panic; a frame that still decodes is a well-formed message.
#[test]
fn mutated_valid_frames_never_panic_the_codec_or_the_decoder() {
    let strategy = (
        drone_message(),
        prop::collection::vec(mutation(), 1..5),
        1024usize..(1 << 16),
        chunks(),
    );
    run(strategy, |(msg, mutations, max, chunks)| {
        let body = frame::encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bytes = mutate(framed(&body), &mutations);
        decode_both(bytes.get(4..).unwrap_or_default())?;
        let fed = feed(max, &bytes, &chunks);
        for f in &fed.frames {
            prop_assert!(f.len() <= max);
            decode_both(f)?;
        }
        if bytes.len() >= 4 {
            let claimed = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            if claimed > max {
                prop_assert!(fed.error, "a {claimed} byte length passed a {max} limit");
                prop_assert!(fed.frames.is_empty());
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Guards the hostile length prefix: any length over the limit is an error from the
/// prefix alone, before the body arrives (so a peer cannot make the queen buffer it);
/// any length within it yields exactly that frame once the body is there.
#[test]
fn a_length_prefix_over_the_limit_is_an_error_and_within_it_a_frame() {
    let strategy = (
        16usize..8192,
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..64),
    );
    run(strategy, |(max, len, tail)| {
        let mut codec = frame::codec(max);
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        buf.put_slice(&tail);
        let len = len as usize;
        if len > max {
            prop_assert!(codec.decode(&mut buf).is_err(), "{len} > {max} accepted");
        } else {
            let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = BytesMut::new();
            buf.put_u32(len as u32);
            buf.put_slice(&body);
            buf.put_slice(&tail);
            let f = codec
                .decode(&mut buf)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(f.as_deref(), Some(&body[..]));
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Guards the decoder's stack: a frame of deeply nested arrays or objects (well within the
/// frame limit) is a malformed-message error, not a stack overflow that would abort the
/// whole queen.
#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    for depth in [200, 10_000, 500_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let mut body = String::from(
                r#"{"type":"task_complete","task_id":"01960000-0000-7000-8000-000000000000","fence":1,"result":"#,
            );
            body.push_str(&open.repeat(depth));
            body.push('1');
            body.push_str(&close.repeat(depth));
            body.push('}');
            assert!(body.len() < frame::DEFAULT_MAX_FRAME_LEN * 8);
            assert!(
                matches!(
                    frame::decode::<DroneMessage>(body.as_bytes()),
                    Err(FrameError::Malformed(_))
                ),
                "nesting {depth} deep with {open} must be refused"
            );
            assert!(frame::decode::<QueenMessage>(body.as_bytes()).is_err());
        }
    }
}
