//! API keys: generation, hashing and comparison, and what a key may do
//! (its scopes).
//!
//! A key is shown once, when it is created; from then on only its SHA-256 is
//! kept. Keys are never logged: nothing in this module implements `Debug` or
//! `Display` for a plaintext key.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::limits::WorkspaceId;

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

/// One thing a workspace key may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// OpenAI calls through `/v1`, which spend money.
    Proxy,
    /// Checks and usage reports through the REST API, which change counters.
    Report,
    /// Status, notifications, history and the live connection.
    Read,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Proxy, Scope::Report, Scope::Read];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Proxy => "proxy",
            Scope::Report => "report",
            Scope::Read => "read",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Scope::Proxy => 1,
            Scope::Report => 2,
            Scope::Read => 4,
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == text)
            .ok_or_else(|| UnknownScope(text.chars().take(40).collect()))
    }
}

/// A scope name that is none of `proxy`, `report` and `read`.
#[derive(Debug, thiserror::Error)]
#[error("unknown scope {0:?}: the scopes are proxy, report and read")]
pub struct UnknownScope(pub String);

/// The scopes of a workspace key: a set of [`Scope`]s.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scopes(u8);

impl Scopes {
    /// What keys made before scopes existed can do, and what a service key
    /// can do for a workspace it names.
    pub const ALL: Scopes = Scopes(7);
    /// What a browser token can do.
    pub const READ: Scopes = Scopes(4);

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL
            .into_iter()
            .filter(move |scope| self.contains(*scope))
    }

    /// Reads `proxy,report,read` and the like, as stored.
    pub fn parse_list(text: &str) -> Result<Self, UnknownScope> {
        text.split(',')
            .filter(|part| !part.is_empty())
            .map(str::parse)
            .collect()
    }

    /// The stored form, e.g. `proxy,read`.
    pub fn to_list(self) -> String {
        self.iter().map(Scope::as_str).collect::<Vec<_>>().join(",")
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(scopes: I) -> Self {
        Scopes(scopes.into_iter().fold(0, |bits, scope| bits | scope.bit()))
    }
}

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scopes({})", self.to_list())
    }
}

/// Whom a key acts for, and what it may do there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyGrant {
    /// A key of one workspace, with its scopes.
    Workspace {
        workspace: WorkspaceId,
        scopes: Scopes,
    },
    /// A service key: acts for a workspace a request names (any, or one of
    /// a list), with every scope there.
    Service {
        workspaces: Option<Vec<WorkspaceId>>,
    },
}

impl KeyGrant {
    /// The workspace of a workspace key.
    pub fn workspace(&self) -> Option<&WorkspaceId> {
        match self {
            KeyGrant::Workspace { workspace, .. } => Some(workspace),
            KeyGrant::Service { .. } => None,
        }
    }

    /// Whether a service key may act for `workspace`.
    pub fn serves(&self, workspace: &WorkspaceId) -> bool {
        match self {
            KeyGrant::Service { workspaces: None } => true,
            KeyGrant::Service {
                workspaces: Some(list),
            } => list.contains(workspace),
            KeyGrant::Workspace { .. } => false,
        }
    }
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: &str) -> Self {
        Self(text.to_owned())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(********)")
    }
}

/// Where the environment variables that hold upstream keys are looked up
/// (workspaces name them in `upstream_key_env`). Shared by the proxy, which
/// reads keys, and the admin service, which refuses to let a workspace name
/// a variable that is not set; tests pass their own.
pub type EnvLookup = std::sync::Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Whether a service key serving `workspaces` (`None`: any) may act for
/// `workspace`.
pub fn serves(workspaces: Option<&[WorkspaceId]>, workspace: &WorkspaceId) -> bool {
    workspaces.is_none_or(|list| list.contains(workspace))
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
    fn scopes_read_and_write_their_stored_form() {
        let scopes = Scopes::parse_list("read,proxy").expect("valid");
        assert!(scopes.contains(Scope::Read) && scopes.contains(Scope::Proxy));
        assert!(!scopes.contains(Scope::Report));
        assert_eq!(scopes.to_list(), "proxy,read");
        assert_eq!(
            Scopes::parse_list("proxy,report,read").expect("valid"),
            Scopes::ALL
        );
        assert!(Scopes::parse_list("").expect("valid").is_empty());
        let error = Scopes::parse_list("read,admin").expect_err("unknown");
        assert_eq!(error.0, "admin");
        assert_eq!(Scopes::READ.to_list(), "read");
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
