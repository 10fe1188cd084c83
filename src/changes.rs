//! What changed since a git ref, for `check --since` (a changed image must bump its version)
//! and `plan`/`build --since` (build only what changed, and what depends on it).
//!
//! "Changed since REF" compares git objects, not build outputs: the tree of the image's
//! context (the working tree's, uncommitted changes included) against REF's, the
//! Dockerfile's blob when it lives outside the context, the image's own table and
//! `[defaults]` in images.toml; an image new since REF has changed, and so has an image
//! whose parent changed. That needs no build of REF (a second worktree and a cold build
//! would make CI slow); its one imprecision is conservative: a change to a file the
//! `.dockerignore` excludes counts.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::graph::Graph;
use crate::manifest::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("--since {git_ref}: {reason}")]
    Git { git_ref: String, reason: String },
    #[error("--since {git_ref}: images.toml at {git_ref} is not valid TOML: {reason}")]
    OldManifest { git_ref: String, reason: String },
}

/// The fleet as it was at a git ref, next to what changed since.
#[derive(Debug, Clone)]
pub struct SinceRef {
    /// The `[images]` table of images.toml at REF; None when REF has no images.toml.
    pub old_images: Option<toml::Table>,
    /// Every image whose inputs differ from REF, with why, in build order.
    pub changed: BTreeMap<String, String>,
}

/// What changed in the fleet of `manifest` since `git_ref` (any commit-ish).
pub fn since(manifest: &Manifest, graph: &Graph, git_ref: &str) -> Result<SinceRef, ChangeError> {
    let root = &manifest.root;
    let git_err = |reason: String| ChangeError::Git { git_ref: git_ref.to_string(), reason };
    let file_name = Path::new(&manifest.file.name)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| "images.toml".to_string());
    let resolved =
        git(root, &["rev-parse", "--verify", "--quiet", &format!("{git_ref}^{{commit}}")])
            .map_err(|e| {
                git_err(format!("not a commit of the repository at {}: {e}", root.display()))
            })?;
    let old_text = git(root, &["show", &format!("{resolved}:./{file_name}")]).ok();
    let old: toml::Table = match &old_text {
        Some(t) => toml::from_str(t).map_err(|e| ChangeError::OldManifest {
            git_ref: git_ref.to_string(),
            reason: e.message().to_string(),
        })?,
        // No images.toml at REF: every image is new.
        None => {
            let changed = graph
                .build_order()
                .iter()
                .map(|n| (n.name.clone(), format!("new since {git_ref}")))
                .collect();
            return Ok(SinceRef { old_images: None, changed });
        }
    };
    let new: toml::Table = toml::from_str(&manifest.file.text).unwrap_or_default();
    let old_images = old.get("images").and_then(toml::Value::as_table).cloned().unwrap_or_default();
    let new_images = new.get("images").and_then(toml::Value::as_table).cloned().unwrap_or_default();
    let defaults_changed = old.get("defaults") != new.get("defaults");
    let index = WorkTree::new(root).map_err(git_err)?;

    let mut changes: BTreeMap<String, String> = BTreeMap::new();
    for node in graph.build_order() {
        let name = &node.name;
        let Some(img) = manifest.images.get(name) else { continue };
        let Some(old_img) = old_images.get(name).and_then(toml::Value::as_table) else {
            changes.insert(name.clone(), format!("new since {git_ref}"));
            continue;
        };
        let settings = |t: &toml::Table| {
            let mut t = t.clone();
            t.remove("version");
            t
        };
        let new_img =
            new_images.get(name).and_then(toml::Value::as_table).cloned().unwrap_or_default();
        let reason = if let Some(parent) = node.parents.iter().find(|p| changes.contains_key(*p)) {
            Some(format!("its parent `{parent}` changed"))
        } else if settings(old_img) != settings(&new_img) {
            Some(format!("its settings in {file_name} changed"))
        } else if defaults_changed {
            Some(format!("[defaults] in {file_name} changed"))
        } else {
            let context = normalise(&img.context_rel);
            let old_tree = git(
                root,
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    &format!("{resolved}:./{}", context.display()),
                ],
            )
            .ok();
            // A context git cannot write as a tree (nothing tracked in it) counts as changed.
            let new_tree = index.tree(&context).unwrap_or_default();
            if old_tree.as_deref() != Some(new_tree.as_str()) {
                Some(format!("its context {} differs", context.display()))
            } else {
                let dockerfile = normalise(&format!("{}/{}", img.context_rel, img.dockerfile_rel));
                if dockerfile.starts_with(&context) {
                    None
                } else {
                    let old_blob = git(
                        root,
                        &[
                            "rev-parse",
                            "--verify",
                            "--quiet",
                            &format!("{resolved}:./{}", dockerfile.display()),
                        ],
                    )
                    .ok();
                    let new_blob =
                        git(root, &["hash-object", "--", &dockerfile.to_string_lossy()]).ok();
                    (old_blob != new_blob)
                        .then(|| format!("its Dockerfile {} differs", dockerfile.display()))
                }
            }
        };
        if let Some(r) = reason {
            changes.insert(name.clone(), r);
        }
    }

    Ok(SinceRef { old_images: Some(old_images), changed: changes })
}

