//! API keys: generation, hashing and comparison.
//!
//! A key is shown once, when it is created; from then on only its SHA-256 is
//! kept. Keys are never logged: nothing in this module implements `Debug` or
//! `Display` for a plaintext key.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in a generated key: 192 bits, above the 128 required.
const KEY_BYTES: usize = 24;
const KEY_PREFIX: &str = "qw_";
/// How many characters of a key are kept to recognise it in lists.
const DISPLAY_PREFIX_CHARS: usize = 7;

/// A plaintext key, held only long enough to show it once.
pub struct PlainKey(String);

impl PlainKey {
    pub fn generate() -> Self {
        let bytes: [u8; KEY_BYTES] = rand::random();
        Self(format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }

    /// `qw_AbCd` and so on: enough to tell keys apart, useless for guessing.
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(DISPLAY_PREFIX_CHARS).collect()
    }
}

/// The SHA-256 of a key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    pub fn of(presented: &str) -> Self {
        Self(Sha256::digest(presented.as_bytes()).into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// Compares in constant time, so the time taken says nothing about how
    /// much of a guess was right.
    pub fn matches(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// A fresh identifier with a readable prefix, e.g. `key_3f9a…`.
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 8] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape_and_entropy() {
        let key = PlainKey::generate();
        assert!(key.expose().starts_with("qw_"));
        // 24 random bytes in unpadded base64 are 32 characters: 192 bits.
        assert_eq!(key.expose().len(), 3 + 32);
        assert_ne!(key.expose(), PlainKey::generate().expose());
        assert_eq!(key.display_prefix().len(), 7);
    }

    #[test]
    fn hashes_compare_and_round_trip() {
        let key = PlainKey::generate();
        let hash = key.hash();
        assert!(hash.matches(&KeyHash::of(key.expose())));
        assert!(!hash.matches(&KeyHash::of("qw_wrong")));
        assert_eq!(KeyHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(KeyHash::from_hex("zz"), None);
        assert_eq!(format!("{hash:?}"), "KeyHash(..)");
    }
}
