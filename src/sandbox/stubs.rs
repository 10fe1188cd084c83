//! Removing from the upper dir what the sandbox's own set-up put there.
//!
//! Mounting `/proc`, resolv.conf, a cache or a secret on a path the image lacks means
//! creating a mount point in the merged rootfs, which overlayfs writes to the upper dir
//! (together with copies of the lower parent directories it had to create it in). The upper
//! dir is empty before set-up and nothing but the set-up runs until the init reports
//! `Ready`, so everything in it at that moment is set-up residue: it is recorded then, and
//! after the run each recorded entry that the RUN command left exactly as it was (same
//! inode, ctime, type, mode and owner) is judged as docker's runtime leaves it:
//! - an empty file (the stub of resolv.conf, hosts, a secret or a bound file) is removed;
//! - a directory the image did not have (a cache, tmpfs, bind or `/run/secrets` mount point,
//!   with the parents created for it) stays, empty and 0755, as docker 20.10 keeps it;
//! - a copy of a lower directory made only to hold a stub is removed once empty and not
//!   opaque.
//!
//! Removal goes deepest first. A directory in which the command created and removed
//! something is kept: an unchanged directory entry in a layer is harmless, a lost change is
//! not.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::OverlayXattrs;

/// The mount points docker's runtime (runc) creates in a rootfs that lacks them; BuildKit
/// keeps them in the RUN's layer, 0755 and empty, so a ferry layer has them too.
const RUNTIME_MOUNT_POINTS: [&str; 3] = ["dev", "proc", "sys"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct EntryState {
    ino: u64,
    /// Changes with any change to the inode, and differs for a new inode that reuses the
    /// number of a removed one.
    ctime: (i64, i64),
    mode: u32,
    uid: u32,
    gid: u32,
}

impl EntryState {
    fn of(meta: &std::fs::Metadata) -> Self {
        EntryState {
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }
}

/// The upper dir's content right after set-up.
#[derive(Debug, Default)]
pub struct SetupResidue {
    /// Relative paths, parents before children.
    entries: Vec<(PathBuf, EntryState)>,
}

impl SetupResidue {
    pub fn record(upper: &Path) -> std::io::Result<Self> {
        let mut entries = Vec::new();
        for entry in walkdir::WalkDir::new(upper).min_depth(1).follow_links(false) {
            let entry = entry.map_err(std::io::Error::other)?;
            let meta = entry.metadata().map_err(std::io::Error::other)?;
            let relative =
                entry.path().strip_prefix(upper).map_err(std::io::Error::other)?.to_path_buf();
            entries.push((relative, EntryState::of(&meta)));
        }
        Ok(SetupResidue { entries })
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes each recorded entry the run left untouched that docker's runtime would not
    /// leave; `lowers` are the image's layer directories the upper dir was mounted over.
    pub fn remove(
        &self,
        upper: &Path,
        lowers: &[PathBuf],
        xattrs: OverlayXattrs,
    ) -> std::io::Result<()> {
        // Judge every entry before removing any: removing a child changes its parent's ctime.
        let mut untouched = Vec::new();
        for (relative, recorded) in &self.entries {
            let path = upper.join(relative);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if EntryState::of(&meta) != *recorded {
                continue;
            }
            if RUNTIME_MOUNT_POINTS.iter().any(|m| relative.as_os_str() == *m) && meta.is_dir() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
                continue;
            }
            if meta.is_dir() {
                let in_image = lowers.iter().any(|lower| lower.join(relative).is_dir());
                if in_image && !xattrs.is_opaque_dir(&path)? {
                    untouched.push((path, true));
                }
            } else if meta.is_file() && meta.len() == 0 {
                untouched.push((path, false));
            }
        }
        untouched.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        for (path, is_dir) in untouched {
            if !is_dir {
                std::fs::remove_file(&path)?;
            } else if std::fs::read_dir(&path)?.next().is_none() {
                std::fs::remove_dir(&path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) -> Vec<String> {
        let mut paths: Vec<String> = walkdir::WalkDir::new(root)
            .min_depth(1)
            .into_iter()
            .map(|e| e.unwrap().path().strip_prefix(root).unwrap().display().to_string())
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn removes_untouched_stubs_and_keeps_what_the_run_changed() {
        let upper = tempfile::tempdir().unwrap();
        let u = upper.path();
        std::fs::create_dir_all(u.join("etc")).unwrap();
        std::fs::write(u.join("etc/resolv.conf"), b"").unwrap();
        std::fs::create_dir_all(u.join("run/secrets")).unwrap();
        std::fs::write(u.join("run/secrets/token"), b"").unwrap();
        std::fs::create_dir_all(u.join("proc")).unwrap();
        std::fs::create_dir_all(u.join("tmp/cache")).unwrap();
        let residue = SetupResidue::record(u).unwrap();
        assert!(!residue.is_empty());

        // The run writes a file next to a stub, recreates a stub dir, and writes into a
        // recorded directory.
        std::fs::write(u.join("etc/motd"), b"hello").unwrap();
        std::fs::remove_dir(u.join("proc")).unwrap();
        std::fs::create_dir(u.join("proc")).unwrap();
        std::fs::write(u.join("tmp/new"), b"x").unwrap();

        // The image has /etc, /run and /tmp: their copies go once empty; its /tmp/cache and
        // /run/secrets are new mount points and stay, as docker leaves them.
        let lower = tempfile::tempdir().unwrap();
        for d in ["etc", "run", "tmp"] {
            std::fs::create_dir(lower.path().join(d)).unwrap();
        }
        residue.remove(u, &[lower.path().to_path_buf()], OverlayXattrs::User).unwrap();
        assert_eq!(
            tree(u),
            vec!["etc", "etc/motd", "proc", "run", "run/secrets", "tmp", "tmp/cache", "tmp/new"]
        );

        // Untouched mount points the image lacked stay, with the parents made for them.
        let upper = tempfile::tempdir().unwrap();
        let u = upper.path();
        std::fs::create_dir_all(u.join("proc")).unwrap();
        std::fs::create_dir_all(u.join("mnt/cache")).unwrap();
        std::fs::create_dir_all(u.join("etc")).unwrap();
        std::fs::write(u.join("etc/hosts"), b"").unwrap();
        let residue = SetupResidue::record(u).unwrap();
        let lower = tempfile::tempdir().unwrap();
        std::fs::create_dir(lower.path().join("etc")).unwrap();
        residue.remove(u, &[lower.path().to_path_buf()], OverlayXattrs::User).unwrap();
        assert_eq!(tree(u), vec!["mnt", "mnt/cache", "proc"]);
    }

    #[test]
    fn keeps_opaque_and_rechowned_directories() {
        let upper = tempfile::tempdir().unwrap();
        let u = upper.path();
        std::fs::create_dir(u.join("opaque")).unwrap();
        std::fs::create_dir(u.join("chmodded")).unwrap();
        std::fs::create_dir(u.join("plain")).unwrap();
        let residue = SetupResidue::record(u).unwrap();
        xattr::set(u.join("opaque"), "user.overlay.opaque", b"y").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(u.join("chmodded"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        // All three are copies of the image's directories.
        let lower = tempfile::tempdir().unwrap();
        for d in ["opaque", "chmodded", "plain"] {
            std::fs::create_dir(lower.path().join(d)).unwrap();
        }
        residue.remove(u, &[lower.path().to_path_buf()], OverlayXattrs::User).unwrap();
        assert_eq!(tree(u), vec!["chmodded", "opaque"]);
    }
}
