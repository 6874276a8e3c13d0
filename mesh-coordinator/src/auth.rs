//! Accounts, logins, sessions and tickets.
//!
//! - Accounts live in the store (the database), passwords hashed with
//!   Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes), at most two
//!   hashes at a time so a login flood cannot starve the coordinator.
//! - A login answers a session token and a ticket for the server to join. A
//!   session buys more tickets without the password (reconnects,
//!   pre-connects to neighbours). Sessions are stored in the database by the
//!   SHA-256 of the token and cached in Redis; without Redis every lookup
//!   reads the database.
//! - Attempts are rate-limited per account name and per client address
//!   (Redis counters shared by every coordinator; per process while Redis is
//!   down).
//! - Tickets are Ed25519-signed claims (`shared::ticket`); game servers get
//!   the public key when they register and verify tickets offline.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use persistence::cache::{Cache, Session};
use persistence::model::Account;
use persistence::{Store, StoreError};
use ring::rand::{SecureRandom, SystemRandom};
use shared::ids::{PlayerId, ServerId};
use shared::ticket::{TicketClaims, TicketKey};
use shared::wire::JoinRole;
use tracing::{info, warn};

/// What went wrong, with the HTTP status and stable label the API answers.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown account name or wrong password")]
    BadCredentials,
    #[error("the session is unknown or expired: log in again")]
    BadSession,
    #[error("the account name {0:?} is taken")]
    NameTaken(String),
    #[error("too many attempts: try again in a minute")]
    RateLimited,
    #[error("no live game server can take the player at {0}")]
    NoServer(String),
    #[error("the account store is unavailable: {0}")]
    Unavailable(String),
}

impl AuthError {
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::BadRequest(_) => "bad_request",
            AuthError::BadCredentials => "bad_credentials",
            AuthError::BadSession => "bad_session",
            AuthError::NameTaken(_) => "name_taken",
            AuthError::RateLimited => "rate_limited",
            AuthError::NoServer(_) => "no_server",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        AuthError::Unavailable(e.to_string())
    }
}

/// Limits and lifetimes.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    pub ticket_ttl: Duration,
    pub session_ttl: Duration,
    /// Login attempts per account name per minute.
    pub per_name_per_minute: u64,
    /// Login and sign-up attempts per client address per minute.
    pub per_address_per_minute: u64,
}

impl Default for AuthPolicy {
    fn default() -> Self {
        Self {
            ticket_ttl: Duration::from_secs(60),
            session_ttl: Duration::from_secs(24 * 3600),
            per_name_per_minute: 10,
            per_address_per_minute: 120,
        }
    }
}

pub struct Auth {
    store: Arc<dyn Store>,
    pub cache: Arc<Cache>,
    key: TicketKey,
    pub policy: AuthPolicy,
    hashing: tokio::sync::Semaphore,
    /// Verified against when the name is unknown, so a login takes as long
    /// whether or not the account exists.
    decoy_hash: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("key", &self.key).field("policy", &self.policy).finish_non_exhaustive()
    }
}

/// Account names: 3–32 characters of `A-Z a-z 0-9 _ - .`.
pub fn check_name(name: &str) -> Result<(), AuthError> {
    let ok = (3..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadRequest("an account name is 3 to 32 characters of A-Z, a-z, 0-9, _, - and .".into()))
    }
}

/// Passwords: 8–128 bytes.
pub fn check_password(password: &str) -> Result<(), AuthError> {
    if (8..=128).contains(&password.len()) {
        Ok(())
    } else {
        Err(AuthError::BadRequest("a password is 8 to 128 bytes".into()))
    }
}

fn hash_password(password: &str, salt: &[u8; 16]) -> Result<String, AuthError> {
    let salt = SaltString::encode_b64(salt).map_err(|e| AuthError::Unavailable(format!("salt: {e}")))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Unavailable(format!("hashing: {e}")))
}

fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(e) => {
            warn!(error = %e, "a stored password hash does not parse; refusing the login");
            false
        }
    }
}

