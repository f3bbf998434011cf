//! Framing: a 4-byte big-endian length, then one message. Pure apart from the codec
//! constructor, so both sides (and tests) encode and decode the same way.
//!
//! A message is a JSON object unless the drone offered another [`Encoding`] in its hello
//! and the queen chose it in the welcome; from then on both directions of that
//! connection use it. The hello and the welcome are always JSON.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::LengthDelimitedCodec;

/// The default largest frame either side accepts: 1 MiB fits any sane payload or result
/// (results are capped well below it) while a hostile length prefix cannot make a peer
/// allocate gigabytes.
pub const DEFAULT_MAX_FRAME_LEN: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("could not encode message: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("malformed MessagePack message: {0}")]
    MalformedBinary(#[source] rmp_serde::decode::Error),
    #[error("could not encode message as MessagePack: {0}")]
    EncodeBinary(#[source] rmp_serde::encode::Error),
}

/// The deepest nesting a MessagePack frame may have, serde_json's own limit for JSON.
const MAX_DEPTH: usize = 128;

/// How the messages of a connection are written after the handshake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// JSON objects: the default, what every drone and queen speaks.
    #[default]
    Json,
    /// MessagePack maps with the same field names as the JSON (so optional and unknown
    /// fields behave exactly as in JSON), named `msgpack` in the hello and welcome.
    MessagePack,
}

impl Encoding {
    /// The name in a hello's `encodings` and a welcome's `encoding`.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::MessagePack => "msgpack",
        }
    }

    /// The encoding a name stands for; `None` for one this build does not know.
    pub fn from_name(name: &str) -> Option<Encoding> {
        match name {
            "json" => Some(Encoding::Json),
            "msgpack" => Some(Encoding::MessagePack),
            _ => None,
        }
    }

    /// The first of `offered` this side speaks and `allowed`, JSON when there is none.
    pub fn choose(offered: &[String], allowed: &[Encoding]) -> Encoding {
        offered
            .iter()
            .filter_map(|name| Encoding::from_name(name))
            .find(|e| allowed.contains(e))
            .unwrap_or_default()
    }

    pub fn encode<T: Serialize>(self, msg: &T) -> Result<Bytes, FrameError> {
        match self {
            Encoding::Json => encode(msg),
            Encoding::MessagePack => rmp_serde::to_vec_named(msg)
                .map(Bytes::from)
                .map_err(FrameError::EncodeBinary),
        }
    }

    pub fn decode<T: DeserializeOwned>(self, frame: &[u8]) -> Result<T, FrameError> {
        match self {
            Encoding::Json => decode(frame),
            Encoding::MessagePack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(frame);
                // As serde_json's limit: a hostile peer's deep nesting is an error, not a
                // stack overflow (rmp-serde's own default, 1024, overflows a 2 MiB stack).
                de.set_max_depth(MAX_DEPTH);
                T::deserialize(&mut de).map_err(FrameError::MalformedBinary)
            }
        }
    }
}

/// The codec both sides use, refusing frames longer than `max_frame_len`.
pub fn codec(max_frame_len: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame_len)
        .new_codec()
}

/// Encodes one message as a frame body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    serde_json::to_vec(msg)
        .map(Bytes::from)
        .map_err(FrameError::Encode)
}

/// Decodes one frame body. Unknown message types and missing fields are errors that name
/// what was wrong.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(frame).map_err(FrameError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DroneMessage;
    use bytes::{BufMut, BytesMut};
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn a_frame_round_trips_through_the_codec() {
        let mut codec = codec(64);
        let mut buf = BytesMut::new();
        let body = encode(&DroneMessage::Drain).unwrap_or_default();
        assert!(codec.encode(body.clone(), &mut buf).is_ok());
        assert_eq!(&buf[..4], &(body.len() as u32).to_be_bytes());
        let got = codec.decode(&mut buf).ok().flatten().unwrap_or_default();
        assert!(matches!(
            decode::<DroneMessage>(&got),
            Ok(DroneMessage::Drain)
        ));
    }

    #[test]
    fn an_oversized_length_prefix_is_refused_before_reading_the_body() {
        let mut codec = codec(64);
        let mut buf = BytesMut::new();
        buf.put_u32(1 << 30);
        assert!(codec.decode(&mut buf).is_err());
    }

    #[test]
    fn the_first_offered_encoding_this_side_allows_is_chosen_else_json() {
        let offer = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let both = [Encoding::MessagePack];
        assert_eq!(
            Encoding::choose(&offer(&["cbor", "msgpack"]), &both),
            Encoding::MessagePack
        );
        assert_eq!(Encoding::choose(&offer(&["cbor"]), &both), Encoding::Json);
        assert_eq!(Encoding::choose(&offer(&[]), &both), Encoding::Json);
        assert_eq!(Encoding::choose(&offer(&["msgpack"]), &[]), Encoding::Json);
        for e in [Encoding::Json, Encoding::MessagePack] {
            assert_eq!(Encoding::from_name(e.name()), Some(e));
        }
    }

    #[test]
    fn msgpack_is_smaller_than_json_for_an_assign_and_garbage_is_an_error() {
        let assign = crate::protocol::QueenMessage::Assign(crate::protocol::Assign {
            task_id: crate::TaskId::generate(),
            fence: crate::Fence(7),
            attempt: 1,
            kind: "echo".into(),
            queue: "default".into(),
            payload: serde_json::json!({"n": 1}),
            timeout_ms: None,
            checkpoint: None,
        });
        let json = Encoding::Json.encode(&assign).unwrap_or_default();
        let binary = Encoding::MessagePack.encode(&assign).unwrap_or_default();
        assert!(
            !binary.is_empty() && binary.len() < json.len(),
            "{} vs {}",
            binary.len(),
            json.len()
        );
        assert!(matches!(
            Encoding::MessagePack.decode::<DroneMessage>(b"\xc1garbage"),
            Err(FrameError::MalformedBinary(_))
        ));
        // A hostile peer's deep nesting is an error, not a stack overflow: a map with a
        // `type` whose value nests 100,000 one-element arrays.
        let mut deep = b"\x81\xa4type".to_vec();
        deep.extend_from_slice(&[0x91; 100_000]);
        deep.push(0xc0);
        assert!(Encoding::MessagePack.decode::<DroneMessage>(&deep).is_err());
        let mut deep_value = b"\x82\xa4type\xa9heartbeat\xa4held".to_vec();
        deep_value.extend_from_slice(&[0x91; 100_000]);
        deep_value.push(0xc0);
        assert!(Encoding::MessagePack
            .decode::<DroneMessage>(&deep_value)
            .is_err());
    }

    #[test]
    fn garbage_is_a_malformed_error() {
        assert!(matches!(
            decode::<DroneMessage>(b"\xff\x00not json"),
            Err(FrameError::Malformed(_))
        ));
    }
}
