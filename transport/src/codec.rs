//! The one place that knows how messages become bytes.
//!
//! Every typed message that crosses the wire is encoded with bincode 2.0.1 (serde mode, the
//! standard configuration: little endian, variable-length integers) behind these functions, so
//! the format can be swapped in one file. Framing is a 4-byte little-endian length followed by
//! that many payload bytes; a frame longer than the limit is refused before its payload is read.
//! Bulk data (the KV cache) never passes through here: it travels as raw bytes after a small
//! header (see `bulk`).

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The default bound on one encoded message, in bytes.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;

/// Bytes of the length prefix in front of every frame.
pub const FRAME_HEADER_BYTES: usize = 4;

/// What can go wrong turning bytes into messages and back.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message has {0} trailing bytes after its end")]
    TrailingBytes(usize),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("i/o error on stream: {0}")]
    Io(#[from] std::io::Error),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a message into a fresh buffer.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(msg, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes exactly one message from `bytes`. Never panics on any input: garbage gives
/// `Malformed`, extra bytes give `TrailingBytes`. Allocation while decoding is bounded by
/// `max` (bincode refuses collection lengths that would exceed it).
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, CodecError> {
    if bytes.len() > max {
        return Err(CodecError::FrameTooLarge {
            len: bytes.len(),
            max,
        });
    }
    let cfg = config().with_limit::<{ FRAME_BYTES_MAX_DEFAULT * 4 }>();
    let (msg, used): (T, usize) = bincode::serde::decode_from_slice(bytes, cfg)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - used));
    }
    Ok(msg)
}

/// Encodes `msg` as one length-prefixed frame.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, CodecError> {
    let body = encode(msg)?;
    if body.len() > max {
        return Err(CodecError::FrameTooLarge {
            len: body.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
    max: usize,
) -> Result<(), CodecError> {
    let frame = encode_frame(msg, max)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame's payload, refusing a length above `max` before reading the payload.
pub async fn read_frame_bytes<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, CodecError> {
    let mut len = [0u8; FRAME_HEADER_BYTES];
    read_exact(r, &mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    read_exact(r, &mut body).await?;
    Ok(body)
}

/// Reads and decodes one frame.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<T, CodecError> {
    let body = read_frame_bytes(r, max).await?;
    decode(&body, max)
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), CodecError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CodecError::Truncated),
        Err(e) => Err(CodecError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping {
            nonce: u64,
        },
        Blob {
            name: String,
            data: Vec<u8>,
            tags: Vec<(String, u32)>,
        },
        Empty,
    }

    #[test]
    fn round_trip() {
        let m = Msg::Blob {
            name: "x".into(),
            data: vec![1, 2, 3],
            tags: vec![("a".into(), 7)],
        };
        let b = encode(&m).unwrap();
        assert_eq!(decode::<Msg>(&b, 1024).unwrap(), m);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut b = encode(&Msg::Ping { nonce: 3 }).unwrap();
        b.push(0);
        assert!(matches!(
            decode::<Msg>(&b, 1024),
            Err(CodecError::TrailingBytes(1))
        ));
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_payload() {
        // A header that claims 1 GiB, followed by nothing: must fail on the length, not wait.
        let bytes = (1u32 << 30).to_le_bytes();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt
            .block_on(read_frame_bytes(&mut &bytes[..], 1024))
            .unwrap_err();
        assert!(matches!(
            err,
            CodecError::FrameTooLarge {
                len: 1073741824,
                max: 1024
            }
        ));
    }

    #[test]
    fn huge_length_inside_message_does_not_allocate_unbounded() {
        // Variant 1 (Blob), then a string length of 2^62: must be an error, not an abort.
        let bytes = [1u8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x40];
        assert!(decode::<Msg>(&bytes, 1024).is_err());
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let f = encode_frame(&Msg::Ping { nonce: 1 }, 1024).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let cut = &f[..f.len() - 1];
        let err = rt
            .block_on(read_frame::<_, Msg>(&mut &cut[..], 1024))
            .unwrap_err();
        assert!(matches!(err, CodecError::Truncated));
    }

    proptest! {
        /// The decoder never panics on arbitrary bytes.
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Msg>(&bytes, 4096);
        }

        /// Framing round-trips every message and mutated frames never panic.
        #[test]
        fn frames_round_trip_and_mutations_are_safe(
            nonce in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..256),
            flip in any::<usize>(),
        ) {
            let m = Msg::Blob { name: format!("n{nonce}"), data, tags: vec![] };
            let f = encode_frame(&m, 4096).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let back: Msg = rt.block_on(read_frame(&mut &f[..], 4096)).unwrap();
            prop_assert_eq!(back, m);
            let mut g = f.clone();
            let i = flip % g.len();
            g[i] ^= 0x5a;
            let _ = rt.block_on(read_frame::<_, Msg>(&mut &g[..], 4096));
        }
    }
}
