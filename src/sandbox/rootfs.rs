//! Path resolution inside a rootfs that is not (yet) the process's root.
//!
//! Mount targets are prepared before pivot_root, when an image's absolute symlink such as
//! `/etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf` would, if handed to the
//! kernel, point into the host. So every component is resolved here, by hand, the way the
//! kernel will see it once the rootfs is `/`: symlinks are followed relative to the rootfs and
//! `..` stops at its top. Nothing else runs in the rootfs at that time, so resolving and then
//! using the path is not racy.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

/// The kernel's limit on symlinks followed in one lookup.
const MAX_SYMLINKS: usize = 40;

/// What a mount target must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Dir,
    /// Anything but a directory (a file bind-mounted over a file or a device node).
    File,
}

/// Resolves the absolute in-rootfs `path` under `root`, creating what is missing: parent
/// directories (mode 0755) and the last component as `kind`. Returns the host path of the
/// target, free of symlinks, ready to be mounted on.
pub fn ensure_in_root(root: &Path, path: &str, kind: TargetKind) -> Result<PathBuf, String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not an absolute path"));
    }
    let mut pending: VecDeque<OsString> = components(Path::new(path));
    let mut resolved = PathBuf::new();
    let mut symlinks = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let is_last = pending.is_empty();
        let host = root.join(&resolved).join(&name);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                symlinks += 1;
                if symlinks > MAX_SYMLINKS {
                    return Err(format!("too many levels of symbolic links in {path:?}"));
                }
                let link = std::fs::read_link(&host).map_err(|e| {
                    format!("cannot read symlink {}: {e}", display(&resolved, &name))
                })?;
                if link.is_absolute() {
                    resolved = PathBuf::new();
                }
                let mut expanded = components(&link);
                expanded.extend(pending);
                pending = expanded;
            }
            Ok(meta) => {
                if !is_last && !meta.is_dir() {
                    return Err(format!("{} is not a directory", display(&resolved, &name)));
                }
                if is_last && kind == TargetKind::Dir && !meta.is_dir() {
                    return Err(format!(
                        "{} exists in the image and is not a directory",
                        display(&resolved, &name)
                    ));
                }
                if is_last && kind == TargetKind::File && meta.is_dir() {
                    return Err(format!(
                        "{} is a directory in the image, but a file is mounted there",
                        display(&resolved, &name)
                    ));
                }
                resolved.push(&name);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let created = if is_last && kind == TargetKind::File {
                    std::fs::OpenOptions::new().write(true).create_new(true).open(&host).map(drop)
                } else {
                    std::fs::DirBuilder::new().mode(0o755).create(&host)
                };
                created.map_err(|e| format!("cannot create {}: {e}", display(&resolved, &name)))?;
                resolved.push(&name);
            }
            Err(e) => return Err(format!("cannot inspect {}: {e}", display(&resolved, &name))),
        }
    }
    Ok(root.join(resolved))
}

/// The normal components of `path`, with `..` kept (resolved against what precedes them
/// only once symlinks are expanded) and `.` and the root dropped.
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// An in-rootfs path for messages.
fn display(resolved: &Path, name: &OsString) -> String {
    Path::new("/").join(resolved).join(name).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn creates_missing_parents_and_the_target() {
        let root = tempfile::tempdir().unwrap();
        let host = ensure_in_root(root.path(), "/run/secrets/token", TargetKind::File).unwrap();
        assert_eq!(host, root.path().join("run/secrets/token"));
        assert!(host.is_file());
        let dir = ensure_in_root(root.path(), "/var/cache/apt", TargetKind::Dir).unwrap();
        assert!(dir.is_dir());
    }

    #[test]
    fn absolute_symlinks_stay_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // A link that, followed on the host, would land in `outside`.
        symlink(outside.path().join("resolv.conf"), root.path().join("etc/resolv.conf")).unwrap();
        let host = ensure_in_root(root.path(), "/etc/resolv.conf", TargetKind::File).unwrap();
        assert!(host.starts_with(root.path()), "{}", host.display());
        assert!(host.is_file());
        assert!(!outside.path().join("resolv.conf").exists());
    }

    #[test]
    fn dotdot_stops_at_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        symlink("../../../../x", root.path().join("a/up")).unwrap();
        let host = ensure_in_root(root.path(), "/a/up", TargetKind::Dir).unwrap();
        assert_eq!(host, root.path().join("x"));
        let host = ensure_in_root(root.path(), "/../../y", TargetKind::Dir).unwrap();
        assert_eq!(host, root.path().join("y"));
    }

    #[test]
    fn relative_symlinks_resolve_from_their_directory() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib")).unwrap();
        symlink("usr/lib", root.path().join("lib")).unwrap();
        let host = ensure_in_root(root.path(), "/lib/cache", TargetKind::Dir).unwrap();
        assert_eq!(host, root.path().join("usr/lib/cache"));
    }

    #[test]
    fn kind_mismatches_and_loops_are_errors() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dir")).unwrap();
        std::fs::write(root.path().join("file"), b"").unwrap();
        symlink("/loop", root.path().join("loop")).unwrap();
        let err = ensure_in_root(root.path(), "/dir", TargetKind::File).unwrap_err();
        assert!(err.contains("/dir is a directory"), "{err}");
        let err = ensure_in_root(root.path(), "/file", TargetKind::Dir).unwrap_err();
        assert!(err.contains("/file exists in the image and is not a directory"), "{err}");
        let err = ensure_in_root(root.path(), "/file/x", TargetKind::Dir).unwrap_err();
        assert!(err.contains("/file is not a directory"), "{err}");
        let err = ensure_in_root(root.path(), "/loop/x", TargetKind::Dir).unwrap_err();
        assert!(err.contains("too many levels"), "{err}");
        let err = ensure_in_root(root.path(), "relative", TargetKind::Dir).unwrap_err();
        assert!(err.contains("not an absolute path"), "{err}");
    }
}
