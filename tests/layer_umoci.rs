//! umoci as the independent reader: it must accept ferry's layers in a hand-written OCI
//! layout and apply their whiteouts to the same tree ferry's own Apply extraction gives.

mod layer_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ferry::layer::{
    decompress, extract_layer, pack_directory, pack_entries, Epoch, ExtractMode, LayerCompression,
    LayerEntry, LayerOptions, PackedLayer, UpperDirOptions,
};
use layer_support::{describe_tree, run, write_oci_layout};

const EPOCH: i64 = 1_700_000_000;

fn mknod_whiteout(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) }, 0);
}

fn layers(compression: LayerCompression, t: &Path) -> Vec<(PackedLayer, Vec<u8>)> {
    let opts = LayerOptions { source_date_epoch: Epoch::Clamp(EPOCH), compression };
    let base = pack_entries(
        vec![
            LayerEntry::dir("/etc"),
            LayerEntry::bytes("/etc/keep", "keep"),
            LayerEntry::bytes("/etc/remove-me", "bye"),
            LayerEntry::dir("/opt/dir/sub"),
            LayerEntry::dir("/opt"),
            LayerEntry::dir("/opt/dir"),
            LayerEntry::bytes("/opt/dir/a", "a"),
            LayerEntry::bytes("/opt/dir/sub/b", "b"),
            LayerEntry::dir("/bin"),
            LayerEntry::bytes("/bin/tool", "#!/bin/sh\n").with_mode(0o755).with_owner(1000, 1000),
            LayerEntry::hardlink("/bin/tool2", "/bin/tool"),
            LayerEntry::symlink("/bin/sh", "busybox"),
        ],
        &opts,
        Vec::new(),
    )
    .unwrap();

    // A RUN step's upper dir: deletes a file, replaces /opt/dir wholesale, adds files.
    let upper = t.join(format!("upper-{compression}"));
    fs::create_dir_all(upper.join("etc")).unwrap();
    mknod_whiteout(&upper.join("etc/remove-me"));
    fs::write(upper.join("etc/new"), "new").unwrap();
    fs::create_dir_all(upper.join("opt/dir")).unwrap();
    xattr::set(upper.join("opt/dir"), "trusted.overlay.opaque", b"y").unwrap();
    fs::write(upper.join("opt/dir/c"), "c").unwrap();
    fs::set_permissions(upper.join("opt/dir/c"), fs::Permissions::from_mode(0o640)).unwrap();
    let top = pack_directory(&upper, &UpperDirOptions::default(), &opts, Vec::new()).unwrap();
    vec![base, top]
}

fn check(compression: LayerCompression) {
    let t = tempfile::tempdir().unwrap();
    let layers = layers(compression, t.path());
    let layout = t.path().join("layout");
    write_oci_layout(&layout, &layers);

    let mut image = format!("{}:test", layout.display());
    if compression == LayerCompression::Zstd {
        // umoci 0.4 predates zstd layers: let skopeo (containers/image, an independent
        // zstd reader that checks every blob digest) convert the image to gzip first.
        let converted = t.path().join("converted");
        let dst = format!("oci:{}:test", converted.display());
        run(
            "skopeo",
            &["copy", "--dest-compress-format", "gzip", &format!("oci:{image}"), &dst],
            None,
        );
        image = format!("{}:test", converted.display());
    }
    let bundle = t.path().join("bundle");
    run("umoci", &["unpack", "--image", &image, bundle.to_str().unwrap()], None);
    let rootfs = bundle.join("rootfs");

    let theirs = describe_tree(&rootfs);
    let expected = [
        "bin dir 755 0:0",
        "bin/sh symlink -> busybox 777 0:0",
        "bin/tool file",
        "bin/tool2 file",
        "etc dir 755 0:0",
        "etc/keep file",
        "etc/new file",
        "opt dir 755 0:0",
        "opt/dir dir",
        "opt/dir/c file",
    ];
    assert_eq!(theirs.len(), expected.len(), "{theirs:#?}");
    for (line, want) in theirs.iter().zip(expected) {
        assert!(line.starts_with(want), "{line} vs {want}\n{theirs:#?}");
    }
    assert!(theirs.iter().any(|l| l.starts_with("bin/tool file") && l.ends_with("755 1000:1000")));
    assert!(theirs.iter().any(|l| l.starts_with("opt/dir/c file") && l.contains(" 640 ")));

    // ferry's own Apply extraction of the same blobs gives the same tree.
    let ours_root = t.path().join("ours");
    fs::create_dir(&ours_root).unwrap();
    for (_, blob) in &layers {
        let (_, tar) = decompress(&blob[..]).unwrap();
        extract_layer(tar, &ours_root, ExtractMode::Apply).unwrap();
    }
    assert_eq!(describe_tree(&ours_root), theirs);
}

#[test]
fn umoci_unpacks_gzip_layers_and_applies_whiteouts() {
    check(LayerCompression::Gzip);
}

#[test]
fn umoci_unpacks_uncompressed_layers_and_applies_whiteouts() {
    check(LayerCompression::None);
}

#[test]
fn umoci_unpacks_zstd_layers_and_applies_whiteouts() {
    check(LayerCompression::Zstd);
}
