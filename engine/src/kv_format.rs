//! The KV export/import byte format (documented in `engine/KV_FORMAT.md`): a fixed 48-byte
//! header, then per-layer pieces of raw little-endian f32 rows. Parsing never panics: bad bytes
//! are a [`KvFormatError`].

use serde::{Deserialize, Serialize};

/// Bytes of the encoded [`KvHeader`].
pub const KV_HEADER_BYTES: usize = 48;
/// Bytes of the header in front of each encoded [`KvPiece`].
pub const KV_PIECE_HEADER_BYTES: usize = 16;
const MAGIC: &[u8; 4] = b"PDKV";
const PIECE_MAGIC: &[u8; 4] = b"PDKL";
const FORMAT_VERSION: u16 = 1;
/// dtype code of little-endian IEEE-754 f32, the only dtype this engine produces.
pub const DTYPE_F32: u16 = 1;
/// dtype code of bfloat16 (engines that keep their KV in bf16, such as vLLM's default).
pub const DTYPE_BF16: u16 = 2;
/// dtype code of IEEE-754 binary16.
pub const DTYPE_F16: u16 = 3;

/// Bytes per element of a dtype code (`None`: not a dtype this format knows).
pub fn dtype_bytes(dtype: u16) -> Option<usize> {
    match dtype {
        DTYPE_F32 => Some(4),
        DTYPE_BF16 | DTYPE_F16 => Some(2),
        _ => None,
    }
}

/// The dtype code of a dtype's name (`float32`, `bfloat16`, `float16`, as torch names them).
pub fn dtype_code(name: &str) -> Option<u16> {
    match name.trim_start_matches("torch.") {
        "float32" | "float" => Some(DTYPE_F32),
        "bfloat16" => Some(DTYPE_BF16),
        "float16" | "half" => Some(DTYPE_F16),
        _ => None,
    }
}

/// What a decode engine checks before it accepts KV: everything that decides the meaning and
/// the shape of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGeometry {
    pub model_fingerprint: u64,
    pub dtype: u16,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub block_size_tokens: u32,
}

impl KvGeometry {
    /// Bytes per element of `dtype` (an unknown code counts 4; a header naming one is refused
    /// on read).
    pub fn bytes_per_element(&self) -> usize {
        dtype_bytes(self.dtype).unwrap_or(4)
    }

    /// Bytes of one token's K row (or V row) in one layer.
    pub fn row_bytes(&self) -> usize {
        self.kv_heads as usize * self.head_dim as usize * self.bytes_per_element()
    }

    /// Payload bytes of one layer for `tokens` tokens: K and V.
    pub fn layer_payload_bytes(&self, tokens: usize) -> usize {
        2 * self.row_bytes() * tokens
    }

    /// Payload bytes of all layers for `tokens` tokens (headers excluded):
    /// 2 × layers × kv_heads × head_dim × bytes_per_element × tokens.
    pub fn payload_bytes(&self, tokens: usize) -> usize {
        self.layers as usize * self.layer_payload_bytes(tokens)
    }

