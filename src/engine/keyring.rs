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
use crate::keys::{KeyGrant, KeyHash, Scope, Scopes};
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
            Principal::Service { workspaces, .. } => match workspaces {
                Some(list) if !list.contains(workspace) => Err(Denied::OtherWorkspace),
                _ => Ok(()),
            },
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
                        KeyGrant::Service { workspaces } => workspaces
                            .as_ref()
                            .is_none_or(|list| list.contains(&claims.workspace)),
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
