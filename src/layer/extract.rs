//! Safe extraction of (untrusted) layer tars.
//!
//! Every path is resolved by the kernel relative to the destination with
//! `openat2(RESOLVE_IN_ROOT)`: a symlink met on the way, absolute or full of `..`, is
//! interpreted as it would be inside the container and can never lead out of `dest`. On
//! top of that, archives that show the classic escape patterns are refused outright:
//! `..` components, replacing the root, writing through a symlink the same archive
//! created, hard links to nothing or to directories. The final component is never
//! followed: files are created with `O_EXCL|O_NOFOLLOW`, whatever was there is removed.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fchmodat, fstatat, mkdirat, mknodat, FchmodatFlags, Mode, SFlag};
use nix::sys::stat::{futimens, utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use xattr::FileExt;

use super::path::{self, OPAQUE_MARKER, WHITEOUT_PREFIX};
use super::reader::{Header, Kind, TarReader};
use super::LayerError;

/// How whiteouts are materialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtractMode {
    /// Into an empty directory that will be an overlayfs lower dir: `.wh.x` becomes a 0/0
    /// character device `x`, `.wh..wh..opq` the `overlay.opaque=y` xattr on its directory
    /// (`trusted.` as root of the host, `user.` otherwise, as [`OverlayXattrs::native`]
    /// says and the sandbox's mount reads). Owners are kept when this process may chown
    /// (root, or root of a rootless build's user namespace).
    ///
    /// [`OverlayXattrs::native`]: super::OverlayXattrs::native
    OverlayLower,
    /// Onto an existing tree (a rootfs being flattened, an ADD staging dir): `.wh.x`
    /// deletes `x`, `.wh..wh..opq` deletes what the directory held before this layer.
    Apply,
}

/// What an extraction did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Entries of the archive (whiteouts included).
    pub entries: u64,
    /// Device nodes not created because this process may not (not root).
    pub skipped_devices: u64,
    /// Extended attributes that could not be set (unsupported, not permitted).
    pub skipped_xattrs: u64,
}