    /// Refuses `other` unless it describes the same model and layout.
    pub fn check_compatible(&self, other: &KvGeometry) -> Result<(), KvFormatError> {
        if other.model_fingerprint != self.model_fingerprint {
            return Err(KvFormatError::FingerprintMismatch {
                expected: self.model_fingerprint,
                got: other.model_fingerprint,
            });
        }
        let fields = [
            ("dtype", self.dtype as u64, other.dtype as u64),
            ("layers", self.layers as u64, other.layers as u64),
            ("kv_heads", self.kv_heads as u64, other.kv_heads as u64),
            ("head_dim", self.head_dim as u64, other.head_dim as u64),
            (
                "block_size_tokens",
                self.block_size_tokens as u64,
                other.block_size_tokens as u64,
            ),
        ];
        for (field, expected, got) in fields {
            if expected != got {
                return Err(KvFormatError::LayoutMismatch {
                    field,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }
}

/// The header in front of a request's KV: geometry plus the token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvHeader {
    pub geometry: KvGeometry,
    pub token_count: u32,
}

/// Why KV bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvFormatError {
    #[error("KV header is {got} bytes, expected {expected}")]
    ShortHeader { expected: usize, got: usize },
    #[error("KV bytes do not start with the magic {expected:?}; not pdagent KV")]
    BadMagic { expected: &'static str },
    #[error("KV format version {got} is not supported (this engine reads version {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error(
        "KV comes from another model (fingerprint {got:016x}, this engine runs {expected:016x}); pair prefill and decode engines of the same model"
    )]
    FingerprintMismatch { expected: u64, got: u64 },
    #[error("KV layout differs in {field}: this engine has {expected}, the KV has {got}")]
    LayoutMismatch {
        field: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("KV dtype code {dtype} is not one this format knows (1 f32, 2 bf16, 3 f16)")]
    UnknownDtype { dtype: u16 },
    #[error("KV piece for layer {layer} but the model has {layers} layers")]
    LayerOutOfRange { layer: u32, layers: u32 },
    #[error(
        "KV piece for layer {layer} starts at token {token_start}, expected {expected} (pieces of a layer arrive in token order without gaps)"
    )]
    OutOfOrder {
        layer: u32,
        token_start: u32,
        expected: u32,
    },
    #[error("KV piece covers tokens up to {end} but the request has {token_count}")]
    TooManyTokens { end: u64, token_count: u32 },
    #[error("KV payload is {got} bytes, expected {expected}")]
    PayloadSize { expected: usize, got: usize },
    #[error(
        "KV holds a non-finite value (NaN or infinity) at layer {layer}; the bytes are corrupt"
    )]
    NonFinite { layer: u32 },
}

impl KvHeader {
    /// Encodes the 48-byte header (layout in `KV_FORMAT.md`).
    pub fn to_bytes(&self) -> [u8; KV_HEADER_BYTES] {
        let g = &self.geometry;
        let mut b = [0u8; KV_HEADER_BYTES];
        b[0..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&g.dtype.to_le_bytes());
        b[8..16].copy_from_slice(&g.model_fingerprint.to_le_bytes());
        b[16..20].copy_from_slice(&g.layers.to_le_bytes());
        b[20..24].copy_from_slice(&g.kv_heads.to_le_bytes());
        b[24..28].copy_from_slice(&g.head_dim.to_le_bytes());
        b[28..32].copy_from_slice(&g.block_size_tokens.to_le_bytes());
        b[32..36].copy_from_slice(&self.token_count.to_le_bytes());
        // 36..40 reserved (0); 40..48 payload bytes, so a reader can size its buffers.
        let payload = g.payload_bytes(self.token_count as usize) as u64;
        b[40..48].copy_from_slice(&payload.to_le_bytes());
        b
    }

    /// Decodes a header, checking magic, version and the payload size field.
    pub fn from_bytes(b: &[u8]) -> Result<KvHeader, KvFormatError> {
        if b.len() < KV_HEADER_BYTES {
            return Err(KvFormatError::ShortHeader {
                expected: KV_HEADER_BYTES,
                got: b.len(),
            });
        }
        if &b[0..4] != MAGIC {
            return Err(KvFormatError::BadMagic { expected: "PDKV" });
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let version = u16_at(4);
        if version != FORMAT_VERSION {
            return Err(KvFormatError::UnsupportedVersion {
                got: version,
                supported: FORMAT_VERSION,
            });
        }
        let h = KvHeader {
            geometry: KvGeometry {
                dtype: u16_at(6),
                model_fingerprint: u64_at(8),
                layers: u32_at(16),
                kv_heads: u32_at(20),
                head_dim: u32_at(24),
                block_size_tokens: u32_at(28),
            },
            token_count: u32_at(32),
        };
        let Some(element) = dtype_bytes(h.geometry.dtype) else {
            return Err(KvFormatError::UnknownDtype {
                dtype: h.geometry.dtype,
            });
        };
        let declared = u64_at(40);
        let expected = (h.geometry.layers as u64)
            .saturating_mul(2)
            .saturating_mul(h.geometry.kv_heads as u64)
            .saturating_mul(h.geometry.head_dim as u64)
            .saturating_mul(element as u64)
            .saturating_mul(h.token_count as u64);
        if declared != expected {
            return Err(KvFormatError::PayloadSize {
                expected: expected as usize,
                got: declared as usize,
            });
        }
        Ok(h)
    }
}

/// One layer's K and V rows for tokens `token_start..token_start + token_count` of a request.
/// `data` is K rows then V rows, each [token_count, kv_heads, head_dim] little-endian f32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvPiece {
    pub layer: u32,
    pub token_start: u32,
    pub token_count: u32,
    #[serde(with = "serde_bytes_compat")]
    pub data: Vec<u8>,
}

