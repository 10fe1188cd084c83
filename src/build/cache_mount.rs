//! `RUN --mount=type=cache`: directories in the store that outlive builds (package
//! caches, compiler caches), shared between steps and images by id, as BuildKit's are.
//!
//! `sharing` says how steps that run at once share one id (a fleet builds images in
//! parallel, and `apt` refuses to run twice on one cache):
//! * `shared` (default): all at once;
//! * `locked`: one at a time, the others wait;
//! * `private`: one at a time; a step that finds the cache busy gets another directory of
//!   the same id (a pool: `id`, `id-1`, …, kept for later steps).
//!
//! `uid`, `gid` and `mode` (default 0:0, 0755) apply when the directory is made. The lock is
//! a flock on the directory itself, so it also holds between ferry processes sharing a
//! store, and dies with a killed holder.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::store::Store;

/// The options BuildKit takes for a cache mount that ferry implements.
const OPTIONS: [&str; 9] =
    ["type", "target", "dst", "destination", "id", "sharing", "mode", "uid", "gid"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

/// A cache mount as the Dockerfile asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMount {
    pub id: String,
    pub sharing: Sharing,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The directories of one step's cache mounts, by id: each id once (two mounts of one id
/// share its directory; a second lock of it would wait for the first forever), taken in
/// id order, so that steps wanting the same locked caches cannot wait for each other.
pub fn acquire_all<'a>(
    store: &Store,
    mounts: impl IntoIterator<Item = &'a CacheMount>,
) -> Result<BTreeMap<String, HeldCache>, String> {
    let mut wanted: BTreeMap<&str, &CacheMount> = BTreeMap::new();
    for m in mounts {
        wanted.entry(m.id.as_str()).or_insert(m);
    }
    let mut held = BTreeMap::new();
    for (id, m) in wanted {
        held.insert(id.to_string(), m.acquire(store)?);
    }
    Ok(held)
}

/// A cache directory in use by one step; the lock is released when this drops.
#[derive(Debug)]
pub struct HeldCache {
    pub dir: PathBuf,
    _lock: File,
}

impl CacheMount {
    /// From the mount's `key=value` options; `target` is where it is mounted (the default id).
    pub fn parse(opts: &BTreeMap<String, String>, target: &str) -> Result<CacheMount, String> {
        if let Some(unknown) = opts.keys().find(|k| !OPTIONS.contains(&k.as_str())) {
            return Err(format!(
                "RUN --mount=type=cache: option `{unknown}` is not supported (ferry takes {})",
                OPTIONS[4..].join(", ")
            ));
        }
        let sharing = match opts.get("sharing").map(String::as_str) {
            None | Some("shared") => Sharing::Shared,
            Some("private") => Sharing::Private,
            Some("locked") => Sharing::Locked,
            Some(other) => {
                return Err(format!(
                    "RUN --mount=type=cache: sharing `{other}` is not shared, private or locked"
                ))
            }
        };
        let number = |name: &str, default: u32, radix: u32| -> Result<u32, String> {
            match opts.get(name) {
                None => Ok(default),
                Some(v) => u32::from_str_radix(v, radix).map_err(|_| {
                    let kind = if radix == 8 { "an octal mode" } else { "a number" };
                    format!("RUN --mount=type=cache: {name} `{v}` is not {kind}")
                }),
            }
        };
        let mode = number("mode", 0o755, 8)?;
        if mode > 0o7777 {
            return Err(format!("RUN --mount=type=cache: mode {mode:o} is not a file mode"));
        }
        Ok(CacheMount {
            id: opts.get("id").cloned().unwrap_or_else(|| target.to_string()),
            sharing,
            uid: number("uid", 0, 10)?,
            gid: number("gid", 0, 10)?,
            mode,
        })
    }

    /// The directory for one step, locked as `sharing` says (waiting when it must), made
    /// with the mount's owner and mode when it is new.
    fn acquire(&self, store: &Store) -> Result<HeldCache, String> {
        let mounts = store.state_dir("mounts").map_err(|e| e.to_string())?;
        let name = Digest::of(self.id.as_bytes()).short().to_string();
        match self.sharing {
            Sharing::Shared | Sharing::Locked => {
                let dir = mounts.join(&name);
                self.make(&dir)?;
                let lock = open(&dir)?;
                let locked =
                    if self.sharing == Sharing::Shared { lock.lock_shared() } else { lock.lock() };
                locked.map_err(|e| format!("cannot lock the cache {}: {e}", dir.display()))?;
                Ok(HeldCache { dir, _lock: lock })
            }
            Sharing::Private => {
                for n in 0.. {
                    let dir = if n == 0 {
                        mounts.join(&name)
                    } else {
                        mounts.join(format!("{name}-{n}"))
                    };
                    self.make(&dir)?;
                    let lock = open(&dir)?;
                    match lock.try_lock() {
                        Ok(()) => return Ok(HeldCache { dir, _lock: lock }),
                        Err(std::fs::TryLockError::WouldBlock) => continue,
                        Err(std::fs::TryLockError::Error(e)) => {
                            return Err(format!("cannot lock the cache {}: {e}", dir.display()))
                        }
                    }
                }
                unreachable!("the pool is unbounded")
            }
        }
    }

    /// Make `dir` if it is missing, with its owner and mode set before it appears (a step
    /// running at once sees it whole or not at all).
    fn make(&self, dir: &Path) -> Result<(), String> {
        if dir.is_dir() {
            return Ok(());
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        let fresh = tempfile::Builder::new()
            .prefix(".new-")
            .tempdir_in(parent)
            .map_err(|e| format!("cannot make a cache directory in {}: {e}", parent.display()))?;
        // Made by ferry's user, which is 0:0 in the sandbox (root, or rootless mapped).
        if (self.uid, self.gid) != (0, 0) {
            std::os::unix::fs::chown(fresh.path(), Some(self.uid), Some(self.gid)).map_err(
                |e| {
                    format!(
                        "RUN --mount=type=cache uid={} gid={}: cannot give the cache to them: {e}",
                        self.uid, self.gid
                    )
                },
            )?;
        }
        std::fs::set_permissions(fresh.path(), std::fs::Permissions::from_mode(self.mode))
            .map_err(|e| format!("cannot set the cache's mode: {e}"))?;
        let fresh = fresh.keep();
        // Never over another step's directory, even an empty one it has locked already.
        let placed = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &fresh,
            nix::fcntl::AT_FDCWD,
            dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        if let Err(e) = placed {
            let _ = std::fs::remove_dir(&fresh);
            // Another step made it first: theirs is as good.
            if !dir.is_dir() {
                return Err(format!("cannot make the cache {}: {}", dir.display(), e.desc()));
            }
        }
        Ok(())
    }
}

fn open(dir: &Path) -> Result<File, String> {
    File::open(dir).map_err(|e| format!("cannot open the cache {}: {e}", dir.display()))
}
