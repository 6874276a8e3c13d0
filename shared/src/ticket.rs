//! Login tickets: signed by the coordinator, verified by game servers offline.
//!
//! A ticket says "player P (account name N) may join server S in role R until
//! time T", signed with the coordinator's Ed25519 key. Game servers hold only
//! the public keys (they get them when they register), so a ticket is checked
//! without a database round trip and a game server cannot mint one.
//!
//! Text form: `pst1.<claims>.<signature>`, both parts base64url without
//! padding; the claims are bincode. The signature covers the prefix and the
//! claims' text, so neither can be swapped. The format is versioned by the
//! prefix: a new format gets a new prefix and servers refuse what they do not
//! know.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use glam::DVec3;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::ids::{PlayerId, ServerId};
use crate::wire::JoinRole;

/// Prefix of the current ticket format.
pub const PREFIX: &str = "pst1.";
/// Longest ticket a server reads; anything longer is refused unread.
pub const MAX_TICKET_LEN: usize = 1024;
/// How far a ticket's issue time may lie in the future (clock skew between
/// the coordinator and a game server).
pub const ISSUE_LEEWAY_MS: u64 = 30_000;
/// How long past its expiry a ticket is still accepted (clock skew).
pub const EXPIRY_LEEWAY_MS: u64 = 5_000;
/// The longest lifetime a valid ticket may claim: a leaked signing key or a
/// bug in the issuer cannot make tickets that live for days.
pub const MAX_LIFETIME_MS: u64 = 15 * 60 * 1000;

/// What a ticket grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketClaims {
    pub player: PlayerId,
    /// The account name, shown to other players.
    pub name: String,
    /// The only server that accepts this ticket.
    pub server: ServerId,
    pub role: JoinRole,
    /// Where the avatar appears when the server spawns it (its saved
    /// position, or the world's spawn point). The client cannot choose.
    pub spawn: Option<DVec3>,
    pub issued_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// Random: a server accepts each ticket once.
    pub nonce: u64,
}

/// Why a ticket was refused. `reason()` is a stable label (metrics, close
/// reasons).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket is malformed: {0}")]
    Malformed(&'static str),
    #[error("the ticket's signature does not verify against any key this server trusts")]
    Forged,
    #[error("the ticket expired {0} ms ago")]
    Expired(u64),
    #[error("the ticket is issued {0} ms in the future (clocks disagree?)")]
    NotYetValid(u64),
    #[error("the ticket claims a lifetime of {0} ms, longer than allowed")]
    TooLong(u64),
    #[error("the ticket is for server {ticket}, this is server {here}")]
    WrongServer { ticket: ServerId, here: ServerId },
    #[error("the ticket was already used")]
    Replayed,
    #[error("no ticket signing key is known yet")]
    NoKey,
}

impl TicketError {
    pub fn reason(&self) -> &'static str {
        match self {
            TicketError::Malformed(_) => "ticket_malformed",
            TicketError::Forged => "ticket_forged",
            TicketError::Expired(_) => "ticket_expired",
            TicketError::NotYetValid(_) => "ticket_not_yet_valid",
            TicketError::TooLong(_) => "ticket_too_long",
            TicketError::WrongServer { .. } => "ticket_wrong_server",
            TicketError::Replayed => "ticket_replayed",
            TicketError::NoKey => "ticket_no_key",
        }
    }
}

fn claims_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_TICKET_LEN>()
}

/// The coordinator's signing key.
pub struct TicketKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        f.debug_struct("TicketKey").field("public", &hex_string(&self.public_key())).finish()
    }
}

impl TicketKey {
    /// The key whose 32-byte Ed25519 seed is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        // A 32-byte seed always makes a valid Ed25519 key pair; "unchecked"
        // refers to a public key to compare against, which we do not pass.
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are an Ed25519 seed");
        Self { pair }
    }

    /// A key from its seed written as 64 hex digits (what a key file holds;
    /// surrounding whitespace is ignored).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(format!("expected 64 hex digits (a 32-byte Ed25519 seed), found {} characters", text.len()));
        }
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| "expected 64 hex digits (a 32-byte Ed25519 seed)".to_string())?;
        }
        Ok(Self::from_seed(&seed))
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    pub fn sign(&self, claims: &TicketClaims) -> String {
        let body = bincode::serde::encode_to_vec(claims, claims_config()).expect("ticket claims fit the limit");
        let mut text = String::with_capacity(MAX_TICKET_LEN / 2);
        text.push_str(PREFIX);
        B64.encode_string(&body, &mut text);
        let sig = self.pair.sign(text.as_bytes());
        text.push('.');
        B64.encode_string(sig.as_ref(), &mut text);
        text
    }
}

