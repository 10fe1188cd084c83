use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::time::Duration;

use filetime::FileTime;

use super::*;
use crate::context::SourceTree;

const HOUR_NS: i64 = 3_600_000_000_000;

fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, content).unwrap();
    }
    dir
}

fn select(root: &Path, sources: &[&str]) -> Selection {
    let tree = SourceTree::build_context(root, None).unwrap();
    let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
    tree.select(&sources, &[]).unwrap()
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// Digest as if hashed an hour from now, so every file of the test counts as settled.
fn later_digest(selection: &Selection, cache: &StatCache) -> Digest {
    selection.content_digest_at(cache, now_ns() + HOUR_NS).unwrap()
}

fn digest(root: &Path, sources: &[&str]) -> Digest {
    select(root, sources).content_digest(&StatCache::in_memory()).unwrap()
}

fn set_mtime(path: &Path, seconds: i64) {
    filetime::set_file_mtime(path, FileTime::from_unix_time(seconds, 0)).unwrap();
}

/// Wait until the filesystem's clock has moved past `path`'s ctime, so that the next change
/// to it gets a different ctime (kernel timestamps advance in coarse ticks).
fn wait_for_ctime_tick(dir: &Path, path: &Path) {
    let old = std::fs::metadata(path).unwrap();
    let probe = dir.join(".tick-probe");
    loop {
        std::fs::write(&probe, b"").unwrap();
        let m = std::fs::metadata(&probe).unwrap();
        if (m.ctime(), m.ctime_nsec()) > (old.ctime(), old.ctime_nsec()) {
            std::fs::remove_file(&probe).unwrap();
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn same_content_same_digest_whatever_the_mtime_or_location() {
    let files = [("src/a.rs", "fn a() {}"), ("src/b/c.rs", "// c"), ("README", "hi")];
    let one = context(&files);
    let two = context(&files);
    set_mtime(&two.path().join("src/a.rs"), 1_000);
    set_mtime(&two.path().join("src/b"), 2_000);
    assert_eq!(digest(one.path(), &["src", "README"]), digest(two.path(), &["src", "README"]));
    // Stable across runs.
    assert_eq!(digest(one.path(), &["src"]), digest(one.path(), &["src"]));
}

#[test]
fn what_is_copied_changes_the_digest() {
    let dir = context(&[("src/a.rs", "aaaa"), ("src/b.rs", "bbbb"), ("other", "o")]);
    let root = dir.path();
    let a = root.join("src/a.rs");
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
    let base = digest(root, &["src"]);

    // A file outside the selection changes nothing.
    std::fs::write(root.join("other"), "changed").unwrap();
    std::fs::write(root.join("unrelated"), "new").unwrap();
    assert_eq!(digest(root, &["src"]), base);

    // One changed byte, same size.
    std::fs::write(root.join("src/a.rs"), "aaab").unwrap();
    let changed = digest(root, &["src"]);
    assert_ne!(changed, base);
    std::fs::write(root.join("src/a.rs"), "aaaa").unwrap();
    assert_eq!(digest(root, &["src"]), base);

    // Mode, including setuid.
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o755)).unwrap();
    let executable = digest(root, &["src"]);
    assert_ne!(executable, base);
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o4755)).unwrap();
    assert_ne!(digest(root, &["src"]), executable);
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(digest(root, &["src"]), base);

    // A renamed file, a new file, a removed file.
    std::fs::rename(root.join("src/b.rs"), root.join("src/c.rs")).unwrap();
    assert_ne!(digest(root, &["src"]), base);
    std::fs::rename(root.join("src/c.rs"), root.join("src/b.rs")).unwrap();
    std::fs::write(root.join("src/new.rs"), "").unwrap();
    assert_ne!(digest(root, &["src"]), base);
    std::fs::remove_file(root.join("src/new.rs")).unwrap();

    // A symlink's target.
    symlink("a.rs", root.join("src/link")).unwrap();
    let linked = digest(root, &["src"]);
    std::fs::remove_file(root.join("src/link")).unwrap();
    symlink("b.rs", root.join("src/link")).unwrap();
    assert_ne!(digest(root, &["src"]), linked);
}

#[test]
fn owner_enters_the_digest_unless_left_out() {
    let dir = context(&[("f", "x")]);
    let selection = select(dir.path(), &["f"]);
    let cache = StatCache::in_memory();
    let base = selection.content_digest(&cache).unwrap();
    let mut chowned = selection.clone();
    chowned.items[0].entry.uid += 1;
    assert_ne!(chowned.content_digest(&cache).unwrap(), base);
    let mut regrouped = selection.clone();
    regrouped.items[0].entry.gid += 1;
    assert_ne!(regrouped.content_digest(&cache).unwrap(), base);

    let tree = SourceTree::build_context(dir.path(), None).unwrap().without_ownership_in_digest();
    let anonymous = tree.select(&["f".to_string()], &[]).unwrap();
    let mut chowned = anonymous.clone();
    chowned.items[0].entry.uid += 1;
    assert_eq!(chowned.content_digest(&cache).unwrap(), anonymous.content_digest(&cache).unwrap());
}

