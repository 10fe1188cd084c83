//! An image's filesystem read straight from its layer snapshots (the extracted layers that
//! RUN stacks as overlayfs lower dirs), merged in user space the way overlayfs merges them:
//! the upper layer wins, a whiteout hides what is below it, and an opaque directory hides
//! the lower layers' content of that directory.
//!
//! COPY reads the destination stage's paths through it (which directories exist, where
//! symlinks lead), and `COPY --from` brings only the paths it copies into a small scratch
//! tree by hard links. Neither unpacks a whole image again: a snapshot is extracted once per
//! store and shared by every build after.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::Store;

/// The most symlinks followed while resolving one path, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    Dir,
    File,
    Symlink(String),
    /// A device node, fifo or socket.
    Special,
}

/// What the merged filesystem holds at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub kind: PathKind,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since 1970.
    pub mtime: i64,
}

/// The layers of one image, top layer first, as snapshot directories.
#[derive(Debug, Clone, Default)]
pub struct MergedView {
    layers: Vec<PathBuf>,
}

/// One name resolved through the layers of its parent directory.
struct Node {
    /// The snapshot path of the visible entry.
    host: PathBuf,
    meta: Metadata,
    /// For a directory: the layers (indexes, top first) whose directories merge into it.
    dir_layers: Vec<usize>,
}

impl MergedView {
    /// The view of `layers` (bottom first, as in a manifest), extracting the snapshots that
    /// are missing. An empty list is an empty filesystem.
    pub fn open(
        store: &Store,
        layers: &[Descriptor],
        diff_ids: &[Digest],
    ) -> Result<MergedView, String> {
        if layers.len() != diff_ids.len() {
            return Err(format!(
                "the image has {} layers but its config lists {} diff ids",
                layers.len(),
                diff_ids.len()
            ));
        }
        let snapshots = store.state_dir("snapshots").map_err(|e| e.to_string())?;
        let tmp = store.tmp_dir();
        let mut dirs = Vec::with_capacity(layers.len());
        for (desc, diff_id) in layers.iter().zip(diff_ids).rev() {
            let id = crate::layer::snapshot_id(diff_id);
            let dir = crate::layer::ensure_snapshot(&snapshots, &tmp, &id, || {
                store.open_blob(&desc.digest).map_err(|e| io::Error::other(e.to_string()))
            })
            .map_err(|e| format!("extracting layer {}: {e}", desc.digest))?;
            // A layer twice in a stack (an empty layer, most often): the upper copy alone
            // gives the same filesystem, and overlayfs refuses a lower dir given twice.
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        Ok(MergedView { layers: dirs })
    }

    /// The layers whose root directories merge: all of them, down to an opaque root.
    fn root_layers(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, dir) in self.layers.iter().enumerate() {
            out.push(i);
            if is_opaque(dir) {
                break;
            }
        }
        out
    }

    /// The snapshot directories, top layer first: overlayfs lower dirs.
    pub fn into_layer_dirs(self) -> Vec<PathBuf> {
        self.layers
    }

    /// Resolve `name` inside a directory whose merged layers are `candidates`.
    fn node(&self, rel: &Path, candidates: &[usize]) -> io::Result<Option<Node>> {
        let mut found: Option<Node> = None;
        for &i in candidates {
            let host = self.layers[i].join(rel);
            let meta = match fs::symlink_metadata(&host) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if is_whiteout(&meta) {
                break;
            }
            let is_dir = meta.is_dir();
            let opaque = is_dir && is_opaque(&host);
            match &mut found {
                None => {
                    let dir_layers = if is_dir { vec![i] } else { Vec::new() };
                    found = Some(Node { host, meta, dir_layers });
                    if !is_dir {
                        break;
                    }
                }
                // Below a directory, only directories merge; anything else ends the stack.
                Some(top) if is_dir => top.dir_layers.push(i),
                Some(_) => break,
            }
            if opaque {
                break;
            }
        }
        Ok(found)
    }

