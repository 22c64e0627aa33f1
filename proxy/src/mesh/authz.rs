//! Authorization in the mesh file: which callers (SPIFFE IDs) may reach a
//! service. The server-side sidecar checks every stream and request against
//! it, by the identity the caller proved in the mTLS handshake.
//!
//! ```toml
//! default_authorization = "trust-domain"   # or "deny": the rule for services without a table
//! [services.payment.authorization]
//! allow = ["spiffe://example.org/ns/shop/sa/customer", "spiffe://example.org/ns/ops/*"]
//! deny = ["spiffe://example.org/ns/ops/sa/intern"]   # checked first
//! ```
//!
//! A pattern is an exact SPIFFE ID, or a prefix ending in `/*` that matches
//! every ID below it (`spiffe://td/ns/shop/*`, `spiffe://td/*`). Deny rules win
//! over allow rules; with an `authorization` table, a caller must match an
//! allow rule (`allow = []` denies everyone). Without one, the mesh-wide
//! `default_authorization` applies: `trust-domain` (the default) admits any
//! workload of the mesh's trust domain — which the handshake already
//! requires — and `deny` admits nobody until a service lists its callers.

use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;
use weft_transport::SpiffeId;

use super::Checker;

/// The mesh-wide rule for services without an `authorization` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultAuthorization {
    /// Any workload of our trust domain (the handshake already checks it).
    #[default]
    TrustDomain,
    /// Nobody, until a service says who may call it (zero trust).
    Deny,
}

/// A service's callers.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Authorization {
    pub allow: Vec<IdPattern>,
    pub deny: Vec<IdPattern>,
}

/// An exact SPIFFE ID or a `…/*` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    Exact(String),
    /// The text before `*`, ending in `/`.
    Prefix(String),
}

impl Serialize for IdPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IdPattern::Exact(id) => s.serialize_str(id),
            IdPattern::Prefix(p) => s.serialize_str(&format!("{p}*")),
        }
    }
}

impl IdPattern {
    pub fn matches(&self, id: &str) -> bool {
        match self {
            IdPattern::Exact(e) => id == e,
            IdPattern::Prefix(p) => id.starts_with(p.as_str()),
        }
    }
}

/// Why a caller was refused, for the 403's reason header and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// A deny rule matched.
    DenyRule(String),
    /// The service lists its callers and this is not one.
    NotAllowed,
    /// No table and the mesh default is deny.
    DefaultDeny,
    /// Another trust domain (only reachable if the handshake let it in).
    ForeignTrustDomain,
}

impl Denied {
    /// A short machine-readable reason (metric label, header value).
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::DenyRule(_) => "deny-rule",
            Denied::NotAllowed => "not-allowed",
            Denied::DefaultDeny => "default-deny",
            Denied::ForeignTrustDomain => "foreign-trust-domain",
        }
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::DenyRule(p) => write!(f, "denied by rule {p}"),
            Denied::NotAllowed => f.write_str("not in the service's allow list"),
            Denied::DefaultDeny => {
                f.write_str("the service lists no callers and the mesh default is deny")
            }
            Denied::ForeignTrustDomain => f.write_str("caller is from another trust domain"),
        }
    }
}

