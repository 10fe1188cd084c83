//! What goes into a layer: one `LayerEntry` per path of the image.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::LayerError;

/// One path of a layer, as the image will see it.
///
/// `path` is the path inside the image (`/usr/bin/tool` or `usr/bin/tool`; normalised
/// when written). `mode` holds the permission bits with setuid/setgid/sticky (`0o7777`);
/// the file type comes from `kind`. `mtime` is seconds since the epoch; `None` means
/// "the layer's SOURCE_DATE_EPOCH", which is what generated entries want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    pub path: PathBuf,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Option<i64>,
    /// Extended attributes (`security.capability`, `user.*`, ...), kept in name order so
    /// that the PAX records they become are deterministic.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file whose content is read from the host when the layer is written
    /// (streamed, never loaded whole).
    HostFile(PathBuf),
    /// A regular file with the given content.
    Bytes(Vec<u8>),
    Dir,
    Symlink {
        target: PathBuf,
    },
    /// Another name for a regular file of the same layer (`target` is its image path).
    Hardlink {
        target: PathBuf,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// `path` was deleted: written as `<dir>/.wh.<name>`.
    Whiteout,
    /// The directory `path` hides everything below it from lower layers: written as
    /// `<path>/.wh..wh..opq`.
    OpaqueWhiteout,
}

impl LayerEntry {
    fn new(path: impl Into<PathBuf>, kind: EntryKind, mode: u32) -> LayerEntry {
        LayerEntry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: None,
            xattrs: BTreeMap::new(),
        }
    }

    /// A directory, 0755 root:root.
    pub fn dir(path: impl Into<PathBuf>) -> LayerEntry {
        LayerEntry::new(path, EntryKind::Dir, 0o755)
    }

    /// A regular file with in-memory content, 0644 root:root.
    pub fn bytes(path: impl Into<PathBuf>, content: impl Into<Vec<u8>>) -> LayerEntry {
        LayerEntry::new(path, EntryKind::Bytes(content.into()), 0o644)
    }

    /// A regular file streamed from `host` when written, 0644 root:root. Use
    /// [`LayerEntry::from_host`] to take mode, owner and mtime from the host file instead.
    pub fn host_file(path: impl Into<PathBuf>, host: impl Into<PathBuf>) -> LayerEntry {
        LayerEntry::new(path, EntryKind::HostFile(host.into()), 0o644)
    }

    pub fn symlink(path: impl Into<PathBuf>, target: impl Into<PathBuf>) -> LayerEntry {
        LayerEntry::new(path, EntryKind::Symlink { target: target.into() }, 0o777)
    }

    pub fn hardlink(path: impl Into<PathBuf>, target: impl Into<PathBuf>) -> LayerEntry {
        LayerEntry::new(path, EntryKind::Hardlink { target: target.into() }, 0o644)
    }

    pub fn whiteout(path: impl Into<PathBuf>) -> LayerEntry {
        LayerEntry::new(path, EntryKind::Whiteout, 0o600)
    }

    pub fn opaque_whiteout(dir: impl Into<PathBuf>) -> LayerEntry {
        LayerEntry::new(dir, EntryKind::OpaqueWhiteout, 0o600)
    }

    /// An entry for `image_path` described by the host file `host` (not followed if it is
    /// a symlink), as COPY/ADD take it: kind, permission bits and mtime come from `lstat`;
    /// the owner is root (0:0) whoever owns the file on this machine, since the image must
    /// not depend on who checked the context out; xattrs are not read. Override fields
    /// afterwards for `--chown`/`--chmod`.
    pub fn from_host(
        image_path: impl Into<PathBuf>,
        host: impl AsRef<Path>,
    ) -> Result<LayerEntry, LayerError> {
        let host = host.as_ref();
        let err = |source| LayerError::HostFile { path: host.to_path_buf(), source };
        let meta = fs::symlink_metadata(host).map_err(err)?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            EntryKind::HostFile(host.to_path_buf())
        } else if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink { target: fs::read_link(host).map_err(err)? }
        } else if ft.is_char_device() {
            let (major, minor) = split_dev(meta.rdev());
            EntryKind::CharDevice { major, minor }
        } else if ft.is_block_device() {
            let (major, minor) = split_dev(meta.rdev());
            EntryKind::BlockDevice { major, minor }
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else {
            return Err(LayerError::Unsupported {
                path: host.display().to_string(),
                what: "a socket cannot be stored in a layer".into(),
            });
        };
        Ok(LayerEntry {
            path: image_path.into(),
            kind,
            mode: meta.mode() & 0o7777,
            uid: 0,
            gid: 0,
            mtime: Some(meta.mtime()),
            xattrs: BTreeMap::new(),
        })
    }

    pub fn with_mode(mut self, mode: u32) -> LayerEntry {
        self.mode = mode & 0o7777;
        self
    }

    pub fn with_owner(mut self, uid: u32, gid: u32) -> LayerEntry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn with_mtime(mut self, mtime: i64) -> LayerEntry {
        self.mtime = Some(mtime);
        self
    }

    pub fn with_xattr(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> LayerEntry {
        self.xattrs.insert(name.into(), value.into());
        self
    }
}

pub(crate) fn split_dev(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn from_host_keeps_mode_and_mtime_but_not_the_host_owner() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, "x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
        let mtime = fs::metadata(&f).unwrap().mtime();
        let e = LayerEntry::from_host("/app/f", &f).unwrap();
        assert_eq!(e.kind, EntryKind::HostFile(f.clone()));
        assert_eq!((e.mode, e.uid, e.gid, e.mtime), (0o750, 0, 0, Some(mtime)));
        let e = e.with_owner(1000, 1000).with_mode(0o644);
        assert_eq!((e.mode, e.uid, e.gid), (0o644, 1000, 1000));

        let l = t.path().join("l");
        std::os::unix::fs::symlink("f", &l).unwrap();
        let e = LayerEntry::from_host("/app/l", &l).unwrap();
        assert_eq!(e.kind, EntryKind::Symlink { target: "f".into() });

        let sock = t.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = LayerEntry::from_host("/app/s", &sock).unwrap_err();
        assert!(err.to_string().contains("socket"), "{err}");
        assert!(LayerEntry::from_host("/x", t.path().join("missing")).is_err());
    }
}
