//! Helpers shared by the layer integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use ferry::digest::Digest;
use ferry::layer::PackedLayer;

/// Run a tool, assert it succeeded, return its stdout.
pub fn run(cmd: &str, args: &[&str], cwd: Option<&Path>) -> String {
    let mut c = Command::new(cmd);
    c.args(args).env("TZ", "UTC").env("LC_ALL", "C");
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = c.output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A raw ustar header block, written field by field so that tests can build archives the
/// `tar` crate would refuse (`..`, absolute names, anything).
pub fn raw_header(name: &[u8], typeflag: u8, size: u64, linkname: &[u8]) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..name.len()].copy_from_slice(name);
    let octal = |b: &mut [u8; 512], off: usize, width: usize, v: u64| {
        let s = format!("{:0w$o}\0", v, w = width - 1);
        b[off..off + width].copy_from_slice(s.as_bytes());
    };
    octal(&mut b, 100, 8, 0o644);
    octal(&mut b, 108, 8, 0);
    octal(&mut b, 116, 8, 0);
    octal(&mut b, 124, 12, size);
    octal(&mut b, 136, 12, 0);
    b[156] = typeflag;
    b[157..157 + linkname.len()].copy_from_slice(linkname);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    fix_checksum(&mut b);
    b
}

pub fn fix_checksum(b: &mut [u8; 512]) {
    b[148..156].copy_from_slice(b"        ");
    let sum: u64 = b.iter().map(|&c| u64::from(c)).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
}

/// An archive from (header, data) pairs, data padded, with the end blocks.
pub fn raw_tar(parts: &[([u8; 512], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (h, data) in parts {
        out.extend_from_slice(h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Write a minimal OCI image layout (by hand, from the spec) holding one image of the
/// given layers, tagged `test`.
pub fn write_oci_layout(dir: &Path, layers: &[(PackedLayer, Vec<u8>)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> Digest {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
        d
    };
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for (p, blob) in layers {
        assert_eq!(put(blob), p.blob_digest);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|(p, _)| p.diff_id.to_string()).collect::<Vec<_>>(),
        },
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": layers.iter().map(|(p, _)| serde_json::json!({
            "mediaType": p.media_type,
            "digest": p.blob_digest.to_string(),
            "size": p.blob_size,
        })).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest.to_string(),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": "test" },
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Set a file's mtime (not following symlinks).
pub fn set_mtime(p: &Path, secs: i64) {
    filetime::set_symlink_file_times(
        p,
        filetime::FileTime::from_unix_time(secs, 0),
        filetime::FileTime::from_unix_time(secs, 0),
    )
    .unwrap();
}

/// A listing of a tree that an independent reader can be compared on: type, mode, owner,
/// size or link target, and content digest, one line per path, sorted.
pub fn describe_tree(root: &Path) -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.unwrap();
        let m = e.path().symlink_metadata().unwrap();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        let ft = m.file_type();
        let what = if ft.is_file() {
            format!("file {}", Digest::of(&std::fs::read(e.path()).unwrap()).short())
        } else if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("symlink -> {}", std::fs::read_link(e.path()).unwrap().display())
        } else if ft.is_char_device() {
            format!("char {}:{}", libc::major(m.rdev()), libc::minor(m.rdev()))
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else {
            "other".to_string()
        };
        out.push(format!("{rel} {what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()));
    }
    out
}
