//! Extraction: the overlay upper dir round trip, Apply semantics, and hostile archives.

mod layer_support;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use ferry::layer::{
    extract_layer, pack_directory, pack_entries, Epoch, ExtractMode, LayerCompression, LayerEntry,
    LayerError, LayerOptions, UpperDirOptions,
};
use layer_support::{describe_tree, raw_header, raw_tar, set_mtime};

const EPOCH: i64 = 1_700_000_000;

fn opts() -> LayerOptions {
    LayerOptions { source_date_epoch: Epoch::Clamp(EPOCH), compression: LayerCompression::None }
}

fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o644, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
}

/// An upper dir as overlayfs leaves it after a RUN step.
fn craft_upper(upper: &Path) {
    fs::create_dir_all(upper.join("etc")).unwrap();
    fs::write(upper.join("etc/new.conf"), "new").unwrap();
    mknod(&upper.join("etc/deleted"), libc::S_IFCHR, 0, 0);
    fs::create_dir_all(upper.join("var/cache/apt")).unwrap();
    xattr::set(upper.join("var/cache/apt"), "trusted.overlay.opaque", b"y").unwrap();
    fs::write(upper.join("var/cache/apt/fresh"), "fresh").unwrap();
    fs::create_dir_all(upper.join("usr/bin")).unwrap();
    fs::write(upper.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
    // chown first: it clears the setuid bit.
    std::os::unix::fs::chown(upper.join("usr/bin/tool"), Some(1000), Some(50)).unwrap();
    fs::set_permissions(upper.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    xattr::set(upper.join("usr/bin/tool"), "user.origin", b"run").unwrap();
    fs::hard_link(upper.join("usr/bin/tool"), upper.join("usr/bin/tool-alias")).unwrap();
    std::os::unix::fs::symlink("tool", upper.join("usr/bin/link")).unwrap();
    mknod(&upper.join("usr/fifo"), libc::S_IFIFO, 0, 0);
    mknod(&upper.join("usr/null"), libc::S_IFCHR, 1, 3);
    set_mtime(&upper.join("etc/new.conf"), EPOCH - 100);
}

#[test]
fn upper_dir_round_trips_through_overlay_lower_extraction() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    craft_upper(&upper);
    let (_, tar) =
        pack_directory(&upper, &UpperDirOptions::default(), &opts(), Vec::new()).unwrap();

    let dest = t.path().join("lower");
    fs::create_dir(&dest).unwrap();
    extract_layer(&tar[..], &dest, ExtractMode::OverlayLower).unwrap();

    let m = fs::symlink_metadata(dest.join("etc/deleted")).unwrap();
    assert!(m.file_type().is_char_device() && m.rdev() == 0, "whiteout is a 0/0 char device again");
    assert_eq!(
        xattr::get(dest.join("var/cache/apt"), "trusted.overlay.opaque").unwrap().unwrap(),
        b"y"
    );
    assert!(!dest.join("var/cache/apt/.wh..wh..opq").exists());
    let tool = fs::metadata(dest.join("usr/bin/tool")).unwrap();
    assert_eq!((tool.mode() & 0o7777, tool.uid(), tool.gid()), (0o4755, 1000, 50));
    assert_eq!(tool.ino(), fs::metadata(dest.join("usr/bin/tool-alias")).unwrap().ino());
    assert_eq!(xattr::get(dest.join("usr/bin/tool"), "user.origin").unwrap().unwrap(), b"run");
    assert_eq!(fs::read_link(dest.join("usr/bin/link")).unwrap(), Path::new("tool"));
    assert!(fs::symlink_metadata(dest.join("usr/fifo")).unwrap().file_type().is_fifo());
    assert_eq!(fs::symlink_metadata(dest.join("usr/null")).unwrap().rdev(), libc::makedev(1, 3));
    // mtimes: clamped to the epoch, kept when older.
    assert_eq!(fs::metadata(dest.join("etc/new.conf")).unwrap().mtime(), EPOCH - 100);
    assert_eq!(fs::metadata(dest.join("usr/bin")).unwrap().mtime(), EPOCH);

    // Packing the extracted lower dir again gives the very same layer.
    let (_, again) =
        pack_directory(&dest, &UpperDirOptions::default(), &opts(), Vec::new()).unwrap();
    assert!(tar == again, "upper → tar → lower → tar is stable");
}

/// The kernel as the independent reader: mount the extracted snapshots as overlay lower
/// dirs and look at the merged view.
#[test]
fn overlayfs_honours_extracted_whiteouts_and_opaque_dirs() {
    let t = tempfile::tempdir().unwrap();
    let base = pack_entries(
        vec![
            LayerEntry::dir("/etc"),
            LayerEntry::bytes("/etc/deleted", "old"),
            LayerEntry::bytes("/etc/kept", "kept"),
            LayerEntry::dir("/var/cache/apt"),
            LayerEntry::bytes("/var/cache/apt/stale", "stale"),
        ],
        &opts(),
        Vec::new(),
    )
    .unwrap()
    .1;
    let upper = t.path().join("upper");
    craft_upper(&upper);
    let top = pack_directory(&upper, &UpperDirOptions::default(), &opts(), Vec::new()).unwrap().1;

    let (l1, l2) = (t.path().join("l1"), t.path().join("l2"));
    for (tar, dir) in [(&base, &l1), (&top, &l2)] {
        fs::create_dir(dir).unwrap();
        extract_layer(&tar[..], dir, ExtractMode::OverlayLower).unwrap();
    }
    let merged = t.path().join("merged");
    fs::create_dir(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", l2.display(), l1.display());
    let out = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts, merged.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    let names = |p: &str| {
        let mut v: Vec<String> = fs::read_dir(merged.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let etc = names("etc");
    let apt = names("var/cache/apt");
    let tool = fs::read(merged.join("usr/bin/tool"));
    std::process::Command::new("umount").arg(&merged).status().unwrap();
    assert_eq!(etc, vec!["kept", "new.conf"]);
    assert_eq!(apt, vec!["fresh"]);
    assert_eq!(tool.unwrap(), b"#!/bin/sh\n");
}

#[test]
fn apply_mode_deletes_lower_files_but_keeps_the_layers_own() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("rootfs");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/deleted"), "old").unwrap();
    fs::write(root.join("etc/kept"), "kept").unwrap();
    fs::create_dir_all(root.join("var/cache/apt/sub")).unwrap();
    fs::write(root.join("var/cache/apt/stale"), "stale").unwrap();
    fs::write(root.join("var/cache/apt/sub/stale2"), "stale").unwrap();
    fs::create_dir_all(root.join("gone/deep")).unwrap();

    // Own files written both before and after the opaque marker must survive it.
    let mut parts = vec![
        (raw_header(b"var/cache/apt/sub/mine", b'0', 4, b""), &b"mine"[..]),
        (raw_header(b"var/cache/apt/.wh..wh..opq", b'0', 0, b""), &b""[..]),
        (raw_header(b"var/cache/apt/fresh", b'0', 5, b""), &b"fresh"[..]),
        (raw_header(b"etc/.wh.deleted", b'0', 0, b""), &b""[..]),
        (raw_header(b".wh.gone", b'0', 0, b""), &b""[..]),
        (raw_header(b"etc/new", b'0', 3, b""), &b"new"[..]),
    ];
    // A whiteout of a file this same layer creates does not delete it.
    parts.push((raw_header(b"etc/.wh.new", b'0', 0, b""), &b""[..]));
    let tar = raw_tar(&parts);
    extract_layer(&tar[..], &root, ExtractMode::Apply).unwrap();

    let tree: Vec<String> = describe_tree(&root)
        .into_iter()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(
        tree,
        vec![
            "etc",
            "etc/kept",
            "etc/new",
            "var",
            "var/cache",
            "var/cache/apt",
            "var/cache/apt/fresh",
            "var/cache/apt/sub",
            "var/cache/apt/sub/mine"
        ]
    );
}

#[test]
fn a_gzip_layer_is_verified_to_its_end() {
    let (_, mut blob) = pack_entries(
        vec![LayerEntry::bytes("/f", "z".repeat(5000))],
        &LayerOptions { source_date_epoch: Epoch::Clamp(0), compression: LayerCompression::Gzip },
        Vec::new(),
    )
    .unwrap();
    // Corrupt the CRC in the gzip trailer: the tar itself is intact.
    let n = blob.len();
    blob[n - 6] ^= 0xff;
    let t = tempfile::tempdir().unwrap();
    let (_, r) = ferry::layer::decompress(&blob[..]).unwrap();
    let err = extract_layer(r, t.path(), ExtractMode::Apply).unwrap_err();
    assert!(matches!(err, LayerError::Read(_)), "{err}");
}

// ---- hostile archives -------------------------------------------------------------

struct Hostile {
    _tmp: tempfile::TempDir,
    dest: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn hostile_setup() -> Hostile {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let outside = tmp.path().join("outside");
    fs::create_dir(&dest).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), "original").unwrap();
    Hostile { _tmp: tmp, dest, outside }
}

impl Hostile {
    fn outside_untouched(&self) {
        let mut names: Vec<_> =
            fs::read_dir(&self.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec!["victim"], "nothing created outside dest");
        assert_eq!(fs::read(self.outside.join("victim")).unwrap(), b"original");
        assert!(!self.outside.parent().unwrap().join("escaped").exists());
    }
}

/// Each case: an archive built from raw headers (given the fixture, so it can name the
/// outside directory), and words the error must contain; in both modes.
fn hostile_case(build: impl Fn(&Hostile) -> Vec<u8>, want: &[&str]) {
    for mode in [ExtractMode::OverlayLower, ExtractMode::Apply] {
        let h = hostile_setup();
        let tar = build(&h);
        let err = extract_layer(&tar[..], &h.dest, mode).expect_err("hostile archive must fail");
        let msg = err.to_string();
        for w in want {
            assert!(msg.contains(w), "{mode:?}: error {msg:?} should contain {w:?}");
        }
        h.outside_untouched();
    }
}

fn o(h: &Hostile) -> Vec<u8> {
    h.outside.as_os_str().as_encoded_bytes().to_vec()
}

#[test]
fn dotdot_paths_are_refused() {
    hostile_case(
        |_| raw_tar(&[(raw_header(b"../escaped", b'0', 1, b""), b"x")]),
        &["../escaped", "`..`"],
    );
    hostile_case(
        |_| raw_tar(&[(raw_header(b"a/../../outside/victim", b'0', 1, b""), b"x")]),
        &["a/../../outside/victim", "`..`"],
    );
}

#[test]
fn absolute_paths_are_made_relative() {
    for mode in [ExtractMode::OverlayLower, ExtractMode::Apply] {
        let h = hostile_setup();
        let mut name = o(&h);
        name.extend_from_slice(b"/victim");
        let tar = raw_tar(&[(raw_header(&name, b'0', 5, b""), b"owned")]);
        extract_layer(&tar[..], &h.dest, mode).unwrap();
        let inside = h.dest.join(h.outside.strip_prefix("/").unwrap()).join("victim");
        assert_eq!(fs::read(inside).unwrap(), b"owned");
        h.outside_untouched();
    }
}

#[test]
fn writing_through_a_symlink_out_of_dest_is_refused() {
    // Absolute symlink to a real directory outside, then a file below it.
    hostile_case(
        |h| {
            raw_tar(&[
                (raw_header(b"link", b'2', 0, &o(h)), b""),
                (raw_header(b"link/victim", b'0', 5, b""), b"owned"),
            ])
        },
        &["link/victim", "symlink"],
    );
    // Relative symlink climbing out.
    hostile_case(
        |_| {
            raw_tar(&[
                (raw_header(b"up", b'2', 0, b"../../../../../../../../.."), b""),
                (raw_header(b"up/escaped", b'0', 1, b""), b"x"),
            ])
        },
        &["up/escaped", "symlink"],
    );
    // Via a directory entry and a nested symlink.
    hostile_case(
        |h| {
            raw_tar(&[
                (raw_header(b"d/", b'5', 0, b""), b""),
                (raw_header(b"d/l", b'2', 0, &o(h)), b""),
                (raw_header(b"d/l/sub/", b'5', 0, b""), b""),
            ])
        },
        &["d/l/sub", "symlink"],
    );
}

#[test]
fn a_symlink_from_a_lower_layer_is_resolved_inside_dest() {
    // In Apply mode the rootfs legitimately holds absolute symlinks (`/var/run -> /run`);
    // they are followed as inside the container, never on the host.
    let h = hostile_setup();
    std::os::unix::fs::symlink(&h.outside, h.dest.join("lowerlink")).unwrap();
    let inside_target = h.dest.join(h.outside.strip_prefix("/").unwrap());
    fs::create_dir_all(&inside_target).unwrap();
    let tar = raw_tar(&[(raw_header(b"lowerlink/victim", b'0', 5, b""), b"owned")]);
    extract_layer(&tar[..], &h.dest, ExtractMode::Apply).unwrap();
    assert_eq!(fs::read(inside_target.join("victim")).unwrap(), b"owned");
    h.outside_untouched();
}

#[test]
fn a_file_replacing_a_symlink_does_not_write_through_it() {
    for mode in [ExtractMode::OverlayLower, ExtractMode::Apply] {
        let h = hostile_setup();
        let mut target = o(&h);
        target.extend_from_slice(b"/victim");
        let tar = raw_tar(&[
            (raw_header(b"f", b'2', 0, &target), b""),
            (raw_header(b"f", b'0', 5, b""), b"owned"),
        ]);
        extract_layer(&tar[..], &h.dest, mode).unwrap();
        let m = fs::symlink_metadata(h.dest.join("f")).unwrap();
        assert!(m.is_file());
        assert_eq!(fs::read(h.dest.join("f")).unwrap(), b"owned");
        h.outside_untouched();
    }
}

#[test]
fn hard_links_out_of_dest_or_to_nothing_are_refused() {
    hostile_case(
        |_| raw_tar(&[(raw_header(b"hl", b'1', 0, b"../outside/victim"), b"")]),
        &["hl", "`..`"],
    );
    // Absolute: made relative to dest, where it does not exist.
    hostile_case(
        |h| {
            let mut t = o(h);
            t.extend_from_slice(b"/victim");
            raw_tar(&[(raw_header(b"hl", b'1', 0, &t), b"")])
        },
        &["hl", "does not exist"],
    );
    hostile_case(
        |_| raw_tar(&[(raw_header(b"hl", b'1', 0, b"missing"), b"")]),
        &["hl", "does not exist"],
    );
    // Through a symlink the archive made.
    hostile_case(
        |h| {
            raw_tar(&[
                (raw_header(b"l", b'2', 0, &o(h)), b""),
                (raw_header(b"hl", b'1', 0, b"l/victim"), b""),
            ])
        },
        &["hl", "symlink"],
    );
    hostile_case(
        |_| {
            raw_tar(&[
                (raw_header(b"d/", b'5', 0, b""), b""),
                (raw_header(b"hl", b'1', 0, b"d"), b""),
            ])
        },
        &["hl", "directory"],
    );
}

#[test]
fn a_hard_link_to_a_symlink_links_the_symlink_not_its_target() {
    let h = hostile_setup();
    let mut target = o(&h);
    target.extend_from_slice(b"/victim");
    let tar = raw_tar(&[
        (raw_header(b"s", b'2', 0, &target), b""),
        (raw_header(b"hl", b'1', 0, b"s"), b""),
        // Writing to the link name must replace it, not write into the outside file.
        (raw_header(b"hl", b'0', 5, b""), b"owned"),
    ]);
    extract_layer(&tar[..], &h.dest, ExtractMode::Apply).unwrap();
    h.outside_untouched();
}

#[test]
fn replacing_the_root_and_bogus_whiteouts_are_refused() {
    hostile_case(
        |h| raw_tar(&[(raw_header(b"./", b'2', 0, &o(h)), b"")]),
        &["destination directory"],
    );
    hostile_case(|_| raw_tar(&[(raw_header(b"a/.wh...", b'0', 0, b""), b"")]), &["whiteout"]);
}

#[test]
fn corrupt_and_oversized_headers_are_errors() {
    // Bad checksum.
    hostile_case(
        |_| {
            let mut hd = raw_header(b"ok", b'0', 1, b"");
            hd[0] = b'x';
            raw_tar(&[(hd, b"x")])
        },
        &["checksum"],
    );
    // A PAX header claiming 8 GiB (its data would be read into memory by a naive reader).
    hostile_case(
        |_| {
            let mut v = raw_header(b"PaxHeaders/x", b'x', (1 << 33) - 1, b"").to_vec();
            v.extend_from_slice(&[b'1'; 4096]);
            v
        },
        &["exceeds"],
    );
    // A size field that is not a number.
    hostile_case(
        |_| {
            let mut hd = raw_header(b"f", b'0', 0, b"");
            hd[124..136].copy_from_slice(b"99999999999\0");
            layer_support::fix_checksum(&mut hd);
            raw_tar(&[(hd, b"")])
        },
        &["size"],
    );
    // Truncated data, after a good entry: the error names where it was.
    hostile_case(
        |_| {
            let mut v = raw_tar(&[(raw_header(b"good", b'0', 1, b""), b"x")]);
            v.truncate(1024);
            v.extend_from_slice(&raw_header(b"big", b'0', 100_000, b""));
            v.extend_from_slice(&[0u8; 1000]);
            v
        },
        &["truncated", "in entry `big`"],
    );
    // A PAX record whose length lies.
    hostile_case(
        |_| {
            let rec = b"99 path=x\n";
            let hd = raw_header(b"PaxHeaders/x", b'x', rec.len() as u64, b"");
            let mut v = raw_tar(&[(hd, rec)]);
            v.truncate(1024);
            v.extend_from_slice(&raw_header(b"f", b'0', 0, b""));
            v.extend_from_slice(&[0u8; 1024]);
            v
        },
        &["PAX"],
    );
}

#[test]
fn pax_path_with_dotdot_is_refused() {
    hostile_case(
        |_| {
            let rec = b"22 path=../../escaped\n";
            raw_tar(&[
                (raw_header(b"PaxHeaders/x", b'x', rec.len() as u64, b""), &rec[..]),
                (raw_header(b"harmless", b'0', 1, b""), b"x"),
            ])
        },
        &["../../escaped"],
    );
}

#[test]
fn gnu_longname_to_outside_is_refused() {
    hostile_case(
        |_| {
            let name = b"../../../escaped\0";
            raw_tar(&[
                (raw_header(b"././@LongLink", b'L', name.len() as u64, b""), &name[..]),
                (raw_header(b"harmless", b'0', 1, b""), b"x"),
            ])
        },
        &["../../../escaped"],
    );
}
