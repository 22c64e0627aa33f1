//! Mutual TLS for the mesh: our identity (swappable at run time), the trust
//! bundle, and the verifiers that admit only peers with a certificate that
//! chains to the bundle and carries exactly one `spiffe://<our trust domain>/…`
//! URI SAN. TLS 1.3 only, aws-lc-rs provider (X25519MLKEM768 key exchange is
//! preferred by default).
//!
//! Both directions use the same check ([`MeshTls::verify_peer`]); the server
//! side *requires* a client certificate. DNS names are never consulted: the
//! identity is the SPIFFE ID.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::spiffe::{SpiffeError, SpiffeId};

/// ALPN for HTTP requests carried as HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";
/// ALPN for raw TCP streams (see [`crate::preamble`]).
pub const ALPN_L4: &[u8] = b"weft-l4";

/// Errors loading or using credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what}: {source}")]
    Pem {
        what: &'static str,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(&'static str),
    #[error("our certificate is unusable: {0}")]
    BadIdentity(String),
    #[error("trust bundle: {0}")]
    BadBundle(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain, its private key and the trust bundle, as PEM.
#[derive(Clone)]
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub bundle: Vec<CertificateDer<'static>>,
}

impl Credentials {
    /// Parse PEM text: `chain_pem` leaf first, `key_pem` PKCS#8/SEC1, `bundle_pem` one or more roots.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], bundle_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = certs_from_pem(chain_pem, "certificate chain")?;
        let bundle = certs_from_pem(bundle_pem, "trust bundle")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem {
            what: "private key",
            source,
        })?;
        Ok(Credentials {
            chain,
            key: Arc::new(key),
            bundle,
        })
    }
}

fn certs_from_pem(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

/// The identity this sidecar presents and the bundle it trusts. Both can be
/// replaced at run time ([`MeshTls::update`]); only new handshakes see the change.
pub struct MeshTls {
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    state: ArcSwap<State>,
}

struct State {
    key: Arc<CertifiedKey>,
    id: SpiffeId,
    not_before: Option<std::time::SystemTime>,
    not_after: Option<std::time::SystemTime>,
    serial: String,
    roots: RootCertStore,
    /// Session tickets (resumption and 0-RTT), per identity and bundle: a
    /// new certificate or bundle starts with empty caches, so no ticket
    /// outlives the credentials it was issued under (see [`Sessions`]).
    client_sessions: Arc<rustls::client::ClientSessionMemoryCache>,
    server_sessions: Arc<rustls::server::ServerSessionMemoryCache>,
}

/// Client tickets kept: one entry per peer (rustls keeps a few tickets
/// each); a sidecar talks to at most a few hundred peers.
const CLIENT_SESSIONS: usize = 1024;
/// Server sessions kept (stateful: a ticket is a key into this cache, and
/// taking it on use makes every ticket single-use, which is what stops a
/// replayed 0-RTT flight). Each holds the client's certificate chain (~2 KiB),
/// so at most ~8 MiB when full; the oldest are evicted first.
const SERVER_SESSIONS: usize = 4096;

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("trust_domain", &self.trust_domain)
            .field("id", &self.state.load().id.as_str())
            .finish()
    }
}

