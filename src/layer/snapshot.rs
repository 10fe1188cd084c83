//! Extracted layers shared as overlayfs lower dirs: `snapshots/<short diffID>`, created
//! once, atomically, and read-only afterwards.

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
/// under `tmp_dir` (same filesystem as `snapshots_dir`), is synced to disk, and is then
/// renamed into place without replacing anything: a racing caller that loses simply
/// returns the winner's snapshot, and a crash leaves only garbage in `tmp_dir`.
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
    match fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => return Ok(target),
        Ok(_) => return Err(fail(format!("`{}` exists but is not a directory", target.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_fail("looking for the snapshot", e)),
    }
    // Extraction happens in a tempdir below, which is 0700 like `private_dir`.
    fs::create_dir_all(tmp_dir).map_err(|e| io_fail("creating the temporary directory", e))?;

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

    // Data before the rename: after a crash, a snapshot that exists is complete.
    let staging_dir =
        fs::File::open(&staging).map_err(|e| io_fail("opening the staging directory", e))?;
    nix::unistd::syncfs(&staging_dir)
        .map_err(|e| io_fail("syncing the snapshot to disk", e.into()))?;
    drop(staging_dir);

    match renameat2(AT_FDCWD, &staging, AT_FDCWD, &target, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => {
            if let Ok(d) = fs::File::open(snapshots_dir) {
                // Make the rename itself durable; failure only costs a re-extraction.
                let _ = d.sync_all();
            }
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
