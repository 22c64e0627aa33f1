//! Unit tests of the CA library: directory layout, the leaf profile,
//! CSR handling and join tokens.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::*;

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/ns/default/sa/payment";

fn new_ca() -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(&dir.path().join("ca"), TD).unwrap();
    (dir, ca)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Check the SPIFFE leaf profile and that `leaf_pem` is signed by the root.
fn assert_spiffe_leaf(leaf_pem: &str, root_pem: &str, id: &str) {
    let leaf_der = der(leaf_pem);
    let root_der = der(root_pem);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();

    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "empty subject requires a critical SAN");
    let names = &san.value.general_names;
    assert_eq!(names.len(), 1, "exactly one SAN: {names:?}");
    assert!(matches!(names[0], GeneralName::URI(uri) if uri == id));
    assert!(!names.iter().any(|n| matches!(n, GeneralName::DNSName(_))));

    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);

    let serial = leaf.raw_serial();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] & 0x80 == 0, "serial must be positive");

    assert_eq!(leaf.issuer(), root.subject());
    leaf.verify_signature(Some(root.public_key())).unwrap();
}

#[test]
fn init_writes_the_layout_and_load_reads_it() {
    let (tmp, ca) = new_ca();
    let dir = tmp.path().join("ca");
    assert_eq!(ca.trust_domain(), TD);
    for name in [CA_CERT_FILE, CA_KEY_FILE, CA_CONFIG_FILE, TOKEN_KEY_FILE] {
        assert!(dir.join(name).is_file(), "{name} missing");
    }
    assert_eq!(std::fs::read(dir.join(TOKEN_KEY_FILE)).unwrap().len(), 32);

    let root_pem = std::fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap();
    let root_der = der(&root_pem);
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    assert!(root.basic_constraints().unwrap().unwrap().value.ca);
    let ku = root.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let cn = root.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "Weft root CA example.org");
    root.verify_signature(None).unwrap();
    let years = (root.validity().not_after - root.validity().not_before).unwrap();
    assert!(years.whole_days() >= 3649);

    let loaded = Ca::load(&dir).unwrap();
    assert_eq!(loaded.trust_domain(), TD);
    assert_eq!(der(&loaded.bundle_pem()), root_der);
    // Tokens of one load verify in another: same secret.
    let token = ca.token(ID, Duration::from_secs(60)).unwrap();
    assert_eq!(loaded.verify_token(&token).unwrap().as_str(), ID);
}

#[test]
fn init_refuses_to_overwrite() {
    let (tmp, _ca) = new_ca();
    let dir = tmp.path().join("ca");
    let before = std::fs::read(dir.join(CA_KEY_FILE)).unwrap();
    let err = Ca::init(&dir, TD).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists(_)), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(dir.join(CA_KEY_FILE)).unwrap(), before);

    // Any one CA file is enough to refuse.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join(TOKEN_KEY_FILE), b"x").unwrap();
    assert!(matches!(
        Ca::init(&other, TD),
        Err(CaError::AlreadyExists(_))
    ));
}

#[test]
fn init_rejects_a_bad_trust_domain_and_load_needs_a_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Ca::init(tmp.path(), "Bad Domain").unwrap_err();
    assert!(matches!(err, CaError::InvalidTrustDomain { .. }), "{err}");
    let err = Ca::load(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("weft-ca init"), "{err}");
}

#[test]
fn private_files_are_0600() {
    let (tmp, ca) = new_ca();
    let dir = tmp.path().join("ca");
    assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&dir.join(TOKEN_KEY_FILE)), 0o600);

    let out = tmp.path().join("out/nested");
    ca.issue(ID, Duration::from_secs(3600))
        .unwrap()
        .write_to(&out)
        .unwrap();
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    assert!(out.join("cert.pem").is_file() && out.join("bundle.pem").is_file());
    // Rewriting (renewal) keeps the mode.
    ca.issue(ID, Duration::from_secs(3600))
        .unwrap()
        .write_to(&out)
        .unwrap();
    assert_eq!(mode(&out.join("key.pem")), 0o600);
}