impl MeshTls {
    /// Build from credentials; our own certificate must hold a valid SPIFFE ID
    /// of `trust_domain` and chain to the bundle.
    pub fn new(trust_domain: &str, creds: &Credentials) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(provider());
        let state = build_state(&provider, trust_domain, creds)?;
        Ok(Arc::new(MeshTls {
            trust_domain: trust_domain.to_string(),
            provider,
            state: ArcSwap::from_pointee(state),
        }))
    }

    /// Replace our certificate, key and trust bundle atomically.
    pub fn update(&self, creds: &Credentials) -> Result<(), TlsError> {
        let state = build_state(&self.provider, &self.trust_domain, creds)?;
        self.state.store(Arc::new(state));
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Our current SPIFFE ID.
    pub fn identity(&self) -> SpiffeId {
        self.state.load().id.clone()
    }

    /// When our current certificate expires.
    pub fn not_after(&self) -> Option<std::time::SystemTime> {
        self.state.load().not_after
    }

    /// When our current certificate became valid.
    pub fn not_before(&self) -> Option<std::time::SystemTime> {
        self.state.load().not_before
    }

    /// Our current certificate's serial number, in hex.
    pub fn serial(&self) -> String {
        self.state.load().serial.clone()
    }

    /// How many roots the trust bundle holds (more than one during a rotation).
    pub fn bundle_roots(&self) -> usize {
        self.state.load().roots.len()
    }

    /// Check a peer's chain against the bundle for `usage` and return its SPIFFE ID.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let state = self.state.load();
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &state.roots.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(webpki_error)?;
        // webpki accepts a certificate through the whole second of its
        // not-after; our connections close at that instant (pool and
        // inbound), so a handshake in that second must fail too, or a peer
        // could reconnect with a certificate its last connection died of.
        let expired = std::iter::once(end_entity)
            .chain(intermediates)
            .filter_map(not_after_of)
            .filter_map(|end| end.duration_since(std::time::UNIX_EPOCH).ok())
            .any(|end| end.as_secs() <= now.as_secs());
        if expired {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
        }
        spiffe_id_of(end_entity, &self.trust_domain).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })
    }

    /// rustls server config: client certificates required, TLS 1.3 only.
    pub fn server_config(
        self: &Arc<Self>,
        alpns: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(PeerVerifier(self.clone())))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        // No session resumption here: a resumed session skips certificate
        // checks, which would let a peer outlive its certificate. The QUIC
        // endpoint resumes, and re-verifies ([`MeshTls::server_config_resumable`]).
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(cfg)
    }

    /// The server config of the QUIC endpoint: as [`MeshTls::server_config`]
    /// plus TLS 1.3 session tickets, so that known peers can resume and
    /// send 0-RTT data. Resumption skips the certificate verifier, so
    /// whoever uses this must check every connection with
    /// [`MeshTls::verify_connection`] (the endpoint does). Tickets are
    /// stateful and single-use (a replayed ClientHello finds its ticket gone
    /// and falls back to a full handshake, without early data), and are
    /// forgotten when our certificate or bundle changes.
    pub fn server_config_resumable(
        self: &Arc<Self>,
        alpns: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut cfg = self.server_config(alpns)?;
        cfg.session_storage = Arc::new(Sessions(self.clone()));
        cfg.send_tls13_tickets = 2;
        Ok(cfg)
    }

    /// The client config of the QUIC endpoint: as [`MeshTls::client_config`]
    /// plus session resumption and early data (see
    /// [`MeshTls::server_config_resumable`]). Tickets are kept per server
    /// name, so dial each peer with its own ([`server_name_for`]).
    pub fn client_config_resumable(
        self: &Arc<Self>,
        alpn: &[u8],
    ) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = self.client_config(alpn)?;
        cfg.resumption = rustls::client::Resumption::store(Arc::new(Sessions(self.clone())))
            .tls12_resumption(rustls::client::Tls12Resumption::Disabled);
        cfg.enable_early_data = true;
        Ok(cfg)
    }

    /// Check the peer of an established (or, on a server, resuming)
    /// connection as a full handshake would: a resumed session restores the
    /// peer's chain from the ticket without running the verifier, so the
    /// chain is verified here against the current bundle and clock. A peer
    /// whose certificate expired since the ticket was issued, or whose root
    /// left the bundle, is refused. `usage` is the peer's role:
    /// `client_auth` on a server, `server_auth` on a client.
    pub fn verify_connection(
        &self,
        conn: &quinn::Connection,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let certs = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let (leaf, intermediates) = certs
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verify_peer(leaf, intermediates, UnixTime::now(), usage)
    }

    /// rustls client config for one ALPN, presenting our certificate.
    pub fn client_config(self: &Arc<Self>, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(cfg)
    }
}

/// The TLS server name to dial `addr` with. It is never verified (the SPIFFE
/// ID is), but the client keeps session tickets per server name, so each
/// peer address needs its own: `h<ip in hex>-<port>.weft.peer`.
pub fn server_name_for(addr: std::net::SocketAddr) -> String {
    let ip: Vec<u8> = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let hex: String = ip.iter().map(|b| format!("{b:02x}")).collect();
    format!("h{hex}-{}.weft.peer", addr.port())
}

/// The session caches of the current [`State`], seen through the stable
/// `Arc<MeshTls>` that rustls configs hold.
#[derive(Debug)]
struct Sessions(Arc<MeshTls>);

impl rustls::server::StoresServerSessions for Sessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.state.load().server_sessions.put(key, value)
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.state.load().server_sessions.get(key)
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.state.load().server_sessions.take(key)
    }
    fn can_cache(&self) -> bool {
        true
    }
}

impl rustls::client::ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.0
            .state
            .load()
            .client_sessions
            .set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.0.state.load().client_sessions.kx_hint(server_name)
    }
    fn set_tls12_session(
        &self,
        _server_name: ServerName<'static>,
        _value: rustls::client::Tls12ClientSessionValue,
    ) {
        // TLS 1.3 only.
    }
    fn tls12_session(
        &self,
        _server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _server_name: &ServerName<'static>) {}
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.0
            .state
            .load()
            .client_sessions
            .insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.0
            .state
            .load()
            .client_sessions
            .take_tls13_ticket(server_name)
    }
}

