//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`): parsing and validation.
//!
//! Pure functions, no I/O. Follows the SPIFFE ID spec: the trust domain is
//! lowercase letters, digits, `.`, `-`, `_`; the path is `/`-separated
//! non-empty segments of letters, digits, `.`, `-`, `_` (no `.` or `..`
//! segments); no query, fragment, port or user info; at most 2048 bytes.

use std::fmt;

/// The longest SPIFFE ID we accept, as the spec requires.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (== id.len() when there is no path).
    path_start: usize,
}

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain may only hold lowercase letters, digits, '.', '-' and '_' (got {0:?})")]
    BadTrustDomainChar(char),
    #[error("path segment is empty (double or trailing '/')")]
    EmptySegment,
    #[error("path segment may not be '.' or '..'")]
    DotSegment,
    #[error("path may only hold letters, digits, '.', '-', '_' and '/' (got {0:?})")]
    BadPathChar(char),
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    ForeignTrustDomain { id: String, expected: String },
    #[error("SPIFFE ID {0} has no path: a workload ID names a workload")]
    NoPath(String),
}

impl SpiffeId {
    /// Parse and validate a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        if s.is_empty() {
            return Err(SpiffeError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeError::TooLong);
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or(SpiffeError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(SpiffeError::EmptySegment);
                }
                if seg == "." || seg == ".." {
                    return Err(SpiffeError::DotSegment);
                }
                if let Some(c) = seg
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(SpiffeError::BadPathChar(c));
                }
            }
        }
        Ok(SpiffeId {
            id: s.to_string(),
            path_start: "spiffe://".len() + td.len(),
        })
    }

    /// Parse, and require a non-empty path inside `trust_domain`.
    pub fn parse_in(s: &str, trust_domain: &str) -> Result<Self, SpiffeError> {
        let id = Self::parse(s)?;
        if id.trust_domain() != trust_domain {
            return Err(SpiffeError::ForeignTrustDomain {
                id: s.to_string(),
                expected: trust_domain.to_string(),
            });
        }
        if id.path().is_empty() {
            return Err(SpiffeError::NoPath(s.to_string()));
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.path_start]
    }

    /// The path including its leading '/', or "" for a trust-domain ID.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Validate a trust domain name (the part after `spiffe://`).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeError> {
    if td.is_empty() {
        return Err(SpiffeError::EmptyTrustDomain);
    }
    if td.len() > 255 {
        return Err(SpiffeError::TooLong);
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeError::BadTrustDomainChar(c));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/payment").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/payment");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/default/sa/payment");
        let td = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(td.path(), "");
    }

    #[test]
    fn rejects_bad_ids() {
        for (s, want) in [
            ("", SpiffeError::Empty),
            ("http://example.org/a", SpiffeError::WrongScheme),
            ("spiffe:///a", SpiffeError::EmptyTrustDomain),
            (
                "spiffe://Example.org/a",
                SpiffeError::BadTrustDomainChar('E'),
            ),
            (
                "spiffe://example.org:8080/a",
                SpiffeError::BadTrustDomainChar(':'),
            ),
            ("spiffe://example.org/a//b", SpiffeError::EmptySegment),
            ("spiffe://example.org/a/", SpiffeError::EmptySegment),
            ("spiffe://example.org/a/../b", SpiffeError::DotSegment),
            ("spiffe://example.org/a?x=1", SpiffeError::BadPathChar('?')),
            (
                "spiffe://user@example.org/a",
                SpiffeError::BadTrustDomainChar('@'),
            ),
        ] {
            assert_eq!(SpiffeId::parse(s), Err(want), "{s}");
        }
        assert!(SpiffeId::parse(&format!("spiffe://a/{}", "x".repeat(3000))).is_err());
    }

    #[test]
    fn parse_in_checks_trust_domain_and_path() {
        assert!(SpiffeId::parse_in("spiffe://example.org/a", "example.org").is_ok());
        assert!(matches!(
            SpiffeId::parse_in("spiffe://other.org/a", "example.org"),
            Err(SpiffeError::ForeignTrustDomain { .. })
        ));
        assert!(matches!(
            SpiffeId::parse_in("spiffe://example.org", "example.org"),
            Err(SpiffeError::NoPath(_))
        ));
    }
}
