//! The keyring: which keys and browser tokens authenticate, as whom, until
//! when, and when each key was last used.
//!
//! Everything here is in memory and answers without IO; a key or a token's
//! minter that this instance does not know yet is looked up in the database
//! by `catalog` (the slow path), which then adds it here.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::domain::limits::WorkspaceId;
use crate::domain::time::Timestamp;
use crate::keys::{KeyGrant, KeyHash, Scope, Scopes, serves};
use crate::store::KeyRecord;
use crate::tokens::{Minter, TOKEN_PREFIX, TokenClaims, TokenSecret};

/// A key's last use is written at most this often (to the minute).
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// Who a request speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Admin,
    /// A workspace key, or a browser token, or a service key that named a
    /// workspace: acts for that workspace with these scopes.
    Workspace {
        workspace: WorkspaceId,
        scopes: Scopes,
    },
    /// A service key that has not named a workspace (yet).
    Service {
        key_id: String,
        workspaces: Option<Arc<[WorkspaceId]>>,
    },
}

impl Principal {
    /// A workspace key with every scope, as keys made before scopes were.
    pub fn workspace(workspace: WorkspaceId) -> Self {
        Principal::Workspace {
            workspace,
            scopes: Scopes::ALL,
        }
    }

    /// Whether this may act for `workspace` with `scope`, naming it: a
    /// workspace key only for its own workspace and scopes, a service key
    /// for any workspace it serves, with every scope.
    pub fn may(&self, scope: Scope, workspace: &WorkspaceId) -> Result<(), Denied> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Workspace {
                workspace: own,
                scopes,
            } => {
                if own != workspace {
                    Err(Denied::OtherWorkspace)
                } else if scopes.contains(scope) {
                    Ok(())
                } else {
                    Err(Denied::MissingScope(scope))
                }
            }
            Principal::Service { workspaces, .. } => {
                if serves(workspaces.as_deref(), workspace) {
                    Ok(())
                } else {
                    Err(Denied::OtherWorkspace)
                }
            }
        }
    }
}

/// Why a principal may not do something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// The workspace is not this principal's to name: answered like a
    /// workspace that does not exist.
    OtherWorkspace,
    MissingScope(Scope),
}

/// What a caller presented, kept to check it again later (for a WebSocket
/// ticket, or a live connection when keys change).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Credential {
    /// A key, by its hash: the key itself is never kept.
    Key(KeyHash),
    /// A browser token, which is self-contained and short-lived.
    Token(Arc<str>),
}

impl Credential {
    pub fn of(presented: &str) -> Self {
        if presented.starts_with(TOKEN_PREFIX) {
            Credential::Token(presented.into())
        } else {
            Credential::Key(KeyHash::of(presented))
        }
    }

    /// A fixed-size name of the credential, e.g. to count its connections.
    pub fn hash(&self) -> KeyHash {
        match self {
            Credential::Key(hash) => *hash,
            Credential::Token(token) => KeyHash::of(token),
        }
    }

    /// The form a WebSocket ticket keeps, shared with other instances.
    pub fn to_stored(&self) -> String {
        match self {
            Credential::Key(hash) => hash.to_hex(),
            Credential::Token(token) => token.to_string(),
        }
    }

    pub fn from_stored(stored: &str) -> Option<Self> {
        if stored.starts_with(TOKEN_PREFIX) {
            Some(Credential::Token(stored.into()))
        } else {
            KeyHash::from_hex(stored).map(Credential::Key)
        }
    }
}

/// Why a credential does not authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// Not a key or token of this installation, or revoked.
    Unknown,
    /// It was valid until its expiry.
    Expired,
}

/// What the keyring can tell without the database.
pub(super) enum Verdict {
    Known(Result<Principal, AuthError>),
    /// Neither known nor refused here: the key with this hash, or the
    /// token's minting key with this id, may have been made elsewhere.
    LookUpKey(KeyHash),
    LookUpMinter(String),
}

/// An active key.
pub(super) struct ActiveKey {
    id: String,
    grant: KeyGrant,
    expires_at: Option<Timestamp>,
    /// Milliseconds; the last use recorded (or loaded), to the minute.
    last_used: AtomicI64,
}

