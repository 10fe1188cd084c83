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
    /// a symlink): kind, mode, uid, gid and mtime come from `lstat`; xattrs are not read
    /// (COPY does not carry them). Override fields afterwards for `--chown`/`--chmod`.
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
            uid: meta.uid(),
            gid: meta.gid(),
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