impl KvPiece {
    pub(crate) fn from_rows(
        layer: usize,
        token_start: usize,
        k: &[f32],
        v: &[f32],
        row: usize,
    ) -> KvPiece {
        let mut data = Vec::with_capacity((k.len() + v.len()) * 4);
        for x in k.iter().chain(v.iter()) {
            data.extend_from_slice(&x.to_le_bytes());
        }
        KvPiece {
            layer: layer as u32,
            token_start: token_start as u32,
            token_count: (k.len() / row) as u32,
            data,
        }
    }

    /// The K and V floats of `data`, checked for size and finiteness.
    pub(crate) fn rows(&self, g: &KvGeometry) -> Result<(Vec<f32>, Vec<f32>), KvFormatError> {
        let expected = g.layer_payload_bytes(self.token_count as usize);
        if self.data.len() != expected {
            return Err(KvFormatError::PayloadSize {
                expected,
                got: self.data.len(),
            });
        }
        let floats: Vec<f32> = self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if floats.iter().any(|x| !x.is_finite()) {
            return Err(KvFormatError::NonFinite { layer: self.layer });
        }
        let half = floats.len() / 2;
        let mut k = floats;
        let v = k.split_off(half);
        Ok((k, v))
    }

    /// Encodes the piece: a 16-byte header (magic `PDKL`, layer, token_start, token_count as
    /// u32 LE) then `data`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(KV_PIECE_HEADER_BYTES + self.data.len());
        b.extend_from_slice(PIECE_MAGIC);
        b.extend_from_slice(&self.layer.to_le_bytes());
        b.extend_from_slice(&self.token_start.to_le_bytes());
        b.extend_from_slice(&self.token_count.to_le_bytes());
        b.extend_from_slice(&self.data);
        b
    }

    /// Decodes one piece from `b`, which must hold exactly one piece of geometry `g`.
    pub fn from_bytes(b: &[u8], g: &KvGeometry) -> Result<KvPiece, KvFormatError> {
        let (piece, used) = KvPiece::parse_prefix(b, g)?;
        if used != b.len() {
            return Err(KvFormatError::PayloadSize {
                expected: used,
                got: b.len(),
            });
        }
        Ok(piece)
    }

    /// Decodes the piece at the start of `b`; returns it and the bytes it used.
    pub fn parse_prefix(b: &[u8], g: &KvGeometry) -> Result<(KvPiece, usize), KvFormatError> {
        if b.len() < KV_PIECE_HEADER_BYTES {
            return Err(KvFormatError::ShortHeader {
                expected: KV_PIECE_HEADER_BYTES,
                got: b.len(),
            });
        }
        if &b[0..4] != PIECE_MAGIC {
            return Err(KvFormatError::BadMagic { expected: "PDKL" });
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (layer, token_start, token_count) = (u32_at(4), u32_at(8), u32_at(12));
        // Checked: the geometry and the count come from the wire.
        let len = (g.kv_heads as usize)
            .checked_mul(g.head_dim as usize)
            .and_then(|x| x.checked_mul(g.bytes_per_element()))
            .and_then(|x| x.checked_mul(2))
            .and_then(|x| x.checked_mul(token_count as usize))
            .unwrap_or(usize::MAX);
        let end = KV_PIECE_HEADER_BYTES.saturating_add(len);
        if b.len() < end {
            return Err(KvFormatError::PayloadSize {
                expected: len,
                got: b.len() - KV_PIECE_HEADER_BYTES,
            });
        }
        Ok((
            KvPiece {
                layer,
                token_start,
                token_count,
                data: b[KV_PIECE_HEADER_BYTES..end].to_vec(),
            },
            end,
        ))
    }
}

