//! Layer tars → `extract_layer` into a fresh directory, in both modes. Whatever the archive,
//! extraction returns (an error is fine) and nothing appears outside the destination: the
//! destination holds symlinks to a sentinel directory beside it (absolute and relative),
//! which must stay empty, and the parent must hold nothing but the two.
#![no_main]

use std::path::Path;

use ferry::layer::{extract_layer, ExtractMode};
use libfuzzer_sys::fuzz_target;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, tar)) = data.split_first() else { return };
    let mode = if selector & 1 == 0 { ExtractMode::Apply } else { ExtractMode::OverlayLower };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dest = tmp.path().join("dest");
    let sentinel = tmp.path().join("sentinel");
    std::fs::create_dir(&dest).expect("dest");
    std::fs::create_dir(&sentinel).expect("sentinel");
    if mode == ExtractMode::Apply {
        // What a lower layer of a hostile image could have left in a rootfs.
        std::os::unix::fs::symlink(&sentinel, dest.join("abs")).expect("abs link");
        std::os::unix::fs::symlink("../sentinel", dest.join("rel")).expect("rel link");
        std::os::unix::fs::symlink("..", dest.join("up")).expect("up link");
    }
    let _ = extract_layer(tar, &dest, mode);
    assert_eq!(names(tmp.path()), ["dest", "sentinel"], "something was created beside dest");
    assert!(names(&sentinel).is_empty(), "something was written through a symlink");
    // Make sure the temp dir can be removed whatever modes the archive set.
    for e in walk(&dest) {
        let _ = std::fs::set_permissions(&e, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    }
});

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        i += 1;
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
    }
    out
}
