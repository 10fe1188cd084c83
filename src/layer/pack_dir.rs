//! A RUN step's overlayfs upper dir → layer entries: the upper dir is exactly what the
//! step changed, in overlayfs's own notation, which this converts to OCI whiteouts.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::entry::{split_dev, EntryKind, LayerEntry};
use super::sink::{pack_entries, LayerOptions, PackedLayer};
use super::LayerError;

/// Which xattr namespace overlayfs used for its metadata in an upper dir: `trusted.` when
/// the mount was made by real root, `user.` (the `userxattr` mount option) when rootless,
/// as unprivileged users cannot write `trusted.` xattrs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum OverlayXattrs {
    #[default]
    Trusted,
    User,
}

impl OverlayXattrs {
    /// The namespace this process's overlay mounts use: `trusted.` only as root of the
    /// host (a user namespace's root may not write `trusted.` xattrs either).
    pub fn native() -> Self {
        if crate::userns::is_host_root() {
            OverlayXattrs::Trusted
        } else {
            OverlayXattrs::User
        }
    }

    /// The prefix of every overlayfs-private xattr; the layer writer must not copy these
    /// into a layer (they mark origins, redirects and opacity, not file content).
    pub fn prefix(self) -> &'static str {
        match self {
            OverlayXattrs::Trusted => "trusted.overlay.",
            OverlayXattrs::User => "user.overlay.",
        }
    }

    /// The xattr whose value `y` marks a directory that hides everything below it.
    pub fn opaque_name(self) -> &'static str {
        match self {
            OverlayXattrs::Trusted => "trusted.overlay.opaque",
            OverlayXattrs::User => "user.overlay.opaque",
        }
    }

    /// Whether `dir` (in an upper dir) is an opaque directory.
    pub fn is_opaque_dir(self, dir: &Path) -> std::io::Result<bool> {
        Ok(xattr::get(dir, self.opaque_name())?.as_deref() == Some(b"y".as_slice()))
    }
}

/// One range of a user namespace id map: host ids `host..host+size` are container ids
/// `container..container+size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpperDirOptions {
    pub overlay_xattrs: OverlayXattrs,
    /// How owners on disk translate to owners in the image (rootless builds write files
    /// of container uid 0 as the caller's uid). Empty: ids are kept as they are.
    pub uid_map: Vec<IdMapping>,
    pub gid_map: Vec<IdMapping>,
}

fn map_id(map: &[IdMapping], host: u32) -> Option<u32> {
    if map.is_empty() {
        return Some(host);
    }
    map.iter().find_map(|m| {
        let off = host.checked_sub(m.host)?;
        (off < m.size).then(|| m.container + off)
    })
}