/// What a session is stored under: the SHA-256 of its token, so neither the
/// database nor Redis holds a usable token.
fn token_key(token: &str) -> String {
    shared::ticket::hex_string(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

impl Auth {
    pub fn new(store: Arc<dyn Store>, cache: Arc<Cache>, key: TicketKey, policy: AuthPolicy) -> Self {
        let rng = SystemRandom::new();
        let mut salt = [0u8; 16];
        let _ = rng.fill(&mut salt);
        let decoy_hash = hash_password("not a real password", &salt).unwrap_or_default();
        Self { store, cache, key, policy, hashing: tokio::sync::Semaphore::new(2), decoy_hash, rng }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    fn random<const N: usize>(&self) -> [u8; N] {
        let mut out = [0u8; N];
        self.rng.fill(&mut out).expect("the OS random source works");
        out
    }

    /// Runs an Argon2 computation off the async threads, two at a time.
    async fn hashing<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, AuthError> {
        let _permit = self.hashing.acquire().await.map_err(|_| AuthError::Unavailable("shutting down".into()))?;
        tokio::task::spawn_blocking(f).await.map_err(|e| AuthError::Unavailable(format!("hashing task: {e}")))
    }

    async fn rate_limit(&self, name: Option<&str>, addr: IpAddr) -> Result<(), AuthError> {
        let minute = Duration::from_secs(60);
        if !self.cache.allow(&format!("auth-addr:{addr}"), self.policy.per_address_per_minute, minute).await {
            return Err(AuthError::RateLimited);
        }
        if let Some(name) = name
            && !self
                .cache
                .allow(&format!("auth-name:{}", name.to_ascii_lowercase()), self.policy.per_name_per_minute, minute)
                .await
        {
            return Err(AuthError::RateLimited);
        }
        Ok(())
    }

    pub async fn create_account(&self, name: &str, password: &str, addr: IpAddr) -> Result<Account, AuthError> {
        check_name(name)?;
        check_password(password)?;
        self.rate_limit(None, addr).await?;
        let salt = self.random::<16>();
        let pw = password.to_owned();
        let hash = self.hashing(move || hash_password(&pw, &salt)).await??;
        match self.store.create_account(name, &hash).await {
            Ok(a) => {
                info!(account = %a.name, player = %a.player, "account created");
                Ok(a)
            }
            Err(StoreError::AlreadyExists(_)) => Err(AuthError::NameTaken(name.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks the password; on success a new session is stored and cached,
    /// and returned with its token.
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        addr: IpAddr,
    ) -> Result<(Account, String, Session), AuthError> {
        if check_name(name).is_err() || password.len() > 128 {
            return Err(AuthError::BadCredentials);
        }
        self.rate_limit(Some(name), addr).await?;
        let account = self.store.account(name).await?;
        let hash = account.as_ref().map_or_else(|| self.decoy_hash.clone(), |a| a.password_hash.clone());
        let pw = password.to_owned();
        let ok = self.hashing(move || verify_password(&pw, &hash)).await?;
        let account = match account {
            Some(a) if ok => a,
            _ => return Err(AuthError::BadCredentials),
        };
        let token = shared::ticket::hex_string(&self.random::<16>());
        let expires_unix = svc::unix_nanos() / 1_000_000_000 + self.policy.session_ttl.as_secs();
        let session = Session { player: account.player.0, account: account.name.clone(), expires_unix };
        let key = token_key(&token);
        self.store.put_session(&key, &session).await?;
        self.cache.put_session(&key, &session, self.policy.session_ttl).await;
        Ok((account, token, session))
    }

    /// The session behind a token.
    pub async fn session(&self, token: &str) -> Result<Session, AuthError> {
        if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::BadSession);
        }
        let key = token_key(token);
        let now = svc::unix_nanos() / 1_000_000_000;
        let cached = match self.cache.session(&key).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "unreadable session in the cache; reading the database");
                None
            }
        };
        let session = match cached {
            Some(s) => Some(s),
            // A miss, or Redis is down: the database has every session.
            None => {
                let s = self.store.session(&key).await?;
                if let Some(s) = &s
                    && s.expires_unix > now
                {
                    let ttl = Duration::from_secs(s.expires_unix - now);
                    self.cache.put_session(&key, s, ttl).await;
                }
                s
            }
        };
        match session {
            Some(s) if s.expires_unix > now => Ok(s),
            _ => Err(AuthError::BadSession),
        }
    }

    pub async fn logout(&self, token: &str) -> Result<(), AuthError> {
        let key = token_key(token);
        self.store.drop_session(&key).await?;
        self.cache.drop_session(&key).await;
        Ok(())
    }

    /// A signed ticket for `player` to join `server`.
    pub fn ticket(
        &self,
        player: PlayerId,
        name: &str,
        server: ServerId,
        role: JoinRole,
        spawn: Option<glam::DVec3>,
    ) -> (String, u64) {
        let now = svc::unix_nanos() / 1_000_000;
        let expires = now + self.policy.ticket_ttl.as_millis() as u64;
        let claims = TicketClaims {
            player,
            name: name.to_owned(),
            server,
            role,
            spawn,
            issued_unix_ms: now,
            expires_unix_ms: expires,
            nonce: u64::from_le_bytes(self.random::<8>()),
        };
        (self.key.sign(&claims), expires)
    }

    /// Where the player was when last saved, if anywhere.
    pub async fn saved_position(&self, player: PlayerId) -> Result<Option<glam::DVec3>, AuthError> {
        Ok(self.store.load_progress(player).await?.map(|p| glam::DVec3::from_array(p.position)))
    }

    /// The server the directory says holds the player's avatar.
    pub async fn directory(&self, player: PlayerId) -> Option<ServerId> {
        match self.cache.location(player.0).await {
            Ok(s) => s.map(ServerId),
            Err(e) => {
                warn!(error = %e, "unreadable directory entry");
                None
            }
        }
    }
}

/// Reads the signing key from a file of 64 hex digits, or makes one for this
/// process (development: tickets then die with the coordinator, and several
/// replicas would disagree).
pub fn load_key(path: Option<&std::path::Path>) -> anyhow::Result<TicketKey> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading the ticket key file {}: {e}", p.display()))?;
            TicketKey::from_hex(&text).map_err(|e| anyhow::anyhow!("the ticket key file {}: {e}", p.display()))
        }
        None => {
            let mut seed = [0u8; 32];
            SystemRandom::new().fill(&mut seed).map_err(|_| anyhow::anyhow!("the OS random source failed"))?;
            warn!("no --ticket-key-file: signing tickets with a key made for this process (development only)");
            Ok(TicketKey::from_seed(&seed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let store: Arc<dyn Store> = Arc::new(persistence::memory::MemoryStore::new(32 * 32 * 32));
        let cache = Arc::new(Cache::new(None, "t").unwrap());
        Auth::new(store, cache, TicketKey::from_seed(&[9; 32]), AuthPolicy::default())
    }

    const ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn accounts_log_in_with_their_password_only() {
        let a = auth();
        let acc = a.create_account("ada", "correct horse", ADDR).await.unwrap();
        assert!(acc.password_hash.starts_with("$argon2id$"), "{}", acc.password_hash);
        assert!(!acc.password_hash.contains("correct horse"));
        assert!(matches!(a.create_account("ada", "another one", ADDR).await, Err(AuthError::NameTaken(_))));
        let (who, token, _) = a.login("ada", "correct horse", ADDR).await.unwrap();
        assert_eq!(who.player, acc.player);
        assert_eq!(token.len(), 32);
        assert!(matches!(a.login("ada", "wrong horse", ADDR).await, Err(AuthError::BadCredentials)));
        assert!(matches!(a.login("bob", "correct horse", ADDR).await, Err(AuthError::BadCredentials)));
        assert!(matches!(a.create_account("a", "correct horse", ADDR).await, Err(AuthError::BadRequest(_))));
        assert!(matches!(a.create_account("a b c", "correct horse", ADDR).await, Err(AuthError::BadRequest(_))));
        assert!(matches!(a.create_account("carol", "short", ADDR).await, Err(AuthError::BadRequest(_))));
        // No Redis here: the session comes from the store, and the cache
        // counts the calls it could not serve.
        assert_eq!(a.session(&token).await.unwrap().player, acc.player.0);
        assert!(a.cache.stats.degraded(persistence::cache::Op::Session) >= 2);
        a.logout(&token).await.unwrap();
        assert!(matches!(a.session(&token).await, Err(AuthError::BadSession)));
        assert!(matches!(a.session("not hex").await, Err(AuthError::BadSession)));
    }

    #[tokio::test]
    async fn attempts_per_name_are_limited() {
        let a = auth();
        a.create_account("ada", "correct horse", ADDR).await.unwrap();
        let mut limited = 0;
        for _ in 0..12 {
            if matches!(a.login("ada", "wrong horse", ADDR).await, Err(AuthError::RateLimited)) {
                limited += 1;
            }
        }
        assert_eq!(limited, 2, "10 attempts a minute, then refused");
        // Another name from the same address is not limited by ada's count.
        a.create_account("bob", "correct horse", ADDR).await.unwrap();
        assert!(a.login("bob", "correct horse", ADDR).await.is_ok());
    }

    #[tokio::test]
    async fn tickets_verify_with_the_public_key() {
        let a = auth();
        let (t, expires) = a.ticket(PlayerId(5), "ada", ServerId(2), JoinRole::Play, None);
        let v = shared::ticket::TicketVerifier::new(vec![a.public_key()]);
        let now = svc::unix_nanos() / 1_000_000;
        let c = v.verify(&t, ServerId(2), now).unwrap();
        assert_eq!((c.player, c.name.as_str(), c.expires_unix_ms), (PlayerId(5), "ada", expires));
        let (t2, _) = a.ticket(PlayerId(5), "ada", ServerId(2), JoinRole::Play, None);
        assert_ne!(c.nonce, v.verify(&t2, ServerId(2), now).unwrap().nonce);
    }
}