/// `Vec<u8>` as a serde byte string (one length + raw bytes in bincode) instead of a sequence
/// of integers, without another dependency.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom() -> KvGeometry {
        KvGeometry {
            model_fingerprint: 0x1234_5678_9abc_def0,
            dtype: DTYPE_F32,
            layers: 4,
            kv_heads: 2,
            head_dim: 32,
            block_size_tokens: 16,
        }
    }

    /// A geometry and a token count from the wire whose sizes overflow are refused, not a
    /// panic (regression: the multiplication wrapped and the slice bounds crossed).
    #[test]
    fn overflowing_sizes_are_refused() {
        let g = KvGeometry {
            kv_heads: 1,
            head_dim: u32::MAX / 2,
            ..geom()
        };
        let mut b = Vec::new();
        b.extend_from_slice(PIECE_MAGIC);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(u32::MAX / 2 + 2).to_le_bytes());
        b.extend_from_slice(&[0u8; 64]);
        assert!(KvPiece::parse_prefix(&b, &g).is_err());
    }

    #[test]
    fn header_round_trips_and_refuses_garbage() {
        let h = KvHeader {
            geometry: geom(),
            token_count: 37,
        };
        let b = h.to_bytes();
        assert_eq!(KvHeader::from_bytes(&b).unwrap(), h);
        assert!(matches!(
            KvHeader::from_bytes(&b[..20]),
            Err(KvFormatError::ShortHeader { .. })
        ));
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            KvHeader::from_bytes(&bad),
            Err(KvFormatError::BadMagic { .. })
        ));
        let mut bad = b;
        bad[32] ^= 1;
        assert!(matches!(
            KvHeader::from_bytes(&bad),
            Err(KvFormatError::PayloadSize { .. })
        ));
    }

    #[test]
    fn payload_bytes_formula() {
        // 2 × layers × kv_heads × head_dim × 4 bytes × tokens
        assert_eq!(geom().payload_bytes(10), 2 * 4 * 2 * 32 * 4 * 10);
    }

    #[test]
    fn compatibility_names_the_differing_field() {
        let mut other = geom();
        other.head_dim = 64;
        assert_eq!(
            geom().check_compatible(&other),
            Err(KvFormatError::LayoutMismatch {
                field: "head_dim",
                expected: 32,
                got: 64
            })
        );
        let mut other = geom();
        other.model_fingerprint = 1;
        assert!(matches!(
            geom().check_compatible(&other),
            Err(KvFormatError::FingerprintMismatch { .. })
        ));
    }

    #[test]
    fn piece_round_trips() {
        let g = geom();
        let row = 64;
        let k: Vec<f32> = (0..row * 3).map(|x| x as f32).collect();
        let v: Vec<f32> = (0..row * 3).map(|x| -(x as f32)).collect();
        let p = KvPiece::from_rows(2, 5, &k, &v, row);
        assert_eq!(p.token_count, 3);
        let b = p.to_bytes();
        let q = KvPiece::from_bytes(&b, &g).unwrap();
        assert_eq!(q, p);
        assert_eq!(q.rows(&g).unwrap(), (k, v));
        assert!(KvPiece::from_bytes(&b[..b.len() - 1], &g).is_err());
    }
}