/// Read an overlayfs upper dir into layer entries. Only `dir` is walked, never crossing
/// into another filesystem. A 0/0 character device (or an empty file with the
/// `overlay.whiteout` xattr) becomes a whiteout; a directory with `overlay.opaque=y`
/// becomes the directory plus an opaque whiteout. Files linked several times inside the
/// dir stay hard links. Sockets are skipped (a tar cannot hold them).
pub fn directory_entries(
    dir: &Path,
    opts: &UpperDirOptions,
) -> Result<Vec<LayerEntry>, LayerError> {
    let ns = opts.overlay_xattrs.prefix();
    let opaque_key = format!("{ns}opaque");
    let whiteout_key = format!("{ns}whiteout");
    let upper_err =
        |path: &Path, reason: String| LayerError::UpperDir { path: path.to_path_buf(), reason };

    let mut entries = Vec::new();
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let walk = walkdir::WalkDir::new(dir).follow_links(false).same_file_system(true).min_depth(1);
    for item in walk {
        let item = item.map_err(|e| upper_err(e.path().unwrap_or(dir), e.to_string()))?;
        let host = item.path();
        let rel = host.strip_prefix(dir).map_err(|e| upper_err(host, e.to_string()))?;
        let image_path = Path::new("/").join(rel);
        let meta = item.metadata().map_err(|e| upper_err(host, e.to_string()))?;
        let ft = meta.file_type();
        let xattrs =
            read_xattrs(host, ft.is_symlink()).map_err(|e| upper_err(host, e.to_string()))?;
        for key in ["redirect", "metacopy"] {
            if xattrs.contains_key(&format!("{ns}{key}")) {
                return Err(upper_err(
                    host,
                    format!(
                        "has the overlayfs `{key}` attribute; the overlay must be mounted with \
                         redirect_dir=off,metacopy=off for its upper dir to be a layer"
                    ),
                ));
            }
        }

        let is_whiteout = (ft.is_char_device() && meta.rdev() == 0)
            || (ft.is_file() && meta.len() == 0 && xattrs.contains_key(&whiteout_key));
        if is_whiteout {
            entries.push(LayerEntry::whiteout(image_path));
            continue;
        }
        if ft.is_socket() {
            tracing::warn!(path = %host.display(), "skipping socket: a layer cannot hold it");
            continue;
        }
        let uid = map_id(&opts.uid_map, meta.uid()).ok_or_else(|| {
            upper_err(
                host,
                format!("owner uid {} is not mapped into the build's user namespace", meta.uid()),
            )
        })?;
        let gid = map_id(&opts.gid_map, meta.gid()).ok_or_else(|| {
            upper_err(
                host,
                format!("group gid {} is not mapped into the build's user namespace", meta.gid()),
            )
        })?;

        let kind = if ft.is_file() {
            if meta.nlink() > 1 {
                match inodes.get(&(meta.dev(), meta.ino())) {
                    Some(first) => EntryKind::Hardlink { target: first.clone() },
                    None => {
                        inodes.insert((meta.dev(), meta.ino()), image_path.clone());
                        EntryKind::HostFile(host.to_path_buf())
                    }
                }
            } else {
                EntryKind::HostFile(host.to_path_buf())
            }
        } else if ft.is_dir() {
            if xattrs.get(&opaque_key).map(Vec::as_slice) == Some(b"y") {
                entries.push(LayerEntry::opaque_whiteout(&image_path));
            }
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink {
                target: std::fs::read_link(host).map_err(|e| upper_err(host, e.to_string()))?,
            }
        } else if ft.is_char_device() {
            let (major, minor) = split_dev(meta.rdev());
            EntryKind::CharDevice { major, minor }
        } else if ft.is_block_device() {
            let (major, minor) = split_dev(meta.rdev());
            EntryKind::BlockDevice { major, minor }
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else {
            return Err(upper_err(host, "is of an unknown file type".into()));
        };
        let mut entry = LayerEntry {
            path: image_path,
            kind,
            mode: meta.mode() & 0o7777,
            uid,
            gid,
            mtime: Some(meta.mtime()),
            xattrs: Default::default(),
        };
        for (k, v) in xattrs {
            // overlayfs bookkeeping (both namespaces: an image must never carry it) and
            // the host's SELinux label are not part of what the step produced.
            if k.starts_with("trusted.overlay.")
                || k.starts_with("user.overlay.")
                || k == "security.selinux"
            {
                continue;
            }
            entry.xattrs.insert(k, v);
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn read_xattrs(
    path: &Path,
    is_symlink: bool,
) -> std::io::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(names) => names,
        // Symlinks cannot carry user xattrs on most filesystems; no list is no xattrs.
        Err(e) if is_symlink || e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names {
        let Some(key) = name.to_str() else {
            tracing::warn!(path = %path.display(), "skipping xattr with a non-UTF-8 name");
            continue;
        };
        if let Some(value) = xattr::get(path, &name)? {
            out.insert(key.to_string(), value);
        }
    }
    Ok(out)
}

/// Pack an overlayfs upper dir as a layer (see [`directory_entries`]), streaming file
/// contents from the dir into `out`.
pub fn pack_directory<W: Write>(
    dir: &Path,
    upper: &UpperDirOptions,
    opts: &LayerOptions,
    out: W,
) -> Result<(PackedLayer, W), LayerError> {
    let entries = directory_entries(dir, upper)?;
    pack_entries(entries, opts, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_maps_translate_ranges_and_refuse_unmapped_ids() {
        let map = [
            IdMapping { container: 0, host: 1000, size: 1 },
            IdMapping { container: 1, host: 100_000, size: 65536 },
        ];
        assert_eq!(map_id(&map, 1000), Some(0));
        assert_eq!(map_id(&map, 100_005), Some(6));
        assert_eq!(map_id(&map, 0), None);
        assert_eq!(map_id(&[], 42), Some(42));
    }
}