#[test]
fn issued_leaf_follows_the_spiffe_profile() {
    let (_tmp, ca) = new_ca();
    let before = SystemTime::now();
    let issued = ca.issue(ID, Duration::from_secs(3600)).unwrap();
    assert_spiffe_leaf(&issued.cert_chain_pem, &ca.bundle_pem(), ID);
    assert_eq!(issued.bundle_pem, ca.bundle_pem());
    assert_eq!(issued.serial_hex.len(), 32);
    let lifetime = issued.not_after.duration_since(before).unwrap();
    assert!(lifetime > Duration::from_secs(3598) && lifetime <= Duration::from_secs(3601));

    // The key matches the certificate.
    let key = KeyPair::from_pem(&issued.key_pem).unwrap();
    let leaf_der = der(&issued.cert_chain_pem);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    // Backdated for clock skew.
    let skew = leaf.validity().not_after - leaf.validity().not_before;
    assert!(skew.unwrap().whole_seconds() >= 3600 + 299);

    let second = ca.issue(ID, Duration::from_secs(3600)).unwrap();
    assert_ne!(second.serial_hex, issued.serial_hex);
}

#[test]
fn ids_outside_the_trust_domain_are_rejected() {
    let (_tmp, ca) = new_ca();
    let ttl = Duration::from_secs(60);
    let err = ca
        .issue("spiffe://evil.org/ns/default/sa/x", ttl)
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignIdentity { .. }), "{err}");
    assert!(matches!(
        ca.issue("spiffe://example.org", ttl),
        Err(CaError::InvalidSpiffeId { .. })
    ));
    assert!(matches!(
        ca.issue("https://example.org/x", ttl),
        Err(CaError::InvalidSpiffeId { .. })
    ));
    assert!(matches!(
        ca.token("spiffe://evil.org/x", ttl),
        Err(CaError::ForeignIdentity { .. })
    ));
    assert!(matches!(
        ca.issue(ID, Duration::ZERO),
        Err(CaError::InvalidTtl(_))
    ));
    assert!(matches!(
        ca.issue(ID, Duration::from_secs(100 * 365 * 86400)),
        Err(CaError::InvalidTtl(_))
    ));
}

#[test]
fn sign_csr_uses_only_the_public_key() {
    let (_tmp, ca) = new_ca();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let id = SpiffeId::parse(ID).unwrap();
    let issued = ca.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap();
    assert!(issued.key_pem.is_empty());
    assert_spiffe_leaf(&issued.cert_chain_pem, &ca.bundle_pem(), ID);
    let leaf_der = der(&issued.cert_chain_pem);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert_eq!(
        leaf.subject().iter().count(),
        0,
        "the CSR's subject is ignored"
    );

    let foreign = SpiffeId::parse("spiffe://evil.org/ns/a/sa/b").unwrap();
    assert!(matches!(
        ca.sign_csr(&csr, &foreign, Duration::from_secs(60)),
        Err(CaError::ForeignIdentity { .. })
    ));
}

#[test]
fn sign_csr_rejects_garbage_tampered_and_non_p256_requests() {
    let (_tmp, ca) = new_ca();
    let id = SpiffeId::parse(ID).unwrap();
    let ttl = Duration::from_secs(60);
    for garbage in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        assert!(
            matches!(ca.sign_csr(garbage, &id, ttl), Err(CaError::BadCsr(_))),
            "{garbage:?}"
        );
    }

    // Flip a byte of the signature: the self-signature must not verify.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let mut bytes = csr.der().to_vec();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x01;
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    let err = ca.sign_csr(&tampered, &id, ttl).unwrap_err();
    assert!(matches!(err, CaError::BadCsr(_)), "{err}");

    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&p384)
        .unwrap()
        .pem()
        .unwrap();
    let err = ca.sign_csr(&csr, &id, ttl).unwrap_err();
    assert!(err.to_string().contains("P-256"), "{err}");
}