/// May `caller` reach a service with `rules` (None: no table), in a mesh
/// of `trust_domain` whose default is `default`?
pub fn check(
    rules: Option<&Authorization>,
    default: DefaultAuthorization,
    trust_domain: &str,
    caller: &SpiffeId,
) -> Result<(), Denied> {
    if caller.trust_domain() != trust_domain {
        return Err(Denied::ForeignTrustDomain);
    }
    let id = caller.as_str();
    match rules {
        None => match default {
            DefaultAuthorization::TrustDomain => Ok(()),
            DefaultAuthorization::Deny => Err(Denied::DefaultDeny),
        },
        Some(r) => {
            if let Some(p) = r.deny.iter().find(|p| p.matches(id)) {
                let shown = serde_json::to_value(p)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                return Err(Denied::DenyRule(shown));
            }
            if r.allow.iter().any(|p| p.matches(id)) {
                Ok(())
            } else {
                Err(Denied::NotAllowed)
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthorization {
    // Default: nobody, when the table is present but lists no one: a table
    // that names no caller is read as "locked down", never as "open".
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

impl Checker<'_> {
    pub(super) fn default_authorization(
        &mut self,
        raw: Option<Spanned<String>>,
    ) -> DefaultAuthorization {
        match raw {
            None => DefaultAuthorization::default(),
            Some(s) => match s.get_ref().as_str() {
                "trust-domain" => DefaultAuthorization::TrustDomain,
                "deny" => DefaultAuthorization::Deny,
                other => {
                    self.error(
                        Some(s.span()),
                        format!(
                            "default_authorization {other:?} is not known; use \"trust-domain\" \
                             (any workload of the mesh) or \"deny\" (only callers a service lists)"
                        ),
                    );
                    DefaultAuthorization::default()
                }
            },
        }
    }

    pub(super) fn authorization(
        &mut self,
        service: &str,
        trust_domain: &str,
        raw: RawAuthorization,
    ) -> Authorization {
        let mut patterns = |list: Vec<Spanned<String>>, what: &str| {
            list.into_iter()
                .filter_map(|p| {
                    let span = p.span();
                    match pattern(p.get_ref(), trust_domain) {
                        Ok(p) => Some(p),
                        Err(why) => {
                            self.error(
                                Some(span),
                                format!(
                                    "service {service:?}: authorization.{what} {:?}: {why}",
                                    p.get_ref()
                                ),
                            );
                            None
                        }
                    }
                })
                .collect()
        };
        let allow = patterns(raw.allow, "allow");
        let deny = patterns(raw.deny, "deny");
        Authorization { allow, deny }
    }
}

/// Check one pattern: a SPIFFE ID of our trust domain, optionally ending in `/*`.
fn pattern(text: &str, trust_domain: &str) -> Result<IdPattern, String> {
    let example = format!(
        "write a SPIFFE ID like \"spiffe://{trust_domain}/ns/shop/sa/customer\" or a prefix like \"spiffe://{trust_domain}/ns/shop/*\""
    );
    let (base, prefix) = match text.strip_suffix("/*") {
        Some(base) => (base, true),
        None => (text, false),
    };
    if base.contains('*') {
        return Err(format!("'*' may only end a pattern, as \"/*\"; {example}"));
    }
    let id = SpiffeId::parse(base).map_err(|e| format!("{e}; {example}"))?;
    if id.trust_domain() != trust_domain {
        return Err(format!(
            "is not in the mesh's trust domain {trust_domain:?}, so it could never call"
        ));
    }
    Ok(if prefix {
        IdPattern::Prefix(format!("{base}/"))
    } else {
        if id.path().is_empty() {
            return Err(format!("names no workload; {example}"));
        }
        IdPattern::Exact(base.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Mesh, MeshErrors};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn mesh(text: &str) -> Mesh {
        Mesh::parse(text, "m").unwrap_or_else(|e| panic!("{e}"))
    }

    const TEXT: &str = r#"trust_domain = "td"
[services.open]
endpoints = ["127.0.0.1:1"]
[services.shop]
endpoints = ["127.0.0.1:2"]
authorization = { allow = ["spiffe://td/ns/shop/*", "spiffe://td/ns/web/sa/frontend"], deny = ["spiffe://td/ns/shop/sa/intern"] }
[services.locked]
endpoints = ["127.0.0.1:3"]
authorization = {}
"#;

    fn decide(m: &Mesh, service: &str, caller: &str) -> Result<(), Denied> {
        let s = m.service(service).unwrap();
        check(
            s.authorization.as_ref(),
            m.default_authorization,
            &m.trust_domain,
            &id(caller),
        )
    }

    #[test]
    fn allow_deny_prefix_and_default() {
        let m = mesh(TEXT);
        assert_eq!(decide(&m, "open", "spiffe://td/anyone"), Ok(()));
        assert_eq!(
            decide(&m, "open", "spiffe://other/anyone"),
            Err(Denied::ForeignTrustDomain)
        );
        assert_eq!(decide(&m, "shop", "spiffe://td/ns/shop/sa/cart"), Ok(()));
        assert_eq!(decide(&m, "shop", "spiffe://td/ns/web/sa/frontend"), Ok(()));
        assert_eq!(
            decide(&m, "shop", "spiffe://td/ns/web/sa/frontend2"),
            Err(Denied::NotAllowed)
        );
        // "/ns/shop/*" is a path prefix, not a text prefix.
        assert_eq!(
            decide(&m, "shop", "spiffe://td/ns/shopping/sa/x"),
            Err(Denied::NotAllowed)
        );
        assert_eq!(
            decide(&m, "shop", "spiffe://td/ns/shop/sa/intern"),
            Err(Denied::DenyRule("spiffe://td/ns/shop/sa/intern".into()))
        );
        assert_eq!(
            decide(&m, "locked", "spiffe://td/ns/shop/sa/cart"),
            Err(Denied::NotAllowed)
        );

        let strict = mesh(&format!("default_authorization = \"deny\"\n{TEXT}"));
        assert_eq!(
            decide(&strict, "open", "spiffe://td/anyone"),
            Err(Denied::DefaultDeny)
        );
        assert_eq!(
            decide(&strict, "shop", "spiffe://td/ns/shop/sa/cart"),
            Ok(())
        );
        let json = serde_json::to_value(&strict).unwrap();
        assert_eq!(json["default_authorization"], "deny");
        assert_eq!(
            json["services"]["shop"]["authorization"]["allow"][0],
            "spiffe://td/ns/shop/*"
        );
    }

    #[test]
    fn bad_patterns_are_errors_with_lines() {
        let text = r#"trust_domain = "td"
default_authorization = "maybe"
[services.a]
endpoints = ["127.0.0.1:1"]
[services.a.authorization]
allow = [
  "spiffe://td/ns/*/sa/x",
  "spiffe://other/ns/a",
  "td/ns/a",
  "spiffe://td",
  "spiffe://td/*",
]
"#;
        let MeshErrors(errors) = Mesh::parse(text, "m").unwrap_err();
        let lines: Vec<_> = errors.iter().map(|e| e.line.unwrap_or(0)).collect();
        assert_eq!(lines, [2, 7, 8, 9, 10], "{errors:#?}");
        assert!(errors[1].message.contains("may only end a pattern"));
        assert!(errors[2].message.contains("trust domain"));
        assert!(errors[3].message.contains("spiffe://"));
        assert!(errors[4].message.contains("names no workload"));
    }
}
