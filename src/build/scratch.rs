//! Scratch trees that a step reads instead of the real thing: the files a `COPY --from`
//! copies, and the sources of `RUN --mount=type=bind`. They live in the store's tmp
//! directory for one step and are deleted with their `TempDir`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::key::CacheKey;
use super::merged::MergedView;
use super::rootfs;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::Store;

/// The filesystem a `--from=` names: a stage, a sibling image or an external image.
pub struct FromSource {
    /// Identifies the content (a stage's key, or an image's manifest digest).
    pub key: CacheKey,
    pub layers: Vec<Descriptor>,
    pub diff_ids: Vec<Digest>,
}

/// A bind mount that cannot mount its source as it is.
pub enum BindFrom {
    /// `from=` a stage or image.
    Image(FromSource),
    /// A writable mount of the build context: it gets a copy.
    WritableContext,
}

fn scratch_dir(store: &Store, prefix: &str) -> Result<tempfile::TempDir, String> {
    let tmp = store.tmp_dir();
    fs::create_dir_all(&tmp).map_err(|e| format!("store tmp: {e}"))?;
    tempfile::Builder::new().prefix(prefix).tempdir_in(&tmp).map_err(|e| format!("store tmp: {e}"))
}

/// What a `COPY --from` of `sources` reads out of `src`: the paths up to each source's
/// first wildcard, with the symlinks on the way to them (hard links to the snapshots).
pub fn copy_sources(
    store: &Store,
    src: &FromSource,
    sources: &[String],
) -> Result<tempfile::TempDir, String> {
    let view = MergedView::open(store, &src.layers, &src.diff_ids)?;
    let scratch = scratch_dir(store, "from-")?;
    for source in sources {
        let fixed: Vec<&str> =
            source.split('/').take_while(|c| !crate::context::has_wildcards(c)).collect();
        view.bring(&fixed.join("/"), scratch.path())
            .map_err(|e| format!("reading `{source}` from the source image: {e}"))?;
    }
    Ok(scratch)
}

/// The scratch tree of a bind mount and the path to mount from it. `source` is the mount's
/// source path as prepared: inside the image for `from=` (symlinks are resolved inside the
/// image, so the mount cannot follow one out to the host), on the host for the context.
/// A read-only image mount reads hard links to the snapshots; a writable one gets a copy of
/// the whole filesystem, whose writes are thrown away with it.
pub fn bind_source(
    store: &Store,
    from: &BindFrom,
    source: &Path,
    readonly: bool,
) -> Result<(tempfile::TempDir, PathBuf), String> {
    match from {
        BindFrom::Image(src) => {
            let view = MergedView::open(store, &src.layers, &src.diff_ids)?;
            let wanted = source.to_string_lossy();
            let resolved = view.resolve(&wanted)?;
            let scratch = scratch_dir(store, "bind-")?;
            if readonly {
                view.bring(&resolved, scratch.path()).map_err(|e| e.to_string())?;
            } else {
                rootfs::flatten(store, &src.layers, scratch.path()).map_err(|e| e.to_string())?;
            }
            let path = scratch.path().join(resolved.trim_start_matches('/'));
            if fs::symlink_metadata(&path).is_err() {
                return Err(format!("`{wanted}` does not exist in the mounted filesystem"));
            }
            Ok((scratch, path))
        }
        BindFrom::WritableContext => {
            let scratch = scratch_dir(store, "bind-")?;
            let path = scratch.path().join("source");
            copy_tree(source, &path)
                .map_err(|e| format!("copying `{}` for a writable mount: {e}", source.display()))?;
            Ok((scratch, path))
        }
    }
}

/// Copy a file or directory tree, symlinks as symlinks (special files are left out), with
/// modes and mtimes (what `make` and the like in the RUN step look at).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    if meta.is_dir() {
        fs::create_dir(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, meta.permissions())?;
    } else if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if meta.is_file() {
        fs::copy(from, to)?;
    } else {
        // A fifo or socket in the context: reading it would block or fail; leave it out.
        return Ok(());
    }
    let mtime = filetime::FileTime::from_last_modification_time(&meta);
    filetime::set_symlink_file_times(to, mtime, mtime)
}