#[test]
fn bundle_pem_prefers_bundle_file() {
    let (tmp, ca) = new_ca();
    let dir = tmp.path().join("ca");
    let other = Ca::init(&tmp.path().join("other"), TD).unwrap();
    let both = format!("{}{}", ca.bundle_pem(), other.bundle_pem());
    std::fs::write(dir.join(BUNDLE_FILE), &both).unwrap();
    let loaded = Ca::load(&dir).unwrap();
    assert_eq!(
        CertificateDer::pem_slice_iter(loaded.bundle_pem().as_bytes()).count(),
        2
    );
    assert_eq!(
        loaded
            .issue(ID, Duration::from_secs(60))
            .unwrap()
            .bundle_pem,
        loaded.bundle_pem()
    );
}

#[test]
fn token_round_trip() {
    let (_tmp, ca) = new_ca();
    let token = ca.token(ID, Duration::from_secs(3600)).unwrap();
    assert!(token.starts_with("weft1."));
    assert_eq!(ca.verify_token(&token).unwrap().as_str(), ID);
    assert_ne!(
        token,
        ca.token(ID, Duration::from_secs(3600)).unwrap(),
        "nonce"
    );
}

#[test]
fn forged_tampered_and_malformed_tokens_are_rejected() {
    let (_tmp, ca) = new_ca();
    let (_tmp2, other) = new_ca();
    let forged = other.token(ID, Duration::from_secs(3600)).unwrap();
    let err = ca.verify_token(&forged).unwrap_err();
    assert!(matches!(err, CaError::ForgedToken), "{err}");
    assert!(err.to_string().contains("not issued by this CA"));

    // Swap in claims for another identity, keeping the MAC.
    let token = ca.token(ID, Duration::from_secs(3600)).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let claims = format!(
        r#"{{"sub":"spiffe://example.org/ns/default/sa/admin","exp":{},"nonce":"x"}}"#,
        u64::MAX / 2
    );
    let tampered = format!("weft1.{}.{}", URL_SAFE_NO_PAD.encode(claims), parts[2]);
    assert!(matches!(
        ca.verify_token(&tampered),
        Err(CaError::ForgedToken)
    ));
    let mut flipped = token.clone().into_bytes();
    let i = flipped.len() - 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    assert!(ca.verify_token(&flipped).is_err());

    for bad in [
        "",
        "weft1",
        "weft1.abc",
        "weft2.abc.def",
        "weft1.abc.!!!",
        &"a".repeat(10_000),
    ] {
        let err = ca.verify_token(bad).unwrap_err();
        assert!(
            matches!(err, CaError::MalformedToken(_) | CaError::ForgedToken),
            "{bad}: {err}"
        );
    }
}

#[test]
fn expired_tokens_are_rejected() {
    let (_tmp, ca) = new_ca();
    let now = SystemTime::now();
    let token = ca.token_at(ID, Duration::from_secs(60), now).unwrap();
    assert!(ca
        .verify_token_at(&token, now + Duration::from_secs(59))
        .is_ok());
    let err = ca
        .verify_token_at(&token, now + Duration::from_secs(61))
        .unwrap_err();
    assert!(matches!(err, CaError::ExpiredToken { .. }), "{err}");
    assert!(err.to_string().contains("weft-ca token"), "{err}");
    // Minted in the past, verified now.
    let old = ca
        .token_at(ID, Duration::from_secs(60), now - Duration::from_secs(3600))
        .unwrap();
    assert!(matches!(
        ca.verify_token(&old),
        Err(CaError::ExpiredToken { .. })
    ));
}

