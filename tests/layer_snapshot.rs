//! Snapshots: extracted once, atomically, shared by racing callers.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use ferry::layer::{
    ensure_snapshot, pack_entries, snapshot_id, Epoch, LayerCompression, LayerEntry, LayerError,
    LayerOptions, PackedLayer,
};

fn layer() -> (PackedLayer, Vec<u8>) {
    pack_entries(
        vec![
            LayerEntry::dir("/etc"),
            LayerEntry::bytes("/etc/conf", "v=1"),
            LayerEntry::whiteout("/etc/old"),
            LayerEntry::opaque_whiteout("/var/lib"),
            LayerEntry::bytes("/big", vec![7u8; 3 * 1024 * 1024]),
        ],
        &LayerOptions { source_date_epoch: Epoch::Clamp(0), compression: LayerCompression::Zstd },
        Vec::new(),
    )
    .unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn a_snapshot_is_extracted_once_in_overlay_form() {
    let t = tempfile::tempdir().unwrap();
    let (snaps, tmp) = (t.path().join("snapshots"), t.path().join("tmp"));
    let (p, blob) = layer();
    let id = snapshot_id(&p.diff_id);
    assert_eq!(id.len(), 12);

    let dir = ensure_snapshot(&snaps, &tmp, &id, || Ok(&blob[..])).unwrap();
    assert_eq!(dir, snaps.join(&id));
    assert_eq!(fs::read(dir.join("etc/conf")).unwrap(), b"v=1");
    let wh = fs::symlink_metadata(dir.join("etc/old")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(xattr::get(dir.join("var/lib"), "trusted.overlay.opaque").unwrap().unwrap(), b"y");
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
    assert!(names(&tmp).is_empty(), "no leftovers in tmp");

    // Present: the blob is not even opened again.
    let again =
        ensure_snapshot(&snaps, &tmp, &id, || -> io::Result<&[u8]> { panic!("must not reopen") })
            .unwrap();
    assert_eq!(again, dir);
}

#[test]
fn racing_callers_get_the_same_snapshot_extracted_once() {
    let t = tempfile::tempdir().unwrap();
    let (snaps, tmp) = (t.path().join("snapshots"), t.path().join("tmp"));
    let (p, blob) = layer();
    let id = snapshot_id(&p.diff_id);
    let blob = Arc::new(blob);
    let start = Arc::new(Barrier::new(4));
    let opened = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (snaps, tmp, id, blob, start, opened) = (
                snaps.clone(),
                tmp.clone(),
                id.clone(),
                blob.clone(),
                start.clone(),
                opened.clone(),
            );
            std::thread::spawn(move || {
                // Everyone asks at the same moment.
                start.wait();
                ensure_snapshot(&snaps, &tmp, &id, || {
                    opened.fetch_add(1, Ordering::SeqCst);
                    Ok(io::Cursor::new(blob.to_vec()))
                })
                .unwrap()
            })
        })
        .collect();
    let dirs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(dirs.iter().all(|d| d == &snaps.join(&id)));
    assert_eq!(opened.load(Ordering::SeqCst), 1, "the others waited for the first");
    let snapshot_dirs: Vec<String> =
        names(&snaps).into_iter().filter(|n| snaps.join(n).is_dir()).collect();
    assert_eq!(snapshot_dirs, vec![id.clone()]);
    assert_eq!(names(&snaps.join(&id)), vec!["big", "etc", "var"]);
    assert!(names(&tmp).is_empty(), "nothing left behind");
}

/// A reader that fails half-way, as a crash or a bad disk would leave things.
struct FailingReader<'a> {
    inner: &'a [u8],
    left: usize,
}

impl Read for FailingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..n])?;
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn a_failed_extraction_leaves_no_snapshot_and_no_garbage() {
    let t = tempfile::tempdir().unwrap();
    let (snaps, tmp) = (t.path().join("snapshots"), t.path().join("tmp"));
    let (p, blob) = layer();
    let id = snapshot_id(&p.diff_id);
    let err = ensure_snapshot(&snaps, &tmp, &id, || {
        Ok(FailingReader { inner: &blob[..], left: blob.len() / 2 })
    })
    .unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert!(!snaps.join(&id).exists());
    assert!(names(&tmp).is_empty());

    // Opening the blob failing is reported as such.
    let err = ensure_snapshot(&snaps, &tmp, &id, || -> io::Result<&[u8]> {
        Err(io::Error::new(io::ErrorKind::NotFound, "no such blob"))
    })
    .unwrap_err();
    assert!(err.to_string().contains("opening the layer blob"), "{err}");
}

#[test]
fn a_blob_that_is_not_the_snapshots_layer_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (snaps, tmp) = (t.path().join("snapshots"), t.path().join("tmp"));
    let (_, blob) = layer();
    let err = ensure_snapshot(&snaps, &tmp, "0123456789ab", || Ok(&blob[..])).unwrap_err();
    assert!(matches!(err, LayerError::Snapshot { .. }), "{err}");
    assert!(!snaps.join("0123456789ab").exists());
    assert!(names(&tmp).is_empty());

    for bad in ["../x", "short", "0123456789AB", ""] {
        let err = ensure_snapshot(&snaps, &tmp, bad, || Ok(&blob[..])).unwrap_err();
        assert!(err.to_string().contains("hex"), "{bad}: {err}");
    }
}

#[test]
fn a_snapshot_made_before_a_reboot_and_maybe_not_on_disk_is_extracted_again() {
    let t = tempfile::tempdir().unwrap();
    let (snaps, tmp) = (t.path().join("snapshots"), t.path().join("tmp"));
    let (p, blob) = layer();
    let id = snapshot_id(&p.diff_id);
    let dir = ensure_snapshot(&snaps, &tmp, &id, || Ok(&blob[..])).unwrap();
    let marker = snaps.join(format!("{id}.unsynced"));
    // The first extraction's background sync removes its marker when done; tampering before
    // that would race it (it could remove the marker this test writes next).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while marker.exists() {
        assert!(std::time::Instant::now() < deadline, "the background sync never finished");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // Marked by another boot (a crash may have lost its data): torn content is replaced.
    fs::write(&marker, "another-boot").unwrap();
    fs::write(dir.join("etc/conf"), "torn").unwrap();
    let again = ensure_snapshot(&snaps, &tmp, &id, || Ok(&blob[..])).unwrap();
    assert_eq!(fs::read(again.join("etc/conf")).unwrap(), b"v=1");

    // Marked by this boot, or not marked (known to be on disk): used as it is.
    let this_boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    for marked in [Some(this_boot.trim()), None] {
        match marked {
            Some(boot) => fs::write(&marker, boot).unwrap(),
            None => {
                let _ = fs::remove_file(&marker);
            }
        }
        let used = ensure_snapshot(&snaps, &tmp, &id, || -> io::Result<&[u8]> {
            panic!("a trusted snapshot is not extracted again")
        })
        .unwrap();
        assert_eq!(used, dir);
    }
    assert!(names(&tmp).is_empty(), "no leftovers in tmp");
}
