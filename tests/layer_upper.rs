//! Reading overlayfs upper dirs: rootless notation, id maps, and refusing what a layer
//! cannot represent.

use std::fs;
use std::path::{Path, PathBuf};

use ferry::layer::{
    directory_entries, EntryKind, IdMapping, LayerEntry, OverlayXattrs, UpperDirOptions,
};

fn find<'a>(entries: &'a [LayerEntry], p: &str) -> Vec<&'a LayerEntry> {
    entries.iter().filter(|e| e.path == Path::new(p)).collect()
}

#[test]
fn rootless_upper_dirs_use_user_xattrs_and_id_maps() {
    let t = tempfile::tempdir().unwrap();
    let up = t.path();
    fs::create_dir_all(up.join("opaque")).unwrap();
    xattr::set(up.join("opaque"), "user.overlay.opaque", b"y").unwrap();
    fs::create_dir_all(up.join("not-opaque")).unwrap();
    // In a rootless mount the trusted namespace is not overlay's: not an opaque marker.
    xattr::set(up.join("not-opaque"), "trusted.overlay.opaque", b"y").unwrap();
    fs::write(up.join("xwhiteout"), "").unwrap();
    xattr::set(up.join("xwhiteout"), "user.overlay.whiteout", b"").unwrap();
    fs::write(up.join("mine"), "data").unwrap();
    std::os::unix::fs::chown(up.join("mine"), Some(1000), Some(1000)).unwrap();
    for p in ["opaque", "not-opaque", "xwhiteout"] {
        std::os::unix::fs::chown(up.join(p), Some(1000), Some(1000)).unwrap();
    }
    let _sock = std::os::unix::net::UnixListener::bind(up.join("sock")).unwrap();
    std::os::unix::fs::chown(up.join("sock"), Some(1000), Some(1000)).unwrap();

    let opts = UpperDirOptions {
        overlay_xattrs: OverlayXattrs::User,
        uid_map: vec![IdMapping { container: 0, host: 1000, size: 1 }],
        gid_map: vec![IdMapping { container: 0, host: 1000, size: 1 }],
    };
    let entries = directory_entries(up, &opts).unwrap();

    let opaque = find(&entries, "/opaque");
    assert_eq!(opaque.len(), 2);
    assert!(opaque.iter().any(|e| e.kind == EntryKind::OpaqueWhiteout));
    assert!(opaque.iter().any(|e| e.kind == EntryKind::Dir && e.xattrs.is_empty()));
    let not_opaque = find(&entries, "/not-opaque");
    assert_eq!(not_opaque.len(), 1);
    assert!(not_opaque[0].xattrs.is_empty(), "overlay xattrs never go into a layer");
    assert_eq!(find(&entries, "/xwhiteout")[0].kind, EntryKind::Whiteout);
    let mine = find(&entries, "/mine")[0];
    assert_eq!((mine.uid, mine.gid), (0, 0), "host uid 1000 is container root");
    assert!(find(&entries, "/sock").is_empty(), "sockets are skipped");

    // An owner outside the map is an error naming the file.
    std::os::unix::fs::chown(up.join("mine"), Some(4242), Some(1000)).unwrap();
    let err = directory_entries(up, &opts).unwrap_err().to_string();
    assert!(err.contains("mine") && err.contains("4242"), "{err}");
}

#[test]
fn redirect_and_metacopy_upper_dirs_are_refused() {
    for key in ["redirect", "metacopy"] {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("moved")).unwrap();
        xattr::set(t.path().join("moved"), format!("trusted.overlay.{key}"), b"/old").unwrap();
        let err = directory_entries(t.path(), &UpperDirOptions::default()).unwrap_err().to_string();
        assert!(err.contains("moved") && err.contains(key), "{err}");
    }
}

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn the_walk_stays_inside_the_upper_dirs_filesystem() {
    let t = tempfile::tempdir().unwrap();
    let up = t.path().join("upper");
    fs::create_dir_all(up.join("mnt")).unwrap();
    fs::write(up.join("own"), "x").unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(up.join("mnt"))
        .status()
        .unwrap();
    assert!(st.success());
    let _m = Mount(up.join("mnt"));
    fs::write(up.join("mnt/foreign"), "y").unwrap();

    let entries = directory_entries(&up, &UpperDirOptions::default()).unwrap();
    let paths: Vec<_> = entries.iter().map(|e| e.path.display().to_string()).collect();
    assert!(paths.contains(&"/own".to_string()), "{paths:?}");
    assert!(!paths.iter().any(|p| p.contains("foreign")), "{paths:?}");
}