/// The crypto provider every Weft TLS config uses: aws-lc-rs, whose default
/// key-exchange groups put the post-quantum hybrid X25519MLKEM768 first.
pub fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

fn build_state(
    provider: &CryptoProvider,
    trust_domain: &str,
    creds: &Credentials,
) -> Result<State, TlsError> {
    let leaf = creds
        .chain
        .first()
        .ok_or(TlsError::NoCertificate("certificate chain"))?;
    let id = spiffe_id_of(leaf, trust_domain).map_err(|e| TlsError::BadIdentity(e.to_string()))?;
    let not_after = not_after_of(leaf);
    let not_before = not_before_of(leaf);
    let serial = serial_of(leaf).unwrap_or_default();
    let key = CertifiedKey::from_der(creds.chain.clone(), creds.key.clone_key(), provider)
        .map_err(|e| TlsError::BadIdentity(format!("certificate and key do not match: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in &creds.bundle {
        roots
            .add(cert.clone())
            .map_err(|e| TlsError::BadBundle(e.to_string()))?;
    }
    // Our own certificate must be acceptable to our peers: check it now,
    // rather than failing every handshake later.
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| TlsError::BadIdentity(format!("{e:?}")))?;
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &roots.roots,
        &creds.chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| {
        TlsError::BadIdentity(format!("does not verify against the trust bundle: {e:?}"))
    })?;
    Ok(State {
        key: Arc::new(key),
        id,
        not_before,
        not_after,
        serial,
        roots,
        client_sessions: Arc::new(rustls::client::ClientSessionMemoryCache::new(
            CLIENT_SESSIONS,
        )),
        server_sessions: rustls::server::ServerSessionMemoryCache::new(SERVER_SESSIONS),
    })
}

/// Why a certificate does not carry an acceptable SPIFFE identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate cannot be parsed")]
    Unparsable,
    #[error("certificate must carry exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    Spiffe(#[from] SpiffeError),
}

/// The SPIFFE ID of a leaf certificate, which must be in `trust_domain`.
pub fn spiffe_id_of(
    cert: &CertificateDer<'_>,
    trust_domain: &str,
) -> Result<SpiffeId, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| IdentityError::Unparsable)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris.len() != 1 {
        return Err(IdentityError::UriSanCount(uris.len()));
    }
    Ok(SpiffeId::parse_in(uris[0], trust_domain)?)
}

/// The not-after time of a certificate, if it parses.
pub fn not_after_of(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// When the peer's credentials of an established QUIC connection stop being
/// valid: (the leaf's not-before, the earliest not-after in its chain). A
/// connection must not be used past that time.
pub fn peer_validity(
    conn: &quinn::Connection,
) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let not_before = not_before_of(certs.first()?)?;
    let not_after = certs.iter().filter_map(not_after_of).min()?;
    Some((not_before, not_after))
}

/// A certificate's serial number in lower-case hex, if it parses.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(
        parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// The not-before time of a certificate, if it parses.
pub fn not_before_of(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = u64::try_from(parsed.validity().not_before.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// The verified SPIFFE ID of the peer of an established QUIC connection.
pub fn peer_id(conn: &quinn::Connection, trust_domain: &str) -> Option<SpiffeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    spiffe_id_of(certs.first()?, trust_domain).ok()
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(WebpkiError(format!(
            "{other:?}"
        ))))),
    };
    rustls::Error::InvalidCertificate(ce)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WebpkiError(String);

/// Verifies peers in both roles.
#[derive(Debug)]
struct PeerVerifier(Arc<MeshTls>);

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_peer(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verify_peer(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(self)
    }
}

/// Presents our current certificate in both roles.
#[derive(Debug)]
struct Resolver(Arc<MeshTls>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.state.load().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.state.load().key.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_dns_names_one_per_peer_address() {
        let addrs = [
            "127.0.0.1:15008",
            "127.0.0.1:15009",
            "127.0.0.2:15008",
            "[::1]:15008",
        ];
        let names: Vec<String> = addrs
            .iter()
            .map(|a| server_name_for(a.parse().expect("address")))
            .collect();
        assert_eq!(names[0], "h7f000001-15008.weft.peer");
        for name in &names {
            let parsed = ServerName::try_from(name.as_str()).expect("valid server name");
            assert!(matches!(parsed, ServerName::DnsName(_)), "{name}");
        }
        let distinct: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
    }
}