#[test]
fn an_ignored_file_changing_changes_nothing() {
    let dir = context(&[(".dockerignore", "*.log\n"), ("app.rs", "x"), ("debug.log", "1")]);
    let base = digest(dir.path(), &["."]);
    std::fs::write(dir.path().join("debug.log"), "22").unwrap();
    assert_eq!(digest(dir.path(), &["."]), base);
}

#[test]
fn stat_cache_serves_an_unchanged_tree_without_reading() {
    let files: Vec<(String, String)> =
        (0..40).map(|i| (format!("d{}/f{i}.txt", i % 4), format!("content {i}"))).collect();
    let borrowed: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
    let dir = context(&borrowed);
    let store = tempfile::tempdir().unwrap();
    let cache_path = store.path().join("cache/stat-cache.json");

    let cold = StatCache::load(&cache_path);
    assert!(cold.is_empty());
    let first = later_digest(&select(dir.path(), &["."]), &cold);
    assert_eq!(cold.stats().files_hashed, 40);
    assert_eq!(cold.stats().files_from_cache, 0);
    assert_eq!(cold.len(), 40);
    cold.save().unwrap();

    // A new process: the saved cache answers for every file.
    let warm = StatCache::load(&cache_path);
    assert_eq!(warm.len(), 40);
    let second = later_digest(&select(dir.path(), &["."]), &warm);
    assert_eq!(second, first);
    assert_eq!(warm.stats(), CacheStats { files_hashed: 0, files_from_cache: 40, bytes_hashed: 0 });
    // An unchanged cache is not rewritten; the file is still there and whole.
    warm.save().unwrap();
    assert_eq!(StatCache::load(&cache_path).len(), 40);
}

#[test]
fn stat_cache_sees_a_same_size_change_with_the_mtime_put_back() {
    let dir = context(&[("a.txt", "aaaa"), ("b.txt", "bbbb")]);
    let a = dir.path().join("a.txt");
    set_mtime(&a, 1_000_000);
    let store = tempfile::tempdir().unwrap();
    let cache_path = store.path().join("stat-cache.json");

    let cache = StatCache::load(&cache_path);
    let first = later_digest(&select(dir.path(), &["."]), &cache);
    cache.save().unwrap();

    // Rewrite in place (same inode, same size) and restore the mtime, as `tar` would.
    wait_for_ctime_tick(dir.path(), &a);
    let inode = std::fs::metadata(&a).unwrap().ino();
    std::fs::write(&a, "aaab").unwrap();
    set_mtime(&a, 1_000_000);
    assert_eq!(std::fs::metadata(&a).unwrap().ino(), inode);

    let cache = StatCache::load(&cache_path);
    let second = later_digest(&select(dir.path(), &["."]), &cache);
    assert_ne!(second, first);
    assert_eq!(cache.stats().files_hashed, 1);
    assert_eq!(cache.stats().files_from_cache, 1);
    assert_eq!(cache.stats().bytes_hashed, 4);
}

#[test]
fn files_changed_just_now_are_not_cached() {
    let dir = context(&[("fresh", "x")]);
    // An mtime ahead of the clock can only be "just now" to the racy-clean rule.
    filetime::set_file_mtime(
        dir.path().join("fresh"),
        FileTime::from_unix_time(now_ns() / 1_000_000_000 + 3_600, 0),
    )
    .unwrap();
    let cache = StatCache::in_memory();
    let selection = select(dir.path(), &["fresh"]);
    let first = selection.content_digest(&cache).unwrap();
    assert!(cache.is_empty());
    assert_eq!(selection.content_digest(&cache).unwrap(), first);
    assert_eq!(cache.stats().files_hashed, 2);
    assert_eq!(cache.stats().files_from_cache, 0);
}

#[test]
fn a_corrupt_cache_file_is_replaced_not_fatal() {
    let dir = context(&[("f", "x")]);
    let store = tempfile::tempdir().unwrap();
    let cache_path = store.path().join("stat-cache.json");
    std::fs::write(&cache_path, b"{ not json").unwrap();
    let cache = StatCache::load(&cache_path);
    assert!(cache.is_empty());
    later_digest(&select(dir.path(), &["f"]), &cache);
    cache.save().unwrap();
    assert_eq!(StatCache::load(&cache_path).len(), 1);
    // Nothing but the cache file is left in its directory (the temporary file was renamed).
    let names: Vec<_> =
        std::fs::read_dir(store.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["stat-cache.json"]);
}

#[test]
fn a_file_that_cannot_be_read_is_an_error_naming_it() {
    let dir = context(&[("gone", "x")]);
    let selection = select(dir.path(), &["gone"]);
    std::fs::remove_file(dir.path().join("gone")).unwrap();
    let err = selection.content_digest(&StatCache::in_memory()).unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
}