/// `a/./b/` → `a/b`, for git paths.
fn normalise(rel: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    git_with(dir, args, None)
}

fn git_with(dir: &Path, args: &[&str], index: Option<&Path>) -> Result<String, String> {
    let env: Vec<(&str, &Path)> = index.map(|i| ("GIT_INDEX_FILE", i)).into_iter().collect();
    crate::git::run(dir, args, &env)
}

/// The working tree as git objects, through a private copy of the index (the user's index
/// and staging are never touched): `tree(path)` is the tree hash git would commit for it.
struct WorkTree {
    root: PathBuf,
    /// The root's path inside the repository (`""` or `sub/dir/`).
    prefix: String,
    index: tempfile::NamedTempFile,
}

impl WorkTree {
    fn new(root: &Path) -> Result<WorkTree, String> {
        let prefix = git(root, &["rev-parse", "--show-prefix"])?;
        let real = git(root, &["rev-parse", "--git-path", "index"])?;
        let real =
            if Path::new(&real).is_absolute() { PathBuf::from(real) } else { root.join(real) };
        let index = tempfile::NamedTempFile::new()
            .map_err(|e| format!("cannot create a temp index: {e}"))?;
        if real.is_file() {
            copy_index(&real, index.path())
                .map_err(|e| format!("cannot copy the git index: {e}"))?;
        } else {
            // No index yet: git reads a missing file as empty, not an empty one.
            let _ = std::fs::remove_file(index.path());
        }
        Ok(WorkTree { root: root.to_path_buf(), prefix, index })
    }

    fn tree(&self, rel: &Path) -> Result<String, String> {
        let rel_s = rel.to_string_lossy();
        let spec = if rel_s.is_empty() { ".".to_string() } else { rel_s.to_string() };
        git_with(&self.root, &["add", "-A", "--", &spec], Some(self.index.path()))?;
        let full = format!("{}{}", self.prefix, rel_s);
        let mut args = vec!["write-tree".to_string()];
        if !full.is_empty() {
            args.push(format!("--prefix={}/", full.trim_end_matches('/')));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        git_with(&self.root, &args, Some(self.index.path()))
    }
}

/// Copies a git index keeping its mtime. Git trusts an entry's cached stat data only when the
/// file was last changed before the index was written; for an entry written in the same
/// second as the index ("racily clean") it compares the content instead. A copy stamped
/// *now* would make a same-second, same-size edit look clean, and the change would be missed.
fn copy_index(from: &Path, to: &Path) -> std::io::Result<()> {
    // One open file for both the bytes and their mtime: git may replace the index meanwhile.
    let mut source = std::fs::File::open(from)?;
    let written = source.metadata()?.modified()?;
    let mut copy = std::fs::File::create(to)?;
    std::io::copy(&mut source, &mut copy)?;
    copy.set_modified(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn run_git(dir: &Path, args: &[&str]) -> String {
        git(dir, args).unwrap_or_else(|e| panic!("git {args:?}: {e}"))
    }

    /// A file edited in the same second it was committed, to the same size, is still seen as
    /// changed (git would trust the stale stat data of an index copy stamped later).
    #[test]
    fn same_second_same_size_edit_is_a_change() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            std::fs::create_dir(root.join("ctx")).unwrap();
            std::fs::write(root.join("ctx/port"), "8080").unwrap();
            run_git(root, &["init", "-q"]);
            run_git(root, &["add", "-A"]);
            run_git(root, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first"]);
            std::fs::write(root.join("ctx/port"), "9090").unwrap();
            let index = root.join(".git/index");
            let index_time = std::fs::metadata(&index).unwrap().mtime();
            let edit_time = std::fs::metadata(root.join("ctx/port")).unwrap().ctime();
            if index_time != edit_time {
                continue; // a second boundary fell in between: the edit is not racy; retry
            }
            // Make sure the copy is stamped in a later second than the original index.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let tree = WorkTree::new(root).unwrap().tree(Path::new("ctx")).unwrap();
            assert_ne!(tree, run_git(root, &["rev-parse", "HEAD:ctx"]), "the edit was missed");
            return;
        }
        panic!("could not commit and edit within one second in five tries");
    }
}
