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
//! `uid`, `gid` and `mode` (default 0:0, 0755) apply when the directory is made; a mount
//! that sets them gets a cache of its own (as BuildKit's, seeded from a directory so made),
//! so one image's root-owned cache never lands on another's non-root step. The lock is a
//! flock on `<dir>.lock`, a file opened for writing (which NFS's emulation needs), so it
//! also holds between ferry processes sharing a store and dies with a killed holder.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::cache::Clock;
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

/// The directories of one step's cache mounts: each directory once (two mounts of one
/// cache share it; a second lock of it would wait for the first forever), taken in name
/// order, so that steps wanting the same locked caches cannot wait for each other. Keyed
/// by [`CacheMount::name`].
pub fn acquire_all<'a>(
    store: &Store,
    mounts: impl IntoIterator<Item = &'a CacheMount>,
) -> Result<BTreeMap<String, HeldCache>, String> {
    let mut wanted: BTreeMap<String, &CacheMount> = BTreeMap::new();
    for m in mounts {
        wanted.entry(m.name()).or_insert(m);
    }
    let mut held = BTreeMap::new();
    for (name, m) in wanted {
        let dir = m.acquire(store)?;
        held.insert(name, dir);
    }
    Ok(held)
}

/// A cache directory in use by one step; the lock is released when this drops.
#[derive(Debug)]
pub struct HeldCache {
    pub dir: PathBuf,
    _lock: File,
}

impl HeldCache {
    /// A cache now in use: its lock file's mtime is its last use (`cache prune
    /// --older-than`; the test clock of `build::cache` applies). A failed stamp only makes
    /// the cache look older.
    fn used(dir: PathBuf, lock: File) -> HeldCache {
        let _ = lock.set_modified(Clock::from_env().now());
        HeldCache { dir, _lock: lock }
    }
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

    /// The cache's directory name under `mounts/`: the id's digest, with the owner and mode
    /// when they are not the defaults.
    pub fn name(&self) -> String {
        let default = (self.uid, self.gid, self.mode) == (0, 0, 0o755);
        let key = if default {
            self.id.clone()
        } else {
            format!("{}\0{}:{}:{:o}", self.id, self.uid, self.gid, self.mode)
        };
        Digest::of(key.as_bytes()).short().to_string()
    }

    /// The directory for one step, locked as `sharing` says (waiting when it must), made
    /// with the mount's owner and mode when it is new.
    fn acquire(&self, store: &Store) -> Result<HeldCache, String> {
        let mounts = store.state_dir("mounts").map_err(|e| e.to_string())?;
        // Only ferry's user may enter: a step can leave anything in a cache, device nodes
        // and setuid files included, and other users of the host must not reach them.
        let private = std::fs::Permissions::from_mode(0o700);
        std::fs::set_permissions(&mounts, private)
            .map_err(|e| format!("cannot restrict {}: {e}", mounts.display()))?;
        let name = self.name();
        match self.sharing {
            Sharing::Shared | Sharing::Locked => {
                let dir = mounts.join(&name);
                self.make(&mounts, &dir)?;
                let lock = lock_file(&dir)?;
                let locked =
                    if self.sharing == Sharing::Shared { lock.lock_shared() } else { lock.lock() };
                locked.map_err(|e| format!("cannot lock the cache {}: {e}", dir.display()))?;
                Ok(HeldCache::used(dir, lock))
            }
            Sharing::Private => {
                for n in 0.. {
                    let dir = if n == 0 {
                        mounts.join(&name)
                    } else {
                        mounts.join(format!("{name}-{n}"))
                    };
                    self.make(&mounts, &dir)?;
                    let lock = lock_file(&dir)?;
                    match lock.try_lock() {
                        Ok(()) => return Ok(HeldCache::used(dir, lock)),
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

    /// Make `dir` if it is missing, with its owner and mode set before it appears, one
    /// maker at a time (`mounts/.make.lock`), so that no step ever sees it half made.
    fn make(&self, mounts: &Path, dir: &Path) -> Result<(), String> {
        if dir.is_dir() {
            return Ok(());
        }
        let make_lock = lock_file(&mounts.join(".make"))?;
        make_lock.lock().map_err(|e| format!("cannot lock {}: {e}", mounts.display()))?;
        if dir.is_dir() {
            return Ok(());
        }
        let fresh = tempfile::Builder::new()
            .prefix(".new-")
            .tempdir_in(mounts)
            .map_err(|e| format!("cannot make a cache directory in {}: {e}", mounts.display()))?;
        // Made by ferry's user, which is 0:0 in the sandbox (root, or rootless mapped).
        if (self.uid, self.gid) != (0, 0) {
            std::os::unix::fs::chown(fresh.path(), Some(self.uid), Some(self.gid)).map_err(
                |e| {
                    format!(
                        "RUN --mount=type=cache uid={} gid={}: cannot give the cache to them: \
                         {e}{}",
                        self.uid,
                        self.gid,
                        rootless_note()
                    )
                },
            )?;
        }
        std::fs::set_permissions(fresh.path(), std::fs::Permissions::from_mode(self.mode))
            .map_err(|e| format!("cannot set the cache's mode: {e}"))?;
        std::fs::rename(fresh.keep(), dir)
            .map_err(|e| format!("cannot make the cache {}: {e}", dir.display()))
    }
}

/// Why a rootless ferry could not chown: it runs without subordinate ids.
fn rootless_note() -> String {
    let (uid, gid) = (nix::unistd::Uid::effective(), nix::unistd::Gid::effective());
    if uid.is_root() {
        return String::new();
    }
    match crate::userns::subordinate_maps(uid.as_raw(), gid.as_raw()) {
        Err(no_range) => {
            format!(" (this rootless build has only your own ids, as 0:0: {no_range})")
        }
        Ok(_) => format!(
            " (this rootless build runs without its user namespace: {}=off?)",
            crate::userns::USERNS_ENV
        ),
    }
}

/// Where a cache directory's lock is: `<dir>.lock`. Its mtime is the cache's last use.
pub fn lock_path(dir: &Path) -> PathBuf {
    let mut path = dir.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

/// The lock file of a cache directory, open for writing.
pub fn lock_file(dir: &Path) -> Result<File, String> {
    let path = lock_path(dir);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open the lock {}: {e}", path.display()))
}