#[derive(Default)]
pub(super) struct Keyring {
    admin: Option<KeyHash>,
    token_secret: Option<Arc<TokenSecret>>,
    keys: HashMap<KeyHash, Arc<ActiveKey>>,
    ids: HashMap<String, KeyHash>,
}

impl Keyring {
    pub fn set_admin(&mut self, hash: KeyHash) {
        self.admin = Some(hash);
    }

    pub fn set_token_secret(&mut self, secret: TokenSecret) {
        self.token_secret = Some(Arc::new(secret));
    }

    pub fn token_secret(&self) -> Option<Arc<TokenSecret>> {
        self.token_secret.clone()
    }

    pub fn admin_minter(&self) -> Option<Minter> {
        self.admin.map(Minter::admin)
    }

    /// Replaces every key with the active ones of `records`, keeping the
    /// last uses recorded here since they were loaded.
    pub fn replace(&mut self, records: &[KeyRecord]) {
        let previous = std::mem::take(&mut self.keys);
        self.ids.clear();
        for record in records.iter().filter(|key| key.revoked_at.is_none()) {
            self.insert(record);
            if let (Some(old), Some(new)) =
                (previous.get(&record.hash), self.keys.get(&record.hash))
            {
                new.last_used
                    .fetch_max(old.last_used.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    pub fn insert(&mut self, record: &KeyRecord) {
        let key = ActiveKey {
            id: record.id.clone(),
            grant: record.grant.clone(),
            expires_at: record.expires_at,
            last_used: AtomicI64::new(record.last_used_at.map_or(i64::MIN, Timestamp::millis)),
        };
        self.ids.insert(record.id.clone(), record.hash);
        self.keys.insert(record.hash, Arc::new(key));
    }

    pub fn remove(&mut self, hash: &KeyHash) {
        if let Some(key) = self.keys.remove(hash) {
            self.ids.remove(&key.id);
        }
    }

    /// Forgets the keys of a deleted workspace.
    pub fn remove_workspace(&mut self, workspace: &WorkspaceId) {
        self.keys
            .retain(|_, key| key.grant.workspace() != Some(workspace));
        let keys = &self.keys;
        self.ids.retain(|_, hash| keys.contains_key(hash));
    }

    /// Authenticates `credential` at `now` from memory. A key in use is
    /// noted in `uses` (at most once a minute per key), for the flush to
    /// record.
    pub fn verdict(
        &self,
        credential: &Credential,
        now: Timestamp,
        uses: &mut dyn FnMut(&str, Timestamp),
    ) -> Verdict {
        match credential {
            Credential::Key(hash) => self.key_verdict(*hash, now, uses),
            Credential::Token(token) => self.token_verdict(token, now),
        }
    }

    fn key_verdict(
        &self,
        hash: KeyHash,
        now: Timestamp,
        uses: &mut dyn FnMut(&str, Timestamp),
    ) -> Verdict {
        if self.admin.is_some_and(|admin| admin.matches(&hash)) {
            return Verdict::Known(Ok(Principal::Admin));
        }
        // The map finds the entry by hash; the stored hash is then compared
        // again in constant time, so no timing reveals a near miss.
        let Some((_, key)) = self
            .keys
            .get_key_value(&hash)
            .filter(|(stored, _)| stored.matches(&hash))
        else {
            return Verdict::LookUpKey(hash);
        };
        if key.expires_at.is_some_and(|at| at <= now) {
            return Verdict::Known(Err(AuthError::Expired));
        }
        let last = key.last_used.load(Ordering::Relaxed);
        if now.millis().saturating_sub(last) >= LAST_USED_RESOLUTION_MS
            && key
                .last_used
                .compare_exchange(last, now.millis(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            uses(&key.id, now);
        }
        Verdict::Known(Ok(match &key.grant {
            KeyGrant::Workspace { workspace, scopes } => Principal::Workspace {
                workspace: workspace.clone(),
                scopes: *scopes,
            },
            KeyGrant::Service { workspaces } => Principal::Service {
                key_id: key.id.clone(),
                workspaces: workspaces.as_deref().map(Arc::from),
            },
        }))
    }

    fn token_verdict(&self, token: &str, now: Timestamp) -> Verdict {
        let Some(claims) = self.token_secret.as_ref().and_then(|s| s.verify(token)) else {
            return Verdict::Known(Err(AuthError::Unknown));
        };
        if claims.expires_at <= now {
            return Verdict::Known(Err(AuthError::Expired));
        }
        match &claims.minter {
            Minter::Admin(_) => {
                let still_admin = self.admin_minter().as_ref() == Some(&claims.minter);
                Verdict::Known(
                    still_admin
                        .then(|| read_only(&claims))
                        .ok_or(AuthError::Unknown),
                )
            }
            Minter::Key(id) => {
                let Some(minter) = self.ids.get(id).and_then(|hash| self.keys.get(hash)) else {
                    return Verdict::LookUpMinter(id.clone());
                };
                let valid = minter.expires_at.is_none_or(|at| at > now)
                    && match &minter.grant {
                        KeyGrant::Service { workspaces } => {
                            serves(workspaces.as_deref(), &claims.workspace)
                        }
                        KeyGrant::Workspace { .. } => false,
                    };
                Verdict::Known(valid.then(|| read_only(&claims)).ok_or(AuthError::Unknown))
            }
        }
    }
}

fn read_only(claims: &TokenClaims) -> Principal {
    Principal::Workspace {
        workspace: claims.workspace.clone(),
        scopes: Scopes::READ,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Scope;

    const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    fn at(offset_ms: i64) -> Timestamp {
        Timestamp::from_millis(NOW.millis() + offset_ms)
    }

    fn id(name: &str) -> WorkspaceId {
        name.parse().expect("valid id")
    }

    fn record(key_id: &str, presented: &str, grant: KeyGrant) -> KeyRecord {
        KeyRecord {
            id: key_id.to_owned(),
            grant,
            hash: KeyHash::of(presented),
            prefix: presented.chars().take(7).collect(),
            name: String::new(),
            created_at: at(-3_600_000),
            expires_at: None,
            last_used_at: None,
            revoked_at: None,
        }
    }

    fn keyring() -> Keyring {
        let mut keyring = Keyring::default();
        keyring.set_admin(KeyHash::of("admin-key-0123456789"));
        keyring.set_token_secret(TokenSecret::generate());
        keyring.insert(&record(
            "key_read",
            "qw_read",
            KeyGrant::Workspace {
                workspace: id("acme"),
                scopes: Scopes::READ,
            },
        ));
        keyring.insert(&record(
            "key_service",
            "qw_service",
            KeyGrant::Service {
                workspaces: Some(vec![id("acme")]),
            },
        ));
        keyring
    }

    fn check(keyring: &Keyring, presented: &str, now: Timestamp) -> Result<Principal, AuthError> {
        match keyring.verdict(&Credential::of(presented), now, &mut |_, _| {}) {
            Verdict::Known(result) => result,
            Verdict::LookUpKey(_) | Verdict::LookUpMinter(_) => Err(AuthError::Unknown),
        }
    }

    fn mint(keyring: &Keyring, workspace: &str, minter: Minter, expires_at: Timestamp) -> String {
        keyring.token_secret().expect("secret").mint(&TokenClaims {
            workspace: id(workspace),
            minter,
            expires_at,
        })
    }

    #[test]
    fn a_principal_acts_only_on_its_workspaces_with_its_scopes() {
        let read = Principal::Workspace {
            workspace: id("acme"),
            scopes: Scopes::READ,
        };
        assert_eq!(read.may(Scope::Read, &id("acme")), Ok(()));
        assert_eq!(
            read.may(Scope::Report, &id("acme")),
            Err(Denied::MissingScope(Scope::Report))
        );
        assert_eq!(
            read.may(Scope::Read, &id("beta")),
            Err(Denied::OtherWorkspace)
        );
        let service = Principal::Service {
            key_id: "key_service".into(),
            workspaces: Some(Arc::from(vec![id("acme")])),
        };
        assert_eq!(service.may(Scope::Proxy, &id("acme")), Ok(()));
        assert_eq!(
            service.may(Scope::Read, &id("beta")),
            Err(Denied::OtherWorkspace)
        );
        let any = Principal::Service {
            key_id: "key_any".into(),
            workspaces: None,
        };
        assert_eq!(any.may(Scope::Report, &id("beta")), Ok(()));
        assert_eq!(Principal::Admin.may(Scope::Proxy, &id("beta")), Ok(()));
    }

    #[test]
    fn keys_authenticate_until_they_expire_and_unknown_ones_are_looked_up() {
        let mut keyring = keyring();
        assert_eq!(
            check(&keyring, "qw_read", NOW),
            Ok(Principal::Workspace {
                workspace: id("acme"),
                scopes: Scopes::READ
            })
        );
        assert_eq!(
            check(&keyring, "admin-key-0123456789", NOW),
            Ok(Principal::Admin)
        );
        assert!(matches!(
            keyring.verdict(&Credential::of("qw_unknown"), NOW, &mut |_, _| {}),
            Verdict::LookUpKey(_)
        ));
        let mut expiring = record(
            "key_expiring",
            "qw_expiring",
            KeyGrant::Workspace {
                workspace: id("acme"),
                scopes: Scopes::ALL,
            },
        );
        expiring.expires_at = Some(at(1000));
        keyring.insert(&expiring);
        assert!(check(&keyring, "qw_expiring", at(999)).is_ok());
        assert_eq!(
            check(&keyring, "qw_expiring", at(1000)),
            Err(AuthError::Expired)
        );
        keyring.remove_workspace(&id("acme"));
        assert!(matches!(
            keyring.verdict(&Credential::of("qw_read"), NOW, &mut |_, _| {}),
            Verdict::LookUpKey(_)
        ));
    }

    #[test]
    fn a_key_s_use_is_noted_at_most_once_a_minute() {
        let keyring = keyring();
        let mut uses = Vec::new();
        for offset in [0, 1_000, 59_999, 60_000, 61_000, 130_000] {
            keyring.verdict(&Credential::of("qw_read"), at(offset), &mut |key, when| {
                uses.push((key.to_owned(), when));
            });
        }
        assert_eq!(
            uses,
            vec![
                ("key_read".to_owned(), at(0)),
                ("key_read".to_owned(), at(60_000)),
                ("key_read".to_owned(), at(130_000)),
            ]
        );
    }

    #[test]
    fn a_token_reads_its_workspace_while_its_minter_is_valid() {
        let mut keyring = keyring();
        let token = mint(
            &keyring,
            "acme",
            Minter::Key("key_service".into()),
            at(900_000),
        );
        assert_eq!(
            check(&keyring, &token, NOW),
            Ok(Principal::Workspace {
                workspace: id("acme"),
                scopes: Scopes::READ
            })
        );
        assert_eq!(
            check(&keyring, &token, at(900_000)),
            Err(AuthError::Expired)
        );
        // A workspace the minter does not serve (a list changed since).
        let elsewhere = mint(
            &keyring,
            "beta",
            Minter::Key("key_service".into()),
            at(900_000),
        );
        assert_eq!(check(&keyring, &elsewhere, NOW), Err(AuthError::Unknown));
        // A workspace key mints nothing.
        let by_workspace_key = mint(
            &keyring,
            "acme",
            Minter::Key("key_read".into()),
            at(900_000),
        );
        assert_eq!(
            check(&keyring, &by_workspace_key, NOW),
            Err(AuthError::Unknown)
        );
        // A minter this instance has not seen is looked up; a revoked one ends its tokens.
        let unseen = mint(&keyring, "acme", Minter::Key("key_new".into()), at(900_000));
        assert!(matches!(
            keyring.verdict(&Credential::of(&unseen), NOW, &mut |_, _| {}),
            Verdict::LookUpMinter(id) if id == "key_new"
        ));
        keyring.remove(&KeyHash::of("qw_service"));
        assert!(matches!(
            keyring.verdict(&Credential::of(&token), NOW, &mut |_, _| {}),
            Verdict::LookUpMinter(_)
        ));
    }

    #[test]
    fn an_admin_token_ends_when_the_admin_key_changes() {
        let mut keyring = keyring();
        let minter = keyring.admin_minter().expect("admin");
        let token = mint(&keyring, "acme", minter, at(60_000));
        assert!(check(&keyring, &token, NOW).is_ok());
        keyring.set_admin(KeyHash::of("another-admin-key-000"));
        assert_eq!(check(&keyring, &token, NOW), Err(AuthError::Unknown));
    }

    #[test]
    fn credentials_round_trip_through_their_stored_form() {
        for presented in ["qw_some_key", "qwt_abc.def"] {
            let credential = Credential::of(presented);
            assert_eq!(
                Credential::from_stored(&credential.to_stored()),
                Some(credential)
            );
        }
        assert_eq!(Credential::from_stored("not hex"), None);
    }
}
