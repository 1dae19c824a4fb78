//! API keys of the OpenAI API: `pdk_<id>_<secret>` (id: 8 hex digits, secret: 256 random bits
//! in hex). The replicated state holds only the SHA-256 of the whole key; an agent's API
//! checks `Authorization: Bearer <key>` against those hashes once the cluster has any key.

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a key, lowercase hex.
pub fn hash(key: &str) -> String {
    hex(digest(&SHA256, key.as_bytes()).as_ref())
}

/// A new key: (id, key, hash).
pub fn generate() -> Result<(String, String, String), String> {
    let rng = SystemRandom::new();
    let mut id = [0u8; 4];
    let mut secret = [0u8; 32];
    rng.fill(&mut id)
        .and_then(|_| rng.fill(&mut secret))
        .map_err(|_| "the system random source failed".to_string())?;
    let id = hex(&id);
    let key = format!("pdk_{id}_{}", hex(&secret));
    let h = hash(&key);
    Ok((id, key, h))
}

/// The key of an `Authorization` header value (`Bearer <key>`).
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, key) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hash_and_parse() {
        let (id, key, h) = generate().unwrap();
        assert_eq!(id.len(), 8);
        assert!(key.starts_with(&format!("pdk_{id}_")));
        assert_eq!(key.len(), 4 + 8 + 1 + 64);
        assert_eq!(hash(&key), h);
        assert_ne!(generate().unwrap().1, key);
        assert_eq!(bearer(&format!("Bearer {key}")), Some(key.as_str()));
        assert_eq!(bearer(&format!("bearer  {key} ")), Some(key.as_str()));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        // Known vector.
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
