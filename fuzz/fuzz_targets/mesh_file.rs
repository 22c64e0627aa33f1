//! The mesh-file parser: any text gives a mesh or a list of errors, each
//! with a line inside the text; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_proxy::mesh::Mesh;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Mesh::parse(text, "fuzz.toml") {
        Ok(mesh) => {
            // A parsed mesh serializes (admin /config) and resolves.
            let _ = serde_json::to_string(&mesh);
            let _ = mesh.resolved(&Default::default());
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            let lines = text.lines().count().max(1);
            for e in &errors.0 {
                if let Some(line) = e.line {
                    assert!(line >= 1 && line <= lines + 1, "line {line} of {lines}");
                }
            }
        }
    }
});
