//! Join tokens: stateless credentials bound to one SPIFFE ID, HMAC-SHA256
//! signed with the CA's `token.key`.
//!
//! Format: `weft1.<base64url(json {sub, exp, nonce[, single]})>.<base64url(hmac)>`,
//! the MAC covering everything before the last dot. Pure code, no I/O: the
//! clock is a parameter so expiry is testable. Whether a single-use token
//! was already redeemed is state, kept by [`crate::used`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rustls::crypto::tls13::OkmBlock;
use serde::{Deserialize, Serialize};
use weft_transport::spiffe::SpiffeId;

use crate::{files, CaError};

/// Length of the HMAC key in `token.key`.
pub(crate) const KEY_LEN: usize = 32;
const PREFIX: &str = "weft1";
/// Longer input is rejected before any decoding.
const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Claims {
    /// The SPIFFE ID the bearer may get a certificate for.
    sub: String,
    /// Expiry, seconds since the Unix epoch.
    exp: u64,
    /// Random, so two tokens for the same ID and second differ; also the
    /// token's name in the used-token list and the rate limiter.
    nonce: String,
    /// Redeemable once. Omitted when false, so multi-use tokens keep the
    /// format they had before single-use tokens existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    single: bool,
}

/// What a token that verified says.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) sub: String,
    pub(crate) exp: u64,
    pub(crate) nonce: String,
    pub(crate) single_use: bool,
}

/// HMAC-SHA256 of `msg` under `key`, through rustls' aws-lc-rs provider.
fn hmac_sha256(key: &[u8; KEY_LEN], msg: &[u8]) -> Result<Vec<u8>, CaError> {
    let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .ok_or_else(|| CaError::Internal("no TLS 1.3 HMAC-SHA256 provider".to_string()))?;
    let tag = suite.hkdf_provider.hmac_sign(&OkmBlock::new(key), msg);
    Ok(tag.as_ref().to_vec())
}

/// Compare in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mint a token for `id` valid from `now` for `ttl`.
pub(crate) fn mint(
    key: &[u8; KEY_LEN],
    id: &SpiffeId,
    ttl: Duration,
    single_use: bool,
    now: SystemTime,
) -> Result<String, CaError> {
    if ttl.is_zero() {
        return Err(CaError::InvalidTtl(
            "the token TTL must be longer than zero".to_string(),
        ));
    }
    let exp = unix_secs(now)
        .checked_add(ttl.as_secs().max(1))
        .ok_or_else(|| CaError::InvalidTtl(format!("{ttl:?} is too long")))?;
    let mut nonce = [0u8; 16];
    files::fill_random(&mut nonce)?;
    let claims = Claims {
        sub: id.as_str().to_string(),
        exp,
        nonce: URL_SAFE_NO_PAD.encode(nonce),
        single: single_use,
    };
    let json = serde_json::to_vec(&claims)
        .map_err(|e| CaError::Internal(format!("could not encode token: {e}")))?;
    let signed = format!("{PREFIX}.{}", URL_SAFE_NO_PAD.encode(json));
    let mac = hmac_sha256(key, signed.as_bytes())?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac)))
}

/// Whether `bearer` looks like a join token (rather than, say, a Kubernetes
/// service-account JWT).
pub(crate) fn is_join_token(bearer: &str) -> bool {
    bearer.trim().starts_with("weft1.")
}

/// Check `token` at time `now`; return its claims (the caller checks the
/// subject is a valid ID of its trust domain and single-use redemption).
pub(crate) fn verify(
    key: &[u8; KEY_LEN],
    token: &str,
    now: SystemTime,
) -> Result<Verified, CaError> {
    let token = token.trim();
    if token.len() > MAX_TOKEN_LEN {
        return Err(CaError::MalformedToken(format!(
            "longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    let (signed, mac_b64) = token
        .rsplit_once('.')
        .ok_or_else(|| CaError::MalformedToken("expected weft1.<claims>.<mac>".to_string()))?;
    let (prefix, claims_b64) = signed
        .split_once('.')
        .ok_or_else(|| CaError::MalformedToken("expected weft1.<claims>.<mac>".to_string()))?;
    if prefix != PREFIX {
        // The prefix is not echoed: it may be part of some other secret.
        return Err(CaError::MalformedToken(format!(
            "it does not start with {PREFIX:?} (a Kubernetes service-account token needs `weft-ca serve --kubernetes`)"
        )));
    }
    let mac = URL_SAFE_NO_PAD
        .decode(mac_b64)
        .map_err(|_| CaError::MalformedToken("the signature is not base64url".to_string()))?;
    // Authenticate before looking at the claims.
    let expected = hmac_sha256(key, signed.as_bytes())?;
    if !constant_time_eq(&mac, &expected) {
        return Err(CaError::ForgedToken);
    }
    let json = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|_| CaError::MalformedToken("the claims are not base64url".to_string()))?;
    let claims: Claims = serde_json::from_slice(&json)
        .map_err(|e| CaError::MalformedToken(format!("bad claims: {e}")))?;
    if unix_secs(now) >= claims.exp {
        let at = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .map(|at| humantime::format_rfc3339_seconds(at).to_string())
            .unwrap_or_else(|| format!("Unix time {}", claims.exp));
        return Err(CaError::ExpiredToken { at });
    }
    Ok(Verified {
        sub: claims.sub,
        exp: claims.exp,
        nonce: claims.nonce,
        single_use: claims.single,
    })
}