/// Extract the uncompressed tar `tar` into the existing directory `dest`.
///
/// Hostile or corrupt archives are errors naming the entry; nothing is ever created,
/// changed or removed outside `dest`. The reader is drained to its end after the archive,
/// so that a decompressor underneath verifies its trailer (gzip CRC, zstd checksum).
/// On error, `dest` holds a partial extraction: callers extract into a temporary
/// directory (see [`super::ensure_snapshot`]) or discard the result.
pub fn extract_layer<R: Read>(
    tar: R,
    dest: &Path,
    mode: ExtractMode,
) -> Result<ExtractStats, LayerError> {
    let root = nix::fcntl::open(
        dest,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::Extract {
        entry: ".".into(),
        dest: dest.to_path_buf(),
        source: e.into(),
    })?;
    let mut x = Extractor {
        root,
        dest: dest.to_path_buf(),
        mode,
        is_root: nix::unistd::geteuid().is_root(),
        written: HashMap::new(),
        holds_written: HashSet::new(),
        dirs: Vec::new(),
        stats: ExtractStats::default(),
        buf: vec![0u8; 256 * 1024],
    };
    let mut reader = TarReader::new(tar);
    while let Some(h) = reader.next_entry()? {
        x.stats.entries += 1;
        x.entry(&h, &mut reader)?;
    }
    x.finish_dirs()?;
    io::copy(&mut reader.into_inner(), &mut io::sink()).map_err(LayerError::Read)?;
    Ok(x.stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Dir,
    Symlink,
    Whiteout,
    Other,
}

struct Extractor {
    root: OwnedFd,
    dest: PathBuf,
    mode: ExtractMode,
    is_root: bool,
    /// Paths this archive created, by what they are.
    written: HashMap<Vec<u8>, Written>,
    /// Directories that contain something this archive created (kept by an opaque).
    holds_written: HashSet<Vec<u8>>,
    /// Directory modes and mtimes, applied once all their contents exist.
    dirs: Vec<(Vec<u8>, u32, i64)>,
    stats: ExtractStats,
    buf: Vec<u8>,
}

fn shown(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

impl Extractor {
    fn hostile(&self, h: &Header, reason: impl Into<String>) -> LayerError {
        LayerError::Hostile { entry: shown(&h.path), reason: reason.into() }
    }

    fn io_err(&self, h: &Header, source: impl Into<io::Error>) -> LayerError {
        LayerError::Extract {
            entry: shown(&h.path),
            dest: self.dest.clone(),
            source: source.into(),
        }
    }

    /// Open `path` (relative to dest; empty is dest) with every component resolved inside
    /// dest. The final component is followed too unless `flags` has O_NOFOLLOW.
    fn open_in_root(&self, path: &[u8], flags: OFlag) -> nix::Result<OwnedFd> {
        let p = if path.is_empty() { os(b".") } else { os(path) };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(&self.root, p, how)
    }

    fn record(&mut self, path: &[u8], what: Written) {
        for anc in path::ancestors(path) {
            self.holds_written.insert(anc.to_vec());
        }
        self.holds_written.insert(Vec::new());
        self.written.insert(path.to_vec(), what);
    }

    fn keeps(&self, path: &[u8]) -> bool {
        self.written.contains_key(path) || self.holds_written.contains(path)
    }

    /// Refuse a path whose parent is a symlink created by this same archive: a layer
    /// diffed from a filesystem never writes through its own symlinks; archives built
    /// to escape their destination do.
    fn check_parents(&self, h: &Header, p: &[u8]) -> Result<(), LayerError> {
        for anc in path::ancestors(p) {
            if self.written.get(anc) == Some(&Written::Symlink) {
                return Err(self.hostile(
                    h,
                    format!(
                        "it goes through `{}`, a symlink created by the same archive",
                        shown(anc)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The directory `dir`, created (0755, with its missing parents) if absent.
    fn ensure_dir(&mut self, h: &Header, dir: &[u8]) -> Result<OwnedFd, LayerError> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        match self.open_in_root(dir, flags) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.parent_error(h, dir, e)),
        }
        let mut fd = self.open_in_root(b"", flags).map_err(|e| self.io_err(h, e))?;
        let mut end = 0;
        while end < dir.len() {
            let next = dir[end..].iter().position(|&c| c == b'/').map_or(dir.len(), |i| end + i);
            let (prefix, name) = (&dir[..next], &dir[end..next]);
            fd = match self.open_in_root(prefix, flags) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match mkdirat(&fd, os(name), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.parent_error(h, prefix, e)),
                    }
                    self.open_in_root(prefix, flags).map_err(|e| self.parent_error(h, prefix, e))?
                }
                Err(e) => return Err(self.parent_error(h, prefix, e)),
            };
            end = next + 1;
        }
        Ok(fd)
    }

    fn parent_error(&self, h: &Header, dir: &[u8], e: Errno) -> LayerError {
        match e {
            Errno::ENOTDIR | Errno::ENOENT | Errno::EEXIST | Errno::ELOOP => self.hostile(
                h,
                format!(
                    "its parent `{}` is not a directory (or is a dangling symlink)",
                    shown(dir)
                ),
            ),
            e => self.io_err(h, e),
        }
    }

    fn entry<R: Read>(&mut self, h: &Header, r: &mut TarReader<R>) -> Result<(), LayerError> {
        let norm = path::normalize(&h.path).map_err(|reason| self.hostile(h, reason))?;
        if norm.is_empty() {
            if h.kind != Kind::Dir {
                return Err(self.hostile(h, "it would replace the destination directory itself"));
            }
            self.dirs.push((Vec::new(), h.mode, h.mtime));
            return self.set_owner_xattrs_dir(h, &norm);
        }
        self.check_parents(h, &norm)?;
        let (parent, name) = path::split_last(&norm);
        if name.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(h, parent, name);
        }
        let parent_fd = self.ensure_dir(h, parent)?;

        let existing = match fstatat(&parent_fd, os(name), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Some(SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT)),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(self.io_err(h, e)),
        };
        let keep_dir = h.kind == Kind::Dir && existing == Some(SFlag::S_IFDIR);
        if existing.is_some() && !keep_dir {
            remove_all_at(parent_fd.as_fd(), os(name)).map_err(|e| self.io_err(h, e))?;
        }

        let written = match h.kind {
            Kind::Regular => {
                let fd = openat(
                    &parent_fd,
                    os(name),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| self.io_err(h, e))?;
                let mut file = File::from(fd);
                loop {
                    let n = r.read_data(&mut self.buf)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&self.buf[..n]).map_err(|e| self.io_err(h, e))?;
                }
                self.set_fd_metadata(h, file.as_fd(), true)?;
                self.set_xattrs(h, &file);
                let t = TimeSpec::new(h.mtime, 0);
                futimens(&file, &t, &t).map_err(|e| self.io_err(h, e))?;
                Written::Other
            }
            Kind::Dir => {
                if !keep_dir {
                    // Owner-only until all contents exist; the real mode comes at the end.
                    mkdirat(&parent_fd, os(name), Mode::from_bits_truncate(0o700))
                        .map_err(|e| self.io_err(h, e))?;
                }
                self.dirs.push((norm.clone(), h.mode, h.mtime));
                self.record(&norm, Written::Dir);
                return self.set_owner_xattrs_dir(h, &norm);
            }
            Kind::Symlink => {
                symlinkat(os(&h.link), &parent_fd, os(name)).map_err(|e| self.io_err(h, e))?;
                self.chown_at(h, &parent_fd, name)?;
                self.set_time_at(h, &parent_fd, name)?;
                Written::Symlink
            }
            Kind::Hardlink => {
                self.hardlink(h, &parent_fd, name)?;
                Written::Other
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                let (kind, dev) = match h.kind {
                    Kind::Char => (SFlag::S_IFCHR, self.dev(h)?),
                    Kind::Block => (SFlag::S_IFBLK, self.dev(h)?),
                    _ => (SFlag::S_IFIFO, 0),
                };
                match mknodat(&parent_fd, os(name), kind, Mode::from_bits_truncate(0o600), dev) {
                    Ok(()) => {}
                    Err(Errno::EPERM) if kind != SFlag::S_IFIFO => {
                        tracing::warn!(
                            entry = %shown(&h.path),
                            "not creating device node: this process may not (not root)"
                        );
                        self.stats.skipped_devices += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(self.io_err(h, e)),
                }
                self.chown_at(h, &parent_fd, name)?;
                fchmodat(
                    &parent_fd,
                    os(name),
                    Mode::from_bits_truncate(h.mode),
                    FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| self.io_err(h, e))?;
                self.set_time_at(h, &parent_fd, name)?;
                Written::Other
            }
        };
        self.record(&norm, written);
        Ok(())
    }

    fn dev(&self, h: &Header) -> Result<libc::dev_t, LayerError> {
        let (Ok(major), Ok(minor)) = (u32::try_from(h.devmajor), u32::try_from(h.devminor)) else {
            return Err(self.hostile(h, "device number out of range"));
        };
        Ok(libc::makedev(major, minor))
    }

    /// A failed chown; in a rootless build's user namespace, EINVAL means an owner outside
    /// the mapped ids.
    fn chown_err(&self, h: &Header, errno: Errno) -> LayerError {
        if errno == Errno::EINVAL && crate::userns::in_user_namespace() {
            let (uid, gid) = (h.uid, h.gid);
            let source = io::Error::other(format!(
                "its owner {uid}:{gid} is outside the ids this rootless build maps (its \
                 subordinate ranges in /etc/subuid and /etc/subgid are too small)"
            ));
            return self.io_err(h, source);
        }
        self.io_err(h, errno)
    }

    fn ids(&self, h: &Header) -> Result<(Uid, Gid), LayerError> {
        let (Ok(uid), Ok(gid)) = (u32::try_from(h.uid), u32::try_from(h.gid)) else {
            return Err(self.hostile(h, "uid or gid out of range"));
        };
        Ok((Uid::from_raw(uid), Gid::from_raw(gid)))
    }

    /// Owner (when root) then mode: chown clears setuid bits, so the mode comes second.
    fn set_fd_metadata(
        &self,
        h: &Header,
        fd: BorrowedFd<'_>,
        with_mode: bool,
    ) -> Result<(), LayerError> {
        if self.is_root {
            let (uid, gid) = self.ids(h)?;
            fchown(fd, Some(uid), Some(gid)).map_err(|e| self.chown_err(h, e))?;
        }
        if with_mode {
            fchmod(fd, Mode::from_bits_truncate(h.mode)).map_err(|e| self.io_err(h, e))?;
        }
        Ok(())
    }

    fn chown_at(&self, h: &Header, dir: &OwnedFd, name: &[u8]) -> Result<(), LayerError> {
        if self.is_root {
            let (uid, gid) = self.ids(h)?;
            fchownat(dir, os(name), Some(uid), Some(gid), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| self.chown_err(h, e))?;
        }
        Ok(())
    }

    fn set_time_at(&self, h: &Header, dir: &OwnedFd, name: &[u8]) -> Result<(), LayerError> {
        let t = TimeSpec::new(h.mtime, 0);
        utimensat(dir, os(name), &t, &t, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| self.io_err(h, e))
    }

    fn set_owner_xattrs_dir(&mut self, h: &Header, norm: &[u8]) -> Result<(), LayerError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
        let fd = self.open_in_root(norm, flags).map_err(|e| self.io_err(h, e))?;
        self.set_fd_metadata(h, fd.as_fd(), false)?;
        self.set_xattrs(h, &File::from(fd));
        Ok(())
    }

    /// Extended attributes are kept where the filesystem and our privileges allow; one
    /// that cannot be set is logged, not fatal (docker behaves the same). overlayfs's own
    /// attributes are never taken from an archive: they would change what the overlay
    /// shows (opaque dirs, redirects) behind the layer's back.
    fn set_xattrs(&mut self, h: &Header, file: &File) {
        for (name, value) in &h.xattrs {
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                tracing::warn!(entry = %shown(&h.path), xattr = %name, "ignoring overlayfs xattr in archive");
                self.stats.skipped_xattrs += 1;
                continue;
            }
            if let Err(e) = file.set_xattr(name, value) {
                tracing::warn!(entry = %shown(&h.path), xattr = %name, error = %e, "cannot set xattr");
                self.stats.skipped_xattrs += 1;
            }
        }
    }

    fn hardlink(&mut self, h: &Header, parent_fd: &OwnedFd, name: &[u8]) -> Result<(), LayerError> {
        let target = path::normalize(&h.link)
            .map_err(|r| self.hostile(h, format!("its hard link target {r}")))?;
        if target.is_empty() {
            return Err(self.hostile(h, "it is a hard link to the destination directory"));
        }
        self.check_parents(h, &target)?;
        let (tparent, tname) = path::split_last(&target);
        let missing =
            || self.hostile(h, format!("its hard link target `{}` does not exist", shown(&target)));
        let tfd = match self.open_in_root(tparent, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(missing()),
            Err(e) => return Err(self.io_err(h, e)),
        };
        match fstatat(&tfd, os(tname), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                return Err(self.hostile(h, "its hard link target is a directory"))
            }
            Ok(_) => {}
            Err(Errno::ENOENT) => return Err(missing()),
            Err(e) => return Err(self.io_err(h, e)),
        }
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink, never its target.
        linkat(&tfd, os(tname), parent_fd, os(name), AtFlags::empty())
            .map_err(|e| self.io_err(h, e))
    }

    fn whiteout(&mut self, h: &Header, parent: &[u8], name: &[u8]) -> Result<(), LayerError> {
        if name == OPAQUE_MARKER {
            let parent_fd = self.ensure_dir(h, parent)?;
            drop(parent_fd);
            let dir = self
                .open_in_root(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(|e| self.io_err(h, e))?;
            match self.mode {
                ExtractMode::OverlayLower => File::from(dir)
                    .set_xattr(super::OverlayXattrs::native().opaque_name(), b"y")
                    .map_err(|e| self.io_err(h, e))?,
                ExtractMode::Apply => {
                    self.clear_lower(h, dir.as_fd(), parent)?;
                }
            }
            for anc in path::ancestors(parent) {
                self.holds_written.insert(anc.to_vec());
            }
            self.holds_written.insert(parent.to_vec());
            return Ok(());
        }
        let gone = &name[WHITEOUT_PREFIX.len()..];
        if gone.starts_with(WHITEOUT_PREFIX) {
            // `.wh..wh.*` other than the opaque marker is aufs bookkeeping, not a file.
            tracing::debug!(entry = %shown(&h.path), "skipping aufs metadata entry");
            return Ok(());
        }
        if gone.is_empty() || gone == b"." || gone == b".." {
            return Err(self.hostile(h, "it is a whiteout of no valid name"));
        }
        let target = path::join(parent, gone);
        // A whiteout hides lower layers only; what this layer itself put there stays.
        if self.keeps(&target) {
            return Ok(());
        }
        let parent_fd = self.ensure_dir(h, parent)?;
        match self.mode {
            ExtractMode::OverlayLower => {
                match mknodat(
                    &parent_fd,
                    os(gone),
                    SFlag::S_IFCHR,
                    Mode::empty(),
                    libc::makedev(0, 0),
                ) {
                    Ok(()) => {}
                    Err(e) => return Err(self.io_err(h, e)),
                }
                if self.is_root {
                    fchownat(
                        &parent_fd,
                        os(gone),
                        Some(Uid::from_raw(0)),
                        Some(Gid::from_raw(0)),
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| self.io_err(h, e))?;
                }
                self.record(&target, Written::Whiteout);
            }
            ExtractMode::Apply => {
                remove_all_at(parent_fd.as_fd(), os(gone)).map_err(|e| self.io_err(h, e))?;
            }
        }
        Ok(())
    }

    /// Remove everything below `dir` that this archive did not create.
    fn clear_lower(
        &self,
        h: &Header,
        dir: BorrowedFd<'_>,
        dir_path: &[u8],
    ) -> Result<(), LayerError> {
        for name in list_dir(dir).map_err(|e| self.io_err(h, e))? {
            let child = path::join(dir_path, name.to_bytes());
            let child_name = OsStr::from_bytes(name.to_bytes());
            if !self.keeps(&child) {
                remove_all_at(dir, child_name).map_err(|e| self.io_err(h, e))?;
                continue;
            }
            let st = fstatat(dir, child_name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| self.io_err(h, e))?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let fd = openat(
                    dir,
                    child_name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.io_err(h, e))?;
                self.clear_lower(h, fd.as_fd(), &child)?;
            }
        }
        Ok(())
    }

    /// Directory modes and mtimes last: creating their contents changed the mtimes, and
    /// a read-only mode set early would have blocked the contents (when not root).
    fn finish_dirs(&mut self) -> Result<(), LayerError> {
        let dirs = std::mem::take(&mut self.dirs);
        for (p, mode, mtime) in dirs.iter().rev() {
            // Gone or replaced by a non-directory later in the archive: nothing to do.
            let Ok(fd) =
                self.open_in_root(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW)
            else {
                continue;
            };
            let err = |e: Errno| LayerError::Extract {
                entry: if p.is_empty() { ".".into() } else { shown(p) },
                dest: self.dest.clone(),
                source: e.into(),
            };
            fchmod(&fd, Mode::from_bits_truncate(*mode)).map_err(err)?;
            let t = TimeSpec::new(*mtime, 0);
            futimens(&fd, &t, &t).map_err(err)?;
        }
        Ok(())
    }
}

/// The names in a directory, without `.` and `..`.
fn list_dir(dir: BorrowedFd<'_>) -> nix::Result<Vec<std::ffi::CString>> {
    let mut d = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Remove `name` in `dir`, recursively if it is a directory; absent is fine. Symlinks
/// are removed, never followed.
pub(crate) fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        for child in list_dir(fd.as_fd())? {
            remove_all_at(fd.as_fd(), OsStr::from_bytes(child.to_bytes()))?;
        }
        unlinkat(dir, name, UnlinkatFlags::RemoveDir)?;
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?;
    }
    Ok(())
}