/// The public keys a game server accepts tickets from (the current key and,
/// during a rotation, the previous one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TicketVerifier {
    keys: Vec<[u8; 32]>,
}

impl TicketVerifier {
    pub fn new(keys: Vec<[u8; 32]>) -> Self {
        Self { keys }
    }

    pub fn keys(&self) -> &[[u8; 32]] {
        &self.keys
    }

    /// Checks the ticket's form, signature, validity window and server.
    /// Replays are the caller's to refuse (it keeps the nonces it accepted).
    pub fn verify(&self, ticket: &str, here: ServerId, now_unix_ms: u64) -> Result<TicketClaims, TicketError> {
        if self.keys.is_empty() {
            return Err(TicketError::NoKey);
        }
        if ticket.len() > MAX_TICKET_LEN {
            return Err(TicketError::Malformed("longer than 1024 bytes"));
        }
        let rest = ticket.strip_prefix(PREFIX).ok_or(TicketError::Malformed("unknown format"))?;
        let (body_b64, sig_b64) = rest.split_once('.').ok_or(TicketError::Malformed("no signature"))?;
        let signed = &ticket[..PREFIX.len() + body_b64.len()];
        let sig = B64.decode(sig_b64).map_err(|_| TicketError::Malformed("signature is not base64url"))?;
        if !self.keys.iter().any(|k| UnparsedPublicKey::new(&ED25519, k).verify(signed.as_bytes(), &sig).is_ok()) {
            return Err(TicketError::Forged);
        }
        // Only signed bytes are decoded.
        let body = B64.decode(body_b64).map_err(|_| TicketError::Malformed("claims are not base64url"))?;
        let (claims, used): (TicketClaims, usize) = bincode::serde::decode_from_slice(&body, claims_config())
            .map_err(|_| TicketError::Malformed("claims do not decode"))?;
        if used != body.len() {
            return Err(TicketError::Malformed("trailing bytes after the claims"));
        }
        if claims.issued_unix_ms > now_unix_ms + ISSUE_LEEWAY_MS {
            return Err(TicketError::NotYetValid(claims.issued_unix_ms - now_unix_ms));
        }
        let lifetime = claims.expires_unix_ms.saturating_sub(claims.issued_unix_ms);
        if lifetime > MAX_LIFETIME_MS {
            return Err(TicketError::TooLong(lifetime));
        }
        if now_unix_ms > claims.expires_unix_ms + EXPIRY_LEEWAY_MS {
            return Err(TicketError::Expired(now_unix_ms - claims.expires_unix_ms));
        }
        if claims.server != here {
            return Err(TicketError::WrongServer { ticket: claims.server, here });
        }
        if claims.spawn.is_some_and(|p| !p.is_finite()) {
            return Err(TicketError::Malformed("spawn point is not finite"));
        }
        Ok(claims)
    }
}

