//! Users and password checks in RabbitMQ's format, so definitions move between brokers.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::meta::UserRecord;

/// RabbitMQ's name for the scheme [`hash_password`] implements.
pub const SHA256_ALGORITHM: &str = "rabbit_password_hashing_sha256";

/// `base64(salt ‖ sha256(salt ‖ password))` with a random 4-byte salt, as RabbitMQ does.
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    hash_with_salt(&salt, password)
}

fn hash_with_salt(salt: &[u8; 4], password: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// Checks `password` against a stored RabbitMQ SHA-256 hash.
pub fn verify_password(stored: &str, password: &str) -> bool {
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(stored) else {
        return false;
    };
    let Some(salt) = raw.get(..4).and_then(|s| <[u8; 4]>::try_from(s).ok()) else {
        return false;
    };
    // Constant-time enough for our purposes: compare the full digests.
    let expected = hash_with_salt(&salt, password);
    expected.len() == stored.len()
        && expected
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("user '{0}' - invalid credentials")]
    InvalidCredentials(String),
    #[error("user '{0}' can only connect via localhost")]
    LoopbackOnly(String),
}

/// What the transport vouches for about a client, beyond its address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionAuth {
    /// The user named by the client's verified TLS certificate (its subject's CN), set
    /// only when `[tls] ssl_cert_login` is on: AMQP's EXTERNAL mechanism, and MQTT and
    /// STOMP logins without credentials, log in as this user (RabbitMQ's
    /// rabbitmq_auth_mechanism_ssl and the plugins' `ssl_cert_login`).
    pub cert_user: Option<String>,
    /// The TLS session, when the connection came through a TLS listener.
    pub tls: Option<Box<crate::connections::TlsDetails>>,
}

/// An authenticated user.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub tags: Vec<String>,
}

impl From<&UserRecord> for User {
    fn from(r: &UserRecord) -> Self {
        User {
            name: r.name.clone(),
            tags: r.tags.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_known_hash_verifies() {
        // From RabbitMQ's docs: password "test12" hashed with salt 908DC60A.
        let stored = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR";
        assert!(verify_password(stored, "test12"));
        assert!(!verify_password(stored, "test13"));
    }

    #[test]
    fn hash_round_trip() {
        let h = hash_password("guest");
        assert!(verify_password(&h, "guest"));
        assert!(!verify_password(&h, "Guest"));
        assert!(!verify_password("not base64!", "guest"));
    }
}
