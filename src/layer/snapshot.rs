//! Extracted layers shared as overlayfs lower dirs: `snapshots/<short diffID>`, created
//! once (under a per-layer lock), atomically, and read-only afterwards. A snapshot is not
//! synced before use; `<id>.unsynced` marks it until a background sync has written it back,
//! and a marked snapshot from before a reboot is extracted again.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

use super::compress::decompress;
use super::extract::{extract_layer, ExtractMode};
use super::LayerError;
use crate::digest::{Digest, HashingReader};

/// Create `dir` (and missing parents) or tighten it to mode 0700. Snapshots hold what base
/// images put in them, owners and modes kept: setuid-root programs and, when extracted as
/// root, device nodes. Reachable by other users of the machine, those would hand them the
/// image author's programs running as root and raw access to devices; so, as containerd
/// and docker keep their snapshot roots, only the store's owner may enter.
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7700))?;
    }
    Ok(())
}

/// Length of the ids [`snapshot_id`] gives: overlay lowerdir options live in one page,
/// so short paths allow deep images.
pub const SNAPSHOT_ID_LEN: usize = 12;

/// The snapshot id of a layer: the first 12 hex digits of its diffID.
pub fn snapshot_id(diff_id: &Digest) -> String {
    diff_id.hex()[..SNAPSHOT_ID_LEN].to_string()
}

/// Make sure `snapshots_dir/<id>` holds the layer extracted in
/// [`ExtractMode::OverlayLower`] form, and return that path.
///
/// `id` is a prefix of the layer's diffID (see [`snapshot_id`]); `open` is called only when
/// the snapshot is missing and returns the layer blob in any compression. The content is
/// checked against `id` while it is extracted. Extraction happens in a fresh directory
/// under `tmp_dir` (same filesystem as `snapshots_dir`), marked as not yet on disk, and is
/// then renamed into place; callers for the same layer wait on its lock and then find it.
/// A killed process leaves only garbage in `tmp_dir`.
pub fn ensure_snapshot<R: Read>(
    snapshots_dir: &Path,
    tmp_dir: &Path,
    id: &str,
    open: impl FnOnce() -> io::Result<R>,
) -> Result<PathBuf, LayerError> {
    let fail = |reason: String| LayerError::Snapshot { id: id.to_string(), reason };
    let io_fail = |context: &str, source| LayerError::SnapshotIo {
        id: id.to_string(),
        context: context.to_string(),
        source,
    };
    if id.len() < SNAPSHOT_ID_LEN
        || id.len() > 64
        || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(fail(format!(
            "a snapshot id is {SNAPSHOT_ID_LEN} to 64 lowercase hex digits of the layer's diffID"
        )));
    }
    // Before looking: a store made before snapshots were private is tightened too.
    private_dir(snapshots_dir).map_err(|e| io_fail("creating the snapshots directory", e))?;
    let target = snapshots_dir.join(id);
    let boot = boot_id();
    if is_dir(&target).map_err(|e| io_fail("looking for the snapshot", e))?
        && trusted(snapshots_dir, id, &boot)
    {
        return Ok(target);
    }
    // Extraction happens in a tempdir below, which is 0700 like `private_dir`.
    fs::create_dir_all(tmp_dir).map_err(|e| io_fail("creating the temporary directory", e))?;
    // One extraction per layer at a time; a second caller waits and then finds it done.
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(snapshots_dir.join(format!("{id}.lock")))
        .map_err(|e| io_fail("opening the snapshot's lock", e))?;
    lock.lock().map_err(|e| io_fail("locking the snapshot", e))?;
    if is_dir(&target).map_err(|e| io_fail("looking for the snapshot", e))? {
        if trusted(snapshots_dir, id, &boot) {
            return Ok(target);
        }
        // Made before a reboot and maybe never written back to disk: extract it again.
        tracing::info!(snapshot = id, "re-extracting a layer snapshot made before the last boot");
        let trash = tempfile::Builder::new()
            .prefix(&format!("stale-{id}-"))
            .tempdir_in(tmp_dir)
            .map_err(|e| io_fail("creating a temporary directory", e))?;
        fs::rename(&target, trash.path().join("root"))
            .map_err(|e| io_fail("moving a stale snapshot away", e))?;
    } else if fs::symlink_metadata(&target).is_ok() {
        return Err(fail(format!("`{}` exists but is not a directory", target.display())));
    }

    // Dropped (and removed) on every path that does not rename it into place.
    let tmp = tempfile::Builder::new()
        .prefix(&format!("snapshot-{id}-"))
        .tempdir_in(tmp_dir)
        .map_err(|e| io_fail("creating a temporary directory", e))?;
    let staging = tmp.path().join("root");
    fs::create_dir(&staging).map_err(|e| io_fail("creating the staging directory", e))?;
    // The lower dir's root; 0755 whatever the umask.
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))
        .map_err(|e| io_fail("setting the staging directory's mode", e))?;

    let blob = open().map_err(|e| io_fail("opening the layer blob", e))?;
    let (_, tar) = decompress(blob).map_err(LayerError::Read)?;
    let mut hashing = HashingReader::new(tar);
    extract_layer(&mut hashing, &staging, ExtractMode::OverlayLower)?;
    let (diff_id, _) = hashing.finish();
    if !diff_id.hex().starts_with(id) {
        return Err(fail(format!(
            "the layer blob has diffID {diff_id}, which is not this snapshot"
        )));
    }

    // Not synced here: syncfs waits for every dirty page of the filesystem, seconds on a
    // busy machine. Instead the snapshot is marked with this boot's id until a background
    // sync has written it back; a marked snapshot found after a reboot may have lost data in
    // a crash and is extracted again (see `trusted`).
    let marker = marker_path(snapshots_dir, id);
    write_marker(tmp.path(), &marker, &boot).map_err(|e| io_fail("marking the snapshot", e))?;
    match renameat2(AT_FDCWD, &staging, AT_FDCWD, &target, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => {
            sync_in_background(snapshots_dir.to_path_buf(), marker, boot);
            Ok(target)
        }
        // Another process extracted the same layer first: its result is ours.
        Err(Errno::EEXIST | Errno::ENOTEMPTY) => Ok(target),
        Err(Errno::EXDEV) => Err(fail(format!(
            "`{}` and `{}` must be on the same filesystem",
            tmp_dir.display(),
            snapshots_dir.display()
        ))),
        Err(e) => Err(io_fail("moving the snapshot into place", e.into())),
    }
}

