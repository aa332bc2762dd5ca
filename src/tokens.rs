//! Browser tokens: short-lived, read-only credentials for one workspace.
//!
//! A backend holding a service key (or the admin key) mints one for a
//! tenant's browser session, so that the page can follow its workspace's
//! status without holding a key that could spend money or report usage.
//! A token is self-contained and signed with HMAC-SHA256 under a secret that
//! every instance reads from the database, so any instance can check one
//! without a lookup. It names the key that minted it: once that key is
//! revoked (or the admin key changes), its tokens stop working.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::domain::limits::WorkspaceId;
use crate::domain::time::Timestamp;
use crate::keys::KeyHash;

/// What every token starts with, so that a token is told from a key
/// before anything else is done with it.
pub const TOKEN_PREFIX: &str = "qwt_";

/// Longer presented strings are not tokens; nothing longer is decoded.
const MAX_TOKEN_CHARS: usize = 512;

const SECRET_BYTES: usize = 32;

/// The signing secret shared by every instance of one installation.
pub struct TokenSecret([u8; SECRET_BYTES]);

/// Who minted a token, checked again whenever the token is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Minter {
    /// The admin key, named by the start of its hash: a new admin key ends
    /// the tokens the old one minted.
    Admin(String),
    /// A service key, by its id.
    Key(String),
}

impl Minter {
    /// How the admin key with this hash is named in the tokens it mints.
    pub fn admin(hash: KeyHash) -> Self {
        Minter::Admin(hash.to_hex()[..16].to_owned())
    }
}

/// What a token says: for which workspace, minted by whom, until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub workspace: WorkspaceId,
    pub minter: Minter,
    pub expires_at: Timestamp,
}

impl TokenSecret {
    pub fn generate() -> Self {
        Self(rand::random())
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; SECRET_BYTES];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length")
    }

    /// The token for `claims`: the prefix, the claims and their signature.
    pub fn mint(&self, claims: &TokenClaims) -> String {
        let minter = match &claims.minter {
            Minter::Admin(fingerprint) => format!("admin:{fingerprint}"),
            Minter::Key(id) => format!("key:{id}"),
        };
        let payload = format!(
            "v1\n{}\n{minter}\n{}",
            claims.workspace.as_str(),
            claims.expires_at.millis()
        );
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let signature = mac.finalize().into_bytes();
        format!(
            "{TOKEN_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// The claims of a token this installation signed, whether or not it
    /// has expired; `None` for anything else. The signature is compared in
    /// constant time.
    pub fn verify(&self, token: &str) -> Option<TokenClaims> {
        if token.len() > MAX_TOKEN_CHARS {
            return None;
        }
        let (payload, signature) = token.strip_prefix(TOKEN_PREFIX)?.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&signature).ok()?;
        let payload = String::from_utf8(payload).ok()?;
        let mut fields = payload.split('\n');
        let (Some("v1"), Some(workspace), Some(minter), Some(expires_at), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return None;
        };
        let minter = match minter.split_once(':')? {
            ("admin", fingerprint) => Minter::Admin(fingerprint.to_owned()),
            ("key", id) => Minter::Key(id.to_owned()),
            _ => return None,
        };
        Some(TokenClaims {
            workspace: workspace.parse().ok()?,
            minter,
            expires_at: Timestamp::from_millis(expires_at.parse().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            workspace: "acme".parse().expect("valid id"),
            minter: Minter::Key("key_0123456789abcdef".into()),
            expires_at: Timestamp::from_millis(1_800_000_000_000),
        }
    }

    #[test]
    fn a_minted_token_verifies_to_its_claims() {
        let secret = TokenSecret::generate();
        let token = secret.mint(&claims());
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(secret.verify(&token), Some(claims()));
        let admin = TokenClaims {
            minter: Minter::admin(KeyHash::of("qw_admin")),
            ..claims()
        };
        assert_eq!(secret.verify(&secret.mint(&admin)), Some(admin));
    }

    #[test]
    fn another_secret_or_any_change_breaks_the_signature() {
        let secret = TokenSecret::generate();
        let token = secret.mint(&claims());
        assert_eq!(TokenSecret::generate().verify(&token), None);
        // Changing any one character of the claims or the signature.
        for at in TOKEN_PREFIX.len()..token.len() {
            let mut changed = token.clone().into_bytes();
            changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(changed).expect("ascii");
            if changed != token {
                assert_eq!(secret.verify(&changed), None, "changed at {at}");
            }
        }
        // Another workspace's claims under this token's signature.
        let (_, signature) = token.split_once('.').expect("two parts");
        let other = secret.mint(&TokenClaims {
            workspace: "globex".parse().expect("valid id"),
            ..claims()
        });
        let (other_payload, _) = other.split_once('.').expect("two parts");
        assert_eq!(secret.verify(&format!("{other_payload}.{signature}")), None);
    }

    #[test]
    fn keys_and_garbage_are_not_tokens() {
        let secret = TokenSecret::generate();
        for presented in ["qw_abc", "qwt_", "qwt_.", "qwt_abc.def", "", "qwt_a.b.c"] {
            assert_eq!(secret.verify(presented), None, "{presented}");
        }
        let long = format!("{}{}", secret.mint(&claims()), "A".repeat(600));
        assert_eq!(secret.verify(&long), None);
    }

    #[test]
    fn the_secret_round_trips_through_its_stored_form() {
        let secret = TokenSecret::generate();
        let again = TokenSecret::from_hex(&secret.to_hex()).expect("valid hex");
        assert_eq!(again.verify(&secret.mint(&claims())), Some(claims()));
        assert!(TokenSecret::from_hex("abc").is_none());
    }
}