    /// The entry at `path` without following a symlink in its last component; parents
    /// must be directories (symlinked parents are not followed: see [`resolve`]).
    fn lookup(&self, path: &str) -> io::Result<Option<Node>> {
        let mut candidates = self.root_layers();
        let mut rel = PathBuf::new();
        let mut current: Option<Node> = None;
        for component in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if current.as_ref().is_some_and(|n| !n.meta.is_dir()) {
                return Ok(None);
            }
            rel.push(component);
            match self.node(&rel, &candidates)? {
                None => return Ok(None),
                Some(n) => {
                    candidates = n.dir_layers.clone();
                    current = Some(n);
                }
            }
        }
        Ok(current)
    }

    /// What is at `path` (an absolute path in the image, symlinks not followed).
    pub fn get(&self, path: &str) -> Option<PathInfo> {
        const ROOT: PathInfo =
            PathInfo { kind: PathKind::Dir, mode: 0o755, uid: 0, gid: 0, mtime: 0 };
        if path.split('/').all(|c| c.is_empty() || c == ".") {
            return Some(ROOT);
        }
        let node = self.lookup(path).ok()??;
        Some(path_info(&node))
    }

    pub fn is_dir(&self, path: &str) -> bool {
        self.get(path).is_some_and(|i| i.kind == PathKind::Dir)
    }

    /// The content of the regular file at `path`, symlinks followed inside the image (as a
    /// process in the image would open it); None when no regular file is there. A file over
    /// `limit` bytes is an error: the account databases read this way are a few kilobytes,
    /// and an image claiming one of gigabytes must not exhaust memory.
    pub fn read_file(&self, path: &str, limit: u64) -> io::Result<Option<Vec<u8>>> {
        let resolved = self.resolve(path).map_err(io::Error::other)?;
        let Some(node) = self.lookup(&resolved)? else { return Ok(None) };
        if !node.meta.is_file() {
            return Ok(None);
        }
        if node.meta.len() > limit {
            return Err(io::Error::other(format!(
                "{path} is {} bytes; more than the {limit} read from an image",
                node.meta.len()
            )));
        }
        fs::read(&node.host).map(Some)
    }

    /// `path` with every symlink on it followed inside the image (a link never leads out:
    /// `..` stops at the root, an absolute target starts again from it).
    pub fn resolve(&self, path: &str) -> Result<String, String> {
        self.walk(path).map(|(resolved, _)| resolved)
    }

    /// [`resolve`](Self::resolve), with the image paths of the symlinks it followed.
    fn walk(&self, path: &str) -> Result<(String, Vec<String>), String> {
        let mut pending: VecDeque<String> =
            path.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect();
        let mut current: Vec<String> = Vec::new();
        let mut links = Vec::new();
        while let Some(component) = pending.pop_front() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    current.pop();
                    continue;
                }
                _ => current.push(component),
            }
            let rel = current.join("/");
            let Some(PathInfo { kind: PathKind::Symlink(target), .. }) = self.get(&rel) else {
                continue;
            };
            links.push(rel);
            if links.len() > MAX_SYMLINKS {
                return Err(format!("{path}: too many levels of symbolic links in the image"));
            }
            current.pop();
            if target.starts_with('/') {
                current.clear();
            }
            let mut rest: VecDeque<String> =
                target.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect();
            rest.extend(pending.drain(..));
            pending = rest;
        }
        Ok((format!("/{}", current.join("/")), links))
    }

    /// Recreate under `dest` what a copy of `path` reads: the symlinks met on the way to it
    /// (so that resolving `path` in `dest` leads where it leads in the image), its parent
    /// directories, and the whole tree at its end. Files are hard links to the snapshots
    /// (copies across filesystems), so the tree must only be read. A path that does not
    /// exist brings nothing more; the reader of `dest` reports it.
    pub fn bring(&self, path: &str, dest: &Path) -> io::Result<()> {
        let (resolved, links) = self.walk(path).map_err(io::Error::other)?;
        for link in links {
            let target = dest.join(&link);
            if let (Some(node), Err(_)) = (self.lookup(&link)?, fs::symlink_metadata(&target)) {
                fs::create_dir_all(target.parent().unwrap_or(dest))?;
                place(&node, &target)?;
            }
        }
        let rel = resolved.trim_start_matches('/');
        if rel.is_empty() {
            return self.bring_tree("", &self.root_layers(), dest);
        }
        let Some(node) = self.lookup(rel)? else { return Ok(()) };
        let target = dest.join(rel);
        if node.meta.is_dir() {
            return self.bring_tree(rel, &node.dir_layers, &target);
        }
        if fs::symlink_metadata(&target).is_err() {
            fs::create_dir_all(target.parent().unwrap_or(dest))?;
            place(&node, &target)?;
        }
        Ok(())
    }

    /// Recreate the merged directory `rel` (whose layers are `dir_layers`) at `target`.
    fn bring_tree(&self, rel: &str, dir_layers: &[usize], target: &Path) -> io::Result<()> {
        fs::create_dir_all(target)?;
        let mut names: BTreeMap<OsString, ()> = BTreeMap::new();
        for &i in dir_layers {
            for entry in fs::read_dir(self.layers[i].join(rel))? {
                names.insert(entry?.file_name(), ());
            }
        }
        for name in names.into_keys() {
            let child_rel = Path::new(rel).join(&name);
            let Some(node) = self.node(&child_rel, dir_layers)? else { continue };
            let child = target.join(&name);
            if node.meta.is_dir() {
                let rel = child_rel.to_string_lossy().to_string();
                self.bring_tree(&rel, &node.dir_layers, &child)?;
            } else if fs::symlink_metadata(&child).is_err() {
                place(&node, &child)?;
            }
        }
        // The directory's own metadata last: its children's creation changes its mtime.
        let top = self.layers.get(dir_layers.first().copied().unwrap_or(usize::MAX));
        if let Some(top) = top {
            let meta = fs::symlink_metadata(top.join(rel))?;
            set_metadata(target, &meta)?;
        }
        Ok(())
    }
}