#[test]
fn a_token_for_another_trust_domain_maps_to_403() {
    let (tmp, ca) = new_ca();
    let dir = tmp.path().join("ca");
    let token = ca.token(ID, Duration::from_secs(60)).unwrap();
    // Same token secret, different trust domain: the identity is foreign now.
    std::fs::write(dir.join(CA_CONFIG_FILE), r#"{"trust_domain": "other.org"}"#).unwrap();
    let moved = Ca::load(&dir).unwrap();
    let err = moved.verify_token(&token).unwrap_err();
    assert!(matches!(err, CaError::ForeignIdentity { .. }), "{err}");
    assert_eq!(err.http_status(), 403);
    assert_eq!(CaError::ForgedToken.http_status(), 401);
    assert_eq!(CaError::BadCsr(String::new()).http_status(), 400);
}

#[test]
fn single_use_tokens_are_redeemed_once_and_remembered() {
    let (tmp, ca) = new_ca();
    let dir = tmp.path().join("ca");
    let ttl = Duration::from_secs(300);
    let once = ca.token_with(ID, ttl, true).unwrap();
    assert_eq!(
        ca.verify_token(&once).unwrap().as_str(),
        ID,
        "verify redeems nothing"
    );
    assert_eq!(ca.verify_token(&once).unwrap().as_str(), ID);
    assert_eq!(ca.redeem_token(&once).unwrap().as_str(), ID);
    for err in [ca.redeem_token(&once), ca.verify_token(&once)] {
        let err = err.unwrap_err();
        assert!(matches!(err, CaError::TokenAlreadyUsed), "{err}");
        assert_eq!(err.http_status(), 401);
    }
    // A restart remembers.
    let reloaded = Ca::load(&dir).unwrap();
    assert!(matches!(
        reloaded.redeem_token(&once),
        Err(CaError::TokenAlreadyUsed)
    ));
    // Another single-use token is unaffected; multi-use tokens never run out.
    let other = ca.token_with(ID, ttl, true).unwrap();
    reloaded.redeem_token(&other).unwrap();
    let multi = ca.token(ID, ttl).unwrap();
    for _ in 0..3 {
        reloaded.redeem_token(&multi).unwrap();
    }
    // Multi-use tokens keep their old format (no "single" claim).
    let claims = multi.split('.').nth(1).unwrap();
    let claims = String::from_utf8(URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert!(!claims.contains("single"), "{claims}");
}

#[test]
fn redeemed_tokens_are_forgotten_once_expired() {
    let (tmp, ca) = new_ca();
    let dir = tmp.path().join("ca");
    let t0 = SystemTime::now() - Duration::from_secs(3600);
    let token = ca
        .token_with_at(ID, Duration::from_secs(1800), true, t0)
        .unwrap();
    ca.redeem_token_at(&token, t0 + Duration::from_secs(1))
        .unwrap();
    assert_eq!(ca.used_tokens().len(), 1);
    // Loaded now, the token has expired: its entry is dropped, and the
    // token is refused for expiry instead.
    let reloaded = Ca::load(&dir).unwrap();
    assert_eq!(reloaded.used_tokens().len(), 0);
    assert!(matches!(
        reloaded.redeem_token(&token),
        Err(CaError::ExpiredToken { .. })
    ));
}

#[test]
fn secret_files_readable_by_others_are_refused() {
    let (tmp, _ca) = new_ca();
    let dir = tmp.path().join("ca");
    for name in [CA_KEY_FILE, TOKEN_KEY_FILE] {
        let path = dir.join(name);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Ca::load(&dir).unwrap_err();
        assert!(matches!(err, CaError::InsecureFile { .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert!(err.to_string().contains(name), "{err}");
        // Read-only for the owner is fine (a Kubernetes Secret, mode 0400).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        Ca::load(&dir).unwrap();
    }
    // The key is never in the Debug output.
    let key = std::fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap();
    let debug = format!("{:?}", Ca::load(&dir).unwrap());
    assert!(!debug.contains(key.lines().nth(1).unwrap()), "{debug}");
}

#[test]
fn renewal_chains_are_checked_at_the_given_time() {
    let (_tmp, ca) = new_ca();
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let issued = ca.issue(ID, Duration::from_secs(3600)).unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let roots = ca.bundle().roots.clone();
    let at = |offset: i64| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs((now + offset) as u64))
    };
    let check = |offset| peer::verify_renewal_chain(&provider, &chain, &roots, TD, at(offset));
    assert_eq!(check(0).unwrap().as_str(), ID);
    assert_eq!(check(3500).unwrap().as_str(), ID);
    let err = check(3700).unwrap_err();
    assert!(err.to_string().contains("expired at"), "{err}");
    // Backdated five minutes for clock skew, not more.
    check(-200).unwrap();
    let err = check(-400).unwrap_err();
    assert!(err.to_string().contains("not valid before"), "{err}");
    assert_eq!(err.http_status(), 401);
    let err =
        peer::verify_renewal_chain(&provider, &chain, &roots, "other.org", at(0)).unwrap_err();
    assert!(err.to_string().contains("other.org"), "{err}");
    assert!(peer::verify_renewal_chain(&provider, &[], &roots, TD, at(0)).is_err());
}

#[test]
fn refresh_bundle_applies_each_change_once() {
    let (tmp, ca) = new_ca();
    let dir = tmp.path().join("ca");
    let own = ca.bundle_pem();
    assert!(!ca.refresh_bundle().unwrap(), "nothing changed");
    let other = Ca::init(&tmp.path().join("other"), TD).unwrap();
    std::fs::write(
        dir.join(BUNDLE_FILE),
        format!("{own}{}", other.bundle_pem()),
    )
    .unwrap();
    assert!(ca.refresh_bundle().unwrap());
    assert!(!ca.refresh_bundle().unwrap());
    assert_eq!(ca.bundle_certs().len(), 2);
    // A root CA without bundle.pem trusts its own root alone.
    std::fs::remove_file(dir.join(BUNDLE_FILE)).unwrap();
    assert!(ca.refresh_bundle().unwrap());
    assert_eq!(ca.bundle_pem(), own);
    // A bundle without our root is refused, once; the last good one stays.
    std::fs::write(dir.join(BUNDLE_FILE), other.bundle_pem()).unwrap();
    let err = ca.refresh_bundle().unwrap_err();
    assert!(err.to_string().contains("weft-ca trust add"), "{err}");
    assert!(
        !ca.refresh_bundle().unwrap(),
        "the same bad file is not retried"
    );
    assert_eq!(ca.bundle_pem(), own);
}

#[test]
fn an_intermediate_needs_its_root_in_the_bundle() {
    let (tmp, root) = new_ca();
    let dir = tmp.path().join("intermediate");
    let inter = root
        .create_intermediate(&dir, Duration::from_secs(86400))
        .unwrap();
    assert_eq!(inter.kind(), CaKind::Intermediate);
    // Leaves are sent with the intermediate and not past its expiry.
    let issued = inter.issue(ID, Duration::from_secs(3600)).unwrap();
    let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_spiffe_leaf(
        &issued.cert_chain_pem,
        &std::fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap(),
        ID,
    );
    assert!(matches!(
        inter.issue(ID, Duration::from_secs(2 * 86400)),
        Err(CaError::InvalidTtl(_))
    ));
    assert!(matches!(
        root.create_intermediate(&dir, Duration::from_secs(60)),
        Err(CaError::AlreadyExists(_))
    ));

    let other = Ca::init(&tmp.path().join("other"), TD).unwrap();
    std::fs::write(dir.join(BUNDLE_FILE), other.bundle_pem()).unwrap();
    let err = Ca::load(&dir).unwrap_err();
    assert!(err.to_string().contains("signed the intermediate"), "{err}");
    std::fs::remove_file(dir.join(BUNDLE_FILE)).unwrap();
    let err = Ca::load(&dir).unwrap_err();
    assert!(err.to_string().contains("bundle.pem"), "{err}");
}
