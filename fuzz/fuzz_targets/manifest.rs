//! images.toml text → `Manifest::parse_text`: any input is a manifest or a diagnostic, and
//! rendering that diagnostic (spans into the text) must not panic either.
#![no_main]

use std::path::Path;

use ferry::diagnostic::SourceFile;
use ferry::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = SourceFile::new("images.toml", text);
    match Manifest::parse_text(file, Path::new("/nonexistent-fuzz-root")) {
        Ok(manifest) => {
            for name in manifest.images.keys() {
                let _ = manifest.image_problem(name, "fuzz".into(), "here").location();
            }
        }
        Err(e) => {
            let _ = format!("{:?}", e.into_report());
        }
    }
});