/// Put a non-directory node at `target`: a hard link to a file, a copy of anything else.
fn place(node: &Node, target: &Path) -> io::Result<()> {
    let file_type = node.meta.file_type();
    if file_type.is_file() {
        // A hard link is the file itself, metadata included (and must not be touched:
        // it is the snapshot's inode). Across filesystems, or at too many links: a copy.
        if fs::hard_link(&node.host, target).is_ok() {
            return Ok(());
        }
        fs::copy(&node.host, target)?;
    } else if file_type.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(&node.host)?, target)?;
    } else {
        let kind = if file_type.is_fifo() {
            nix::sys::stat::SFlag::S_IFIFO
        } else if file_type.is_char_device() {
            nix::sys::stat::SFlag::S_IFCHR
        } else if file_type.is_block_device() {
            nix::sys::stat::SFlag::S_IFBLK
        } else {
            // A socket means nothing in an image: leave it out, as docker's archiver does.
            return Ok(());
        };
        nix::sys::stat::mknod(
            target,
            kind,
            nix::sys::stat::Mode::from_bits_truncate(node.meta.mode() & 0o7777),
            node.meta.rdev(),
        )
        .map_err(io::Error::from)?;
    }
    set_metadata(target, &node.meta)
}

/// Give `target` the owner, mode and modification time of `meta` (symlinks: owner and time).
fn set_metadata(target: &Path, meta: &Metadata) -> io::Result<()> {
    std::os::unix::fs::lchown(target, Some(meta.uid()), Some(meta.gid()))?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(target, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    let mtime = filetime::FileTime::from_last_modification_time(meta);
    filetime::set_symlink_file_times(target, mtime, mtime)
}

fn path_info(node: &Node) -> PathInfo {
    let file_type = node.meta.file_type();
    let kind = if file_type.is_dir() {
        PathKind::Dir
    } else if file_type.is_symlink() {
        PathKind::Symlink(
            fs::read_link(&node.host).map(|l| l.to_string_lossy().to_string()).unwrap_or_default(),
        )
    } else if file_type.is_file() {
        PathKind::File
    } else {
        PathKind::Special
    };
    let (uid, gid) = crate::userns::image_owner(node.meta.uid(), node.meta.gid());
    PathInfo { kind, mode: node.meta.mode() & 0o7777, uid, gid, mtime: node.meta.mtime() }
}

/// A whiteout in a snapshot: a character device 0/0, as overlayfs writes them.
fn is_whiteout(meta: &Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    // Marked as `layer::extract` marks it for this process's overlay mounts.
    crate::layer::OverlayXattrs::native().is_opaque_dir(dir).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn whiteout(path: &Path) {
        nix::sys::stat::mknod(
            path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
    }

    fn write(path: &Path, content: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    /// Three layers, bottom to top: a base, one that deletes and replaces, one that makes
    /// a directory opaque. (Whiteouts and trusted xattrs need root, as snapshots do.)
    fn stack(root: &Path) -> MergedView {
        let [base, middle, top] = ["base", "middle", "top"].map(|n| root.join(n));
        write(&base.join("etc/passwd"), "root");
        write(&base.join("usr/lib/a.so"), "a");
        write(&base.join("usr/lib/b.so"), "b");
        write(&base.join("opt/old/x"), "x");
        write(&base.join("data"), "file");
        symlink("usr/lib", base.join("lib")).unwrap();
        symlink("/run", base.join("var-run")).unwrap();
        fs::create_dir_all(base.join("run/lock")).unwrap();
        write(&middle.join("usr/lib/c.so"), "c");
        whiteout(&middle.join("usr/lib/b.so"));
        fs::create_dir_all(middle.join("data")).unwrap();
        write(&middle.join("data/new"), "n");
        write(&top.join("opt/old/y"), "y");
        let opaque = crate::layer::OverlayXattrs::native().opaque_name();
        xattr::set(top.join("opt/old"), opaque, b"y").unwrap();
        symlink("loop", top.join("loop")).unwrap();
        MergedView { layers: vec![top, middle, base] }
    }

    #[test]
    fn layers_merge_as_overlayfs_merges_them() {
        let tmp = tempfile::tempdir().unwrap();
        let view = stack(tmp.path());
        assert!(view.is_dir("/"));
        assert!(view.is_dir("/usr/lib"));
        assert_eq!(view.get("/usr/lib/a.so").unwrap().kind, PathKind::File);
        assert!(view.get("/usr/lib/b.so").is_none(), "a whiteout hides the lower file");
        assert_eq!(view.get("/usr/lib/c.so").unwrap().kind, PathKind::File);
        assert!(view.get("/opt/old/x").is_none(), "an opaque directory hides lower content");
        assert!(view.get("/opt/old/y").is_some());
        assert!(view.is_dir("/data"), "a directory above replaces a file below");
        assert_eq!(view.get("/lib").unwrap().kind, PathKind::Symlink("usr/lib".into()));
        assert!(view.get("/lib/a.so").is_none(), "lookups do not follow symlinks");
        assert_eq!(view.resolve("/lib/a.so").unwrap(), "/usr/lib/a.so");
        assert_eq!(view.resolve("/var-run/lock").unwrap(), "/run/lock");
        assert_eq!(view.resolve("/../etc/./x/..").unwrap(), "/etc");
        assert!(view.resolve("/loop/x").is_err());
    }

    #[test]
    fn read_file_follows_links_honours_whiteouts_and_refuses_huge_files() {
        let tmp = tempfile::tempdir().unwrap();
        let view = stack(tmp.path());
        assert_eq!(view.read_file("/etc/passwd", 100).unwrap().unwrap(), b"root");
        assert_eq!(view.read_file("/lib/a.so", 100).unwrap().unwrap(), b"a", "through a link");
        assert_eq!(view.read_file("/usr/lib/b.so", 100).unwrap(), None, "whited out");
        assert_eq!(view.read_file("/usr/lib", 100).unwrap(), None, "a directory");
        assert_eq!(view.read_file("/nowhere", 100).unwrap(), None);
        // A sparse file claiming 1 GiB: refused on its size, nothing read.
        let huge = tmp.path().join("top/etc/group");
        fs::create_dir_all(huge.parent().unwrap()).unwrap();
        fs::File::create(&huge).unwrap().set_len(1 << 30).unwrap();
        let err = view.read_file("/etc/group", 1 << 20).unwrap_err();
        assert!(err.to_string().contains("/etc/group is 1073741824 bytes"), "{err}");
    }

    #[test]
    fn bring_recreates_the_path_and_the_merged_tree_below_it() {
        let tmp = tempfile::tempdir().unwrap();
        let view = stack(tmp.path());
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        view.bring("/lib", &dest).unwrap();
        assert_eq!(fs::read_link(dest.join("lib")).unwrap(), Path::new("usr/lib"));
        let mut names: Vec<String> = fs::read_dir(dest.join("usr/lib"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["a.so", "c.so"], "merged: whiteout applied, upper file added");
        assert_eq!(fs::read_to_string(dest.join("lib/a.so")).unwrap(), "a");
        view.bring("/opt", &dest).unwrap();
        assert!(!dest.join("opt/old/x").exists(), "opaque directory");
        assert!(dest.join("opt/old/y").exists());
        view.bring("/missing/file", &dest).unwrap();
        assert!(!dest.join("missing").exists(), "a missing path brings nothing");
        assert!(!dest.join("etc").exists(), "only what was asked for");
    }
}
