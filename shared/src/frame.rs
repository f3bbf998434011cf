//! Framing: a 4-byte big-endian length, then one JSON object. Pure apart from the codec
//! constructor, so both sides (and tests) encode and decode the same way.

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
    fn garbage_is_a_malformed_error() {
        assert!(matches!(
            decode::<DroneMessage>(b"\xff\x00not json"),
            Err(FrameError::Malformed(_))
        ));
    }
}
