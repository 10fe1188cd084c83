//! Layer tars as independent readers see them: GNU tar, gzip, zstd.

mod layer_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use ferry::digest::Digest;
use ferry::layer::{pack_entries, write_tar, Epoch, LayerCompression, LayerEntry, LayerOptions};
use layer_support::{run, set_mtime};

const EPOCH: i64 = 1_700_000_000;

fn opts(compression: LayerCompression) -> LayerOptions {
    LayerOptions { source_date_epoch: Epoch::Clamp(EPOCH), compression }
}

#[test]
fn gnu_tar_lists_order_owners_modes_and_clamped_mtimes() {
    let ctx = tempfile::tempdir().unwrap();
    let host = ctx.path().join("app.sh");
    fs::write(&host, "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&host, fs::Permissions::from_mode(0o600)).unwrap();
    set_mtime(&host, EPOCH + 5000);
    let old = ctx.path().join("old.txt");
    fs::write(&old, "old").unwrap();
    set_mtime(&old, 1_000_000_000);

    let entries = vec![
        // COPY --chown=1000:1000 --chmod=755 app.sh /app/bin/app.sh
        LayerEntry::from_host("/app/bin/app.sh", &host)
            .unwrap()
            .with_owner(1000, 1000)
            .with_mode(0o755),
        LayerEntry::from_host("/app/old.txt", &old).unwrap(),
        LayerEntry::dir("/app").with_owner(1000, 1000),
        LayerEntry::dir("/app/bin").with_owner(1000, 1000),
        LayerEntry::symlink("/app/current", "bin/app.sh"),
        LayerEntry::hardlink("/app/a-link", "/app/old.txt"),
        LayerEntry {
            kind: ferry::layer::EntryKind::CharDevice { major: 1, minor: 3 },
            ..LayerEntry::dir("/dev/null")
        }
        .with_mode(0o666),
        LayerEntry { kind: ferry::layer::EntryKind::Fifo, ..LayerEntry::dir("/run/fifo") }
            .with_mode(0o600),
        LayerEntry::whiteout("/etc/removed"),
        LayerEntry::opaque_whiteout("/var/cache"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("layer.tar");
    let (packed, file) =
        pack_entries(entries, &opts(LayerCompression::None), fs::File::create(&tar_path).unwrap())
            .unwrap();
    drop(file);
    assert_eq!(packed.diff_id, Digest::of(&fs::read(&tar_path).unwrap()));

    let listing = run(
        "tar",
        &["-tv", "--numeric-owner", "--full-time", "-f", tar_path.to_str().unwrap()],
        None,
    );
    let lines: Vec<Vec<&str>> = listing.lines().map(|l| l.split_whitespace().collect()).collect();
    let want: Vec<Vec<&str>> = vec![
        // The hard link's data goes to the name that comes first: a-link.
        vec!["drwxr-xr-x", "1000/1000", "0", "2023-11-14", "22:13:20", "app/"],
        vec!["-rw-r--r--", "0/0", "3", "2001-09-09", "01:46:40", "app/a-link"],
        vec!["drwxr-xr-x", "1000/1000", "0", "2023-11-14", "22:13:20", "app/bin/"],
        vec!["-rwxr-xr-x", "1000/1000", "18", "2023-11-14", "22:13:20", "app/bin/app.sh"],
        vec!["lrwxrwxrwx", "0/0", "0", "2023-11-14", "22:13:20", "app/current", "->", "bin/app.sh"],
        vec![
            "hrw-r--r--",
            "0/0",
            "0",
            "2001-09-09",
            "01:46:40",
            "app/old.txt",
            "link",
            "to",
            "app/a-link",
        ],
        vec!["crw-rw-rw-", "0/0", "1,3", "2023-11-14", "22:13:20", "dev/null"],
        vec!["-rw-------", "0/0", "0", "2023-11-14", "22:13:20", "etc/.wh.removed"],
        vec!["prw-------", "0/0", "0", "2023-11-14", "22:13:20", "run/fifo"],
        vec!["-rw-------", "0/0", "0", "2023-11-14", "22:13:20", "var/cache/.wh..wh..opq"],
    ];
    assert_eq!(lines, want, "{listing}");

    // No uname/gname, no atime/ctime (no PAX at all here), magic "ustar\0" "00".
    let bytes = fs::read(&tar_path).unwrap();
    assert!(!bytes.windows(6).any(|w| w == b"atime=" || w == b"ctime="));
    for block in bytes.chunks(512).take(1) {
        assert_eq!(&block[257..265], b"ustar\x0000");
        assert!(block[265..329].iter().all(|&c| c == 0), "uname/gname empty");
    }
}

/// Two builds of the same content whose files have different mtimes, all after the epoch,
/// and were listed in a different order, give byte-identical blobs.
#[test]
fn same_inputs_give_byte_identical_layers() {
    let build = |mtime: i64, reverse: bool| {
        let ctx = tempfile::tempdir().unwrap();
        let mut entries = Vec::new();
        for i in 0..50 {
            let p = ctx.path().join(format!("f{i}"));
            fs::write(&p, format!("content {i}").repeat(i * 100)).unwrap();
            set_mtime(&p, mtime + i as i64);
            entries.push(LayerEntry::from_host(format!("/data/f{i}"), &p).unwrap());
        }
        entries.push(LayerEntry::dir("/data").with_mtime(mtime));
        if reverse {
            entries.reverse();
        }
        let mut out = Vec::new();
        for c in [LayerCompression::None, LayerCompression::Gzip, LayerCompression::Zstd] {
            let (p, blob) = pack_entries(entries.clone(), &opts(c), Vec::new()).unwrap();
            out.push((p, blob));
        }
        out
    };
    let a = build(EPOCH + 10, false);
    let b = build(EPOCH + 99_999, true);
    for ((pa, ba), (pb, bb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        assert!(ba == bb, "{} blobs differ", pa.media_type);
    }
    // And the mtime does matter below the epoch: the check above can fail.
    let c = build(EPOCH - 10, false);
    assert_ne!(a[0].0.diff_id, c[0].0.diff_id);
}

#[test]
fn long_names_big_ids_and_xattrs_survive_gnu_tar() {
    let long_dir = format!("/{}/{}", "d".repeat(150), "e".repeat(120));
    let long_file = format!("{long_dir}/{}", "f".repeat(99));
    let long_target = format!("/{}", "t".repeat(200));
    let entries = vec![
        LayerEntry::dir(&long_dir),
        LayerEntry::bytes(&long_file, "long").with_owner(3_000_000, 4_000_000),
        LayerEntry::symlink("/s", &long_target),
        LayerEntry::bytes("/cap", "x").with_xattr("user.note", "hello").with_xattr(
            "security.capability",
            vec![1u8, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("l.tar");
    let mut f = fs::File::create(&tar_path).unwrap();
    write_tar(entries, Epoch::Clamp(EPOCH), &mut f).unwrap();
    drop(f);
    let tarp = tar_path.to_str().unwrap();

    let listing = run("tar", &["-tv", "--numeric-owner", "-f", tarp], None);
    assert!(listing.contains("3000000/4000000"), "{listing}");
    assert!(listing.contains(&long_file[1..]), "{listing}");
    assert!(listing.contains(&format!("s -> {long_target}")), "{listing}");

    let out = dir.path().join("x");
    fs::create_dir(&out).unwrap();
    run("tar", &["--xattrs", "--xattrs-include=*", "-xf", tarp, "-C", out.to_str().unwrap()], None);
    assert_eq!(fs::read(out.join(&long_file[1..])).unwrap(), b"long");
    assert_eq!(xattr::get(out.join("cap"), "user.note").unwrap().unwrap(), b"hello");
    assert_eq!(
        xattr::get(out.join("cap"), "security.capability").unwrap().unwrap()[..4],
        [1, 0, 0, 2]
    );
    assert_eq!(fs::read_link(out.join("s")).unwrap().to_str().unwrap(), long_target);
    let verbose = run("tar", &["--xattrs", "--xattrs-include=*", "-tvvf", tarp], None);
    assert!(verbose.contains("x: ") && verbose.contains("user.note"), "{verbose}");
}

#[test]
fn compressed_blobs_decode_with_the_standard_tools() {
    let entries = vec![LayerEntry::bytes("/a", "x".repeat(100_000)), LayerEntry::dir("/d")];
    let dir = tempfile::tempdir().unwrap();
    for (c, tool) in [(LayerCompression::Gzip, "gzip"), (LayerCompression::Zstd, "zstd")] {
        let (p, blob) = pack_entries(entries.clone(), &opts(c), Vec::new()).unwrap();
        let path = dir.path().join(format!("blob.{tool}"));
        fs::write(&path, &blob).unwrap();
        let out = std::process::Command::new(tool)
            .args(["-d", "-c", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{tool}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(Digest::of(&out.stdout), p.diff_id, "{tool}: diffID is the digest of the tar");
        assert_eq!(out.stdout.len() as u64, p.size);
        assert_eq!(Digest::of(&blob), p.blob_digest);
    }
    // gzip header: no name, no mtime.
    let (_, gz) = pack_entries(entries, &opts(LayerCompression::Gzip), Vec::new()).unwrap();
    let path = dir.path().join("g.gz");
    fs::write(&path, &gz).unwrap();
    let info = run("gzip", &["-lvN", path.to_str().unwrap()], None);
    assert!(!info.contains("layer"), "{info}");
    assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
}