/// Lower-case hex, for logs and key files.
pub fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_795_000_000_000;

    fn claims() -> TicketClaims {
        TicketClaims {
            player: PlayerId(42),
            name: "ada".into(),
            server: ServerId(3),
            role: JoinRole::Play,
            spawn: Some(DVec3::new(1000.5, 12.0, -3.25)),
            issued_unix_ms: NOW,
            expires_unix_ms: NOW + 60_000,
            nonce: 7,
        }
    }

    fn key(n: u8) -> TicketKey {
        TicketKey::from_seed(&[n; 32])
    }

    #[test]
    fn a_signed_ticket_verifies_on_its_server_only() {
        let k = key(1);
        let v = TicketVerifier::new(vec![k.public_key()]);
        let t = k.sign(&claims());
        assert!(t.starts_with(PREFIX) && t.len() < MAX_TICKET_LEN);
        assert_eq!(v.verify(&t, ServerId(3), NOW + 1).unwrap(), claims());
        assert_eq!(
            v.verify(&t, ServerId(4), NOW + 1).unwrap_err(),
            TicketError::WrongServer { ticket: ServerId(3), here: ServerId(4) }
        );
    }

    #[test]
    fn expiry_and_issue_time_hold_with_leeway() {
        let k = key(1);
        let v = TicketVerifier::new(vec![k.public_key()]);
        let t = k.sign(&claims());
        assert!(v.verify(&t, ServerId(3), NOW + 60_000 + EXPIRY_LEEWAY_MS).is_ok());
        assert_eq!(v.verify(&t, ServerId(3), NOW + 60_001 + EXPIRY_LEEWAY_MS).unwrap_err().reason(), "ticket_expired");
        assert!(v.verify(&t, ServerId(3), NOW - ISSUE_LEEWAY_MS).is_ok());
        assert_eq!(v.verify(&t, ServerId(3), NOW - ISSUE_LEEWAY_MS - 1).unwrap_err().reason(), "ticket_not_yet_valid");
        let long = TicketClaims { expires_unix_ms: NOW + MAX_LIFETIME_MS + 1, ..claims() };
        assert_eq!(v.verify(&k.sign(&long), ServerId(3), NOW).unwrap_err().reason(), "ticket_too_long");
    }

    #[test]
    fn another_key_or_a_changed_byte_is_forged() {
        let v = TicketVerifier::new(vec![key(1).public_key()]);
        let other = key(2).sign(&claims());
        assert_eq!(v.verify(&other, ServerId(3), NOW).unwrap_err(), TicketError::Forged);
        // Claims of one ticket with the signature of another.
        let a = key(1).sign(&claims());
        let b = key(1).sign(&TicketClaims { player: PlayerId(43), ..claims() });
        let (a_body, _) = a.rsplit_once('.').unwrap();
        let (_, b_sig) = b.rsplit_once('.').unwrap();
        assert_eq!(v.verify(&format!("{a_body}.{b_sig}"), ServerId(3), NOW).unwrap_err(), TicketError::Forged);
        // A rotation: both keys trusted.
        let both = TicketVerifier::new(vec![key(1).public_key(), key(2).public_key()]);
        assert!(both.verify(&other, ServerId(3), NOW).is_ok());
        assert_eq!(TicketVerifier::default().verify(&a, ServerId(3), NOW).unwrap_err(), TicketError::NoKey);
    }

    #[test]
    fn malformed_tickets_are_named() {
        let v = TicketVerifier::new(vec![key(1).public_key()]);
        for (t, want) in [
            ("dev", "ticket_malformed"),
            ("pst1.", "ticket_malformed"),
            ("pst1.abc.!!", "ticket_malformed"),
            ("pst1.abc.AAAA", "ticket_forged"),
            ("pst2.abc.def", "ticket_malformed"),
        ] {
            assert_eq!(v.verify(t, ServerId(3), NOW).unwrap_err().reason(), want, "{t}");
        }
        assert_eq!(v.verify(&"x".repeat(2000), ServerId(3), NOW).unwrap_err().reason(), "ticket_malformed");
    }

    #[test]
    fn key_files_hold_hex_seeds() {
        let hex = "01".repeat(32);
        assert_eq!(TicketKey::from_hex(&format!("{hex}\n")).unwrap().public_key(), key(1).public_key());
        assert!(TicketKey::from_hex("0102").is_err());
        assert!(TicketKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(!format!("{:?}", key(1)).contains(&hex));
    }

    proptest! {
        #[test]
        fn any_single_byte_change_is_refused(pos in 0usize..200, byte in 0u8..128) {
            let k = key(1);
            let v = TicketVerifier::new(vec![k.public_key()]);
            let t = k.sign(&claims());
            let mut bytes = t.clone().into_bytes();
            let i = pos % bytes.len();
            prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            let changed = String::from_utf8_lossy(&bytes).into_owned();
            // base64url without padding has a few encodings of the same last
            // bits; any change that still verifies must decode to the same claims.
            match v.verify(&changed, ServerId(3), NOW) {
                Ok(c) => prop_assert_eq!(c, claims()),
                Err(e) => prop_assert!(e.reason() == "ticket_forged" || e.reason() == "ticket_malformed"),
            }
        }
    }
}