fn is_dir(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(m.is_dir()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `snapshots/<id>.unsynced`: present while the snapshot may not be on disk yet, holding
/// the boot id it was made under.
fn marker_path(snapshots_dir: &Path, id: &str) -> PathBuf {
    snapshots_dir.join(format!("{id}.unsynced"))
}

/// Put the marker in place durably, staged in `staging` (the extraction's temporary
/// directory) so that a process killed meanwhile leaves nothing beside the snapshots.
fn write_marker(staging: &Path, marker: &Path, boot: &str) -> io::Result<()> {
    let tmp = staging.join("unsynced");
    fs::write(&tmp, boot.as_bytes())?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, marker)?;
    if let Some(dir) = marker.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// This boot of the machine (empty where the kernel does not say: then no snapshot is
/// ever distrusted for a reboot, the old behaviour of trusting a completed rename).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A snapshot can be used if it is known to be on disk (no marker) or was made during this
/// boot (its data is in the page cache even if not yet written back).
fn trusted(snapshots_dir: &Path, id: &str, boot: &str) -> bool {
    match fs::read_to_string(marker_path(snapshots_dir, id)) {
        Ok(made_under) => made_under == boot,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Write the new snapshot back to disk and then drop its marker, without making the build
/// wait. If the process exits first, the marker stays: only a reboot makes that matter.
fn sync_in_background(snapshots_dir: PathBuf, marker: PathBuf, boot: String) {
    std::thread::spawn(move || {
        let Ok(dir) = fs::File::open(&snapshots_dir) else { return };
        if nix::unistd::syncfs(&dir).is_ok() && fs::read_to_string(&marker).is_ok_and(|b| b == boot)
        {
            let _ = fs::remove_file(&marker);
            let _ = dir.sync_all();
        }
    });
}

/// The name prefix of a snapshot being deleted.
const DOOMED: &str = ".doomed-";

/// Remove the snapshots `keep` does not want, with their lock and marker files; returns
/// their ids. The caller holds the store's gc lock, so no build is using one.
pub fn prune_snapshots(
    snapshots_dir: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(snapshots_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(DOOMED) {
            // Left by a prune that was killed.
            fs::remove_dir_all(entry.path())?;
            continue;
        }
        let id = name.split('.').next().unwrap_or_default().to_string();
        if keep(&id) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            // Out of sight first, so that a kill mid-way leaves no half snapshot in place.
            let doomed = snapshots_dir.join(format!("{DOOMED}{id}"));
            fs::rename(entry.path(), &doomed)?;
            fs::remove_dir_all(&doomed)?;
            removed.push(id);
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshots_directory_is_made_and_kept_private() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/snapshots");
        private_dir(&fresh).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        let old = tmp.path().join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&old).unwrap();
        assert_eq!(fs::metadata(&old).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
