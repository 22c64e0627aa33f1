//! The CA's CSR handling: arbitrary PEM text, and arbitrary DER wrapped in
//! a well-formed PEM block, are refused with an error or signed; never a
//! panic. A signed certificate always carries the identity the CA chose.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use weft_transport::spiffe::SpiffeId;

fn ca() -> &'static weft_ca::Ca {
    static CA: OnceLock<(tempfile_dir::Dir, weft_ca::Ca)> = OnceLock::new();
    &CA.get_or_init(|| {
        let dir = tempfile_dir::Dir::new();
        let ca = weft_ca::Ca::init(&dir.0, "fuzz.test").expect("init CA");
        (dir, ca)
    })
    .1
}

mod tempfile_dir {
    /// A directory for the fuzzing CA, unique per process.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!("weft-fuzz-ca-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Dir(p)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let id = SpiffeId::parse("spiffe://fuzz.test/ns/fuzz/sa/target").expect("id");
    let pem = match data.split_first() {
        // DER inside a valid PEM envelope reaches the ASN.1 parser.
        Some((0, der)) => pem_block(der),
        _ => match std::str::from_utf8(data) {
            Ok(s) => s.to_string(),
            Err(_) => return,
        },
    };
    if let Ok(issued) = ca().sign_csr(&pem, &id, Duration::from_secs(60)) {
        assert!(issued.cert_chain_pem.contains("BEGIN CERTIFICATE"));
        assert!(issued.key_pem.is_empty());
    }
});

fn pem_block(der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    let mut line = 0;
    for chunk in der.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
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
