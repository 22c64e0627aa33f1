//! The properties the fuzz targets check, one function per target, shared by
//! cargo-fuzz (fuzz/fuzz_targets/*.rs call these and nothing else) and the
//! seeded mutation smoke in `cargo test` (tests/tests/fuzz_smoke.rs).
//!
//! Each function takes arbitrary bytes and panics when the property fails,
//! beyond "no panic" in the code under test. It returns whether the input
//! got past the parser, i.e. whether the round-trip checks ran: the smoke
//! uses that to keep promising mutants and to make sure its seeds still
//! reach those checks. cargo-fuzz ignores it.

use std::sync::OnceLock;
use std::time::Duration;

use weft_proxy::mesh::Mesh;
use weft_transport::datagram;
use weft_transport::preamble::{Request, Response};
use weft_transport::spiffe::SpiffeId;

/// A target's property: panics if it fails on the input; true if the input
/// got past the parser.
pub type Property = fn(&[u8]) -> bool;

/// Every target, by the name of its fuzz/fuzz_targets file and seeds folder.
pub const TARGETS: [(&str, Property); 4] = [
    ("preamble", preamble),
    ("mesh_file", mesh_file),
    ("spiffe_id", spiffe_id),
    ("ca_csr", ca_csr),
];

/// The L4 stream preamble, both directions, of every kind (TCP stream, UDP
/// flow), and the UDP flow datagram header: decoding never panics, and
/// whatever decodes re-encodes to what it was decoded from.
pub fn preamble(data: &[u8]) -> bool {
    let mut decoded = false;
    if let Ok((req, used)) = Request::decode(data) {
        decoded = true;
        assert!(used <= data.len());
        let again = req.encode().expect("a decoded request re-encodes");
        let (back, n) = Request::decode(&again).expect("re-decodes");
        assert_eq!(back, req);
        assert_eq!(n, again.len());
    }
    if let Ok((kind, req, used)) = Request::decode_kind(data) {
        decoded = true;
        assert!(used <= data.len());
        let again = req.encode_kind(kind).expect("a decoded request re-encodes");
        assert_eq!(Request::decode_kind(&again), Ok((kind, req, again.len())));
    }
    if let Ok(d) = datagram::decode(data) {
        // Not `decoded`: almost any bytes are a datagram (a varint, then
        // payload), so it says nothing about how deep an input got.
        assert!(d.payload.len() <= data.len());
        let again = datagram::encode(d.quarter_stream_id, d.payload);
        let back = datagram::decode(&again).expect("re-decodes");
        assert_eq!(
            (back.quarter_stream_id, back.payload),
            (d.quarter_stream_id, d.payload)
        );
    }
    if let Ok((resp, used)) = Response::decode(data) {
        decoded = true;
        assert!(used <= data.len());
        let again = resp.encode();
        let (back, n) = Response::decode(&again).expect("re-decodes");
        assert_eq!(back, resp);
        assert_eq!(n, again.len());
    }
    decoded
}

/// The mesh-file parser: any text gives a mesh or a list of errors, each
/// with a line inside the text; never a panic. A parsed mesh serializes
/// (admin `/config`) and resolves.
pub fn mesh_file(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    match Mesh::parse(text, "fuzz.toml") {
        Ok(mesh) => {
            let _ = serde_json::to_string(&mesh);
            let _ = mesh.resolved(&Default::default());
            true
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            let lines = text.lines().count().max(1);
            for e in &errors.0 {
                if let Some(line) = e.line {
                    assert!(line >= 1 && line <= lines + 1, "line {line} of {lines}");
                }
            }
            false
        }
    }
}

/// SPIFFE ID parsing: never panics; a parsed ID prints back as its input
/// and re-parses to itself; in its own trust domain it is accepted exactly
/// when it names a workload (has a path).
pub fn spiffe_id(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(id) = SpiffeId::parse(text) else {
        return false;
    };
    assert_eq!(id.as_str(), text);
    let again = SpiffeId::parse(id.as_str()).expect("re-parses");
    assert_eq!(again, id);
    assert!(id.as_str().starts_with("spiffe://"));
    assert!(!id.trust_domain().is_empty());
    let inside = SpiffeId::parse_in(text, id.trust_domain());
    assert_eq!(inside.is_ok(), !id.path().is_empty(), "{text:?}");
    true
}

/// The CA's CSR handling: arbitrary PEM text, and arbitrary DER (an input
/// whose first byte is 0) wrapped in a well-formed PEM block, are refused
/// with an error or signed; never a panic, and never a key in the answer.
pub fn ca_csr(data: &[u8]) -> bool {
    let id = SpiffeId::parse("spiffe://fuzz.test/ns/fuzz/sa/target").expect("id");
    let pem = match data.split_first() {
        // DER inside a valid PEM envelope reaches the ASN.1 parser.
        Some((0, der)) => pem_block(der),
        _ => match std::str::from_utf8(data) {
            Ok(s) => s.to_string(),
            Err(_) => return false,
        },
    };
    match ca().sign_csr(&pem, &id, Duration::from_secs(60)) {
        Ok(issued) => {
            assert!(issued.cert_chain_pem.contains("BEGIN CERTIFICATE"));
            assert!(issued.key_pem.is_empty());
            true
        }
        Err(_) => false,
    }
}

/// One CA per process. Its directory is removed once the CA is loaded:
/// signing works from memory, and a static is never dropped to clean up.
fn ca() -> &'static weft_ca::Ca {
    static CA: OnceLock<weft_ca::Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        weft_ca::Ca::init(&dir.path().join("ca"), "fuzz.test").expect("init CA")
    })
}

/// `der` as a PEM "CERTIFICATE REQUEST" block, 64 base64 characters a line.
fn pem_block(der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    let mut line = 0;
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
        line += 4;
        if line == 64 {
            out.push('\n');
            line = 0;
        }
    }
    out.push_str("\n-----END CERTIFICATE REQUEST-----\n");
    out
}
