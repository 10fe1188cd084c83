//! Everything ferry asks git, in one place, and the facts about a commit a build needs,
//! remembered in the store so that a build of a commit already seen starts no git at all.
//!
//! A build needs, per commit: the commit's time (the default epoch), the `origin` URL and,
//! per image, the newest commit that touched the image's inputs (its `revision` label).
//! HEAD is read from the repository's files (no process), then the facts come from the
//! store's `git/` directory; what is missing costs one `git` process per kind of fact for
//! the whole fleet (one history walk for every image's revision), never one per image.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::store::Store;

/// Run git in `dir` with `env` set and return its trimmed stdout, or its stderr when it
/// fails. The one place ferry starts git.
pub fn run(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<String, String> {
    crate::report::work::process_started();
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A git work tree found from a directory inside it, read without starting git.
#[derive(Debug, Clone)]
pub struct Repo {
    /// The work tree's top directory (canonical).
    pub root: PathBuf,
    /// `.git` or, in a linked work tree, its private git directory.
    git_dir: PathBuf,
    /// Where refs and config live (the main repository's `.git` for a linked work tree).
    common_dir: PathBuf,
}

impl Repo {
    /// The repository `dir` is in, if any (`.git` a directory, or a file `gitdir: ...`).
    pub fn find(dir: &Path) -> Option<Repo> {
        let start = std::fs::canonicalize(dir).ok()?;
        let root = start.ancestors().find(|d| d.join(".git").exists())?.to_path_buf();
        let dot_git = root.join(".git");
        let git_dir = if dot_git.is_dir() {
            dot_git
        } else {
            let text = std::fs::read_to_string(&dot_git).ok()?;
            let target = PathBuf::from(text.strip_prefix("gitdir:")?.trim());
            if target.is_absolute() {
                target
            } else {
                root.join(target)
            }
        };
        let common_dir = match std::fs::read_to_string(git_dir.join("commondir")) {
            Ok(rel) => git_dir.join(rel.trim()),
            Err(_) => git_dir.clone(),
        };
        Some(Repo { root, git_dir, common_dir })
    }

    /// The commit HEAD names (None: an unborn branch, or refs ferry cannot read, such as
    /// the reftable format, in which case callers ask git).
    pub fn head(&self) -> Option<String> {
        let head = std::fs::read_to_string(self.git_dir.join("HEAD")).ok()?;
        let head = head.trim();
        let Some(name) = head.strip_prefix("ref:").map(str::trim) else {
            return is_object_id(head).then(|| head.to_string());
        };
        for dir in [&self.git_dir, &self.common_dir] {
            if let Ok(id) = std::fs::read_to_string(dir.join(name)) {
                let id = id.trim();
                return is_object_id(id).then(|| id.to_string());
            }
        }
        let packed = std::fs::read_to_string(self.common_dir.join("packed-refs")).ok()?;
        packed
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('^'))
            .filter_map(|l| l.split_once(' '))
            .find(|(_, r)| *r == name)
            .map(|(id, _)| id.to_string())
            .filter(|id| is_object_id(id))
    }

    /// `path` relative to the work tree's root (None: outside it).
    fn relative(&self, path: &Path) -> Option<String> {
        let path = std::fs::canonicalize(path).ok()?;
        let rel = path.strip_prefix(&self.root).ok()?;
        Some(rel.to_string_lossy().to_string())
    }

    /// A fingerprint of the repository's config (its size and mtime): the `origin` URL
    /// is remembered per commit and per config.
    fn config_stamp(&self) -> String {
        std::fs::metadata(self.common_dir.join("config"))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                format!("{}.{}.{}", m.len(), m.mtime(), m.mtime_nsec())
            })
            .unwrap_or_default()
    }
}

fn is_object_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What the store remembers of one commit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CommitFacts {
    /// The committer time, seconds since 1970.
    time: Option<i64>,
    /// The `origin` remote's URL per config stamp (None: there is none).
    origin: BTreeMap<String, Option<String>>,
    /// The newest commit touching each input set (its paths, relative, joined by NUL).
    revisions: BTreeMap<String, Option<String>>,
}

/// The facts of HEAD for one build: read from the store, completed with git when missing.
pub struct HeadFacts<'a> {
    repo: Repo,
    commit: String,
    store: Option<&'a Store>,
    facts: CommitFacts,
}

impl<'a> HeadFacts<'a> {
    /// The facts of the commit checked out at `dir`, remembered in `store` (None: nothing
    /// remembered, as for a command without a store). None outside a git work tree or
    /// before the first commit.
    pub fn of(dir: &Path, store: Option<&'a Store>) -> Option<HeadFacts<'a>> {
        let repo = Repo::find(dir)?;
        let commit = match repo.head() {
            Some(c) => c,
            None => run(&repo.root, &["rev-parse", "--verify", "HEAD"], &[]).ok()?,
        };
        let facts = store
            .and_then(|s| std::fs::read(Self::path(s, &commit)?).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Some(HeadFacts { repo, commit, store, facts })
    }

    fn path(store: &Store, commit: &str) -> Option<PathBuf> {
        Some(store.state_dir("git").ok()?.join(format!("{commit}.json")))
    }

    /// Write what was learnt back; a store that cannot be written only costs a git later.
    fn save(&self) {
        if let Some(path) = self.store.and_then(|s| Self::path(s, &self.commit)) {
            if let Ok(bytes) = serde_json::to_vec(&self.facts) {
                let _ = crate::store::atomic_write(&path, &bytes);
            }
        }
    }

    pub fn commit(&self) -> &str {
        &self.commit
    }

    /// The commit's committer time.
    pub fn time(&mut self) -> Result<i64, String> {
        if let Some(t) = self.facts.time {
            return Ok(t);
        }
        let out = run(&self.repo.root, &["show", "-s", "--format=%ct", &self.commit], &[])?;
        let t = out.parse().map_err(|_| format!("git gave `{out}` as the commit time"))?;
        self.facts.time = Some(t);
        self.save();
        Ok(t)
    }

    /// The `origin` remote's URL, as configured (None: no such remote).
    pub fn origin(&mut self) -> Option<String> {
        let stamp = self.repo.config_stamp();
        if let Some(url) = self.facts.origin.get(&stamp) {
            return url.clone();
        }
        let url = run(&self.repo.root, &["config", "--get", "remote.origin.url"], &[])
            .ok()
            .filter(|u| !u.is_empty());
        // One entry: an older config's answer is of no further use.
        self.facts.origin = BTreeMap::from([(stamp, url.clone())]);
        self.save();
        url
    }

    /// For each input set (a list of paths: a context and a Dockerfile), the newest commit
    /// that touched any of them, in the order given. The sets not remembered are found in
    /// one walk of the history, stopped as soon as every one has its commit.
    pub fn revisions(&mut self, sets: &[Vec<PathBuf>]) -> Vec<Option<String>> {
        let keys: Vec<Option<String>> = sets
            .iter()
            .map(|paths| {
                let rel: Option<Vec<String>> =
                    paths.iter().map(|p| self.repo.relative(p)).collect();
                rel.map(|r| r.join("\0"))
            })
            .collect();
        let missing: Vec<String> = keys
            .iter()
            .flatten()
            .filter(|k| !self.facts.revisions.contains_key(*k))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            let found = self.walk(&missing);
            for key in missing {
                let rev = found.get(&key).cloned();
                self.facts.revisions.insert(key, rev);
            }
            self.save();
        }
        keys.iter()
            .map(|k| k.as_ref().and_then(|k| self.facts.revisions.get(k).cloned().flatten()))
            .collect()
    }

    /// One `git log` over the union of the sets' paths, newest first: a set's revision is
    /// the first commit that names a file under one of its paths.
    fn walk(&self, sets: &[String]) -> BTreeMap<String, String> {
        let split: Vec<(&String, Vec<&str>)> =
            sets.iter().map(|k| (k, k.split('\0').collect())).collect();
        let mut pathspecs: Vec<&str> = split.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        pathspecs.sort_unstable();
        pathspecs.dedup();
        let covers = |path: &str, name: &str| {
            path.is_empty() || name == path || name.starts_with(&format!("{path}/"))
        };
        let mut found = BTreeMap::new();
        crate::report::work::process_started();
        let mut cmd = Command::new("git");
        cmd.arg("-C")
            .arg(&self.repo.root)
            .args(["log", "--format=format:commit %H", "--name-only", "--no-renames", "-z"])
            .arg(&self.commit)
            .arg("--")
            // `:/` roots each spec at the top of the work tree; a top-level context is `.`.
            .args(
                pathspecs.iter().map(|p| if p.is_empty() { ":/".into() } else { format!(":/{p}") }),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let Ok(mut child) = cmd.spawn() else { return found };
        let Some(stdout) = child.stdout.take() else { return found };
        let mut commit = String::new();
        for token in BufReader::new(stdout).split(0) {
            let Ok(token) = token else { break };
            let token = String::from_utf8_lossy(&token);
            let token = token.trim_start_matches('\n');
            let name = match token.strip_prefix("commit ") {
                Some(rest) => {
                    let (id, first) = rest.split_once('\n').unwrap_or((rest, ""));
                    commit = id.to_string();
                    first
                }
                None => token,
            };
            if name.is_empty() || commit.is_empty() {
                continue;
            }
            for (key, paths) in &split {
                if !found.contains_key(*key) && paths.iter().any(|p| covers(p, name)) {
                    found.insert((*key).clone(), commit.clone());
                }
            }
            if found.len() == split.len() {
                break;
            }
        }
        // Done early or not: the rest of the history is not needed.
        let _ = child.kill();
        let _ = child.wait();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let mut all =
            vec!["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"];
        all.extend_from_slice(args);
        run(dir, &all, &[]).unwrap_or_else(|e| panic!("git {args:?}: {e}"))
    }

    fn commit(dir: &Path, file: &str, message: &str) -> String {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, message).unwrap();
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-q", "-m", message]);
        git(dir, &["rev-parse", "HEAD"])
    }

    #[test]
    fn head_is_read_from_loose_and_packed_refs_without_git() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        git(dir, &["init", "-q", "-b", "main"]);
        assert!(Repo::find(dir).unwrap().head().is_none(), "unborn");
        let first = commit(dir, "a", "one");
        let sub = dir.join("sub/deeper");
        std::fs::create_dir_all(&sub).unwrap();
        let repo = Repo::find(&sub).unwrap();
        assert_eq!(repo.root, std::fs::canonicalize(dir).unwrap());
        assert_eq!(repo.head().as_deref(), Some(first.as_str()));
        git(dir, &["pack-refs", "--all"]);
        assert!(!dir.join(".git/refs/heads/main").exists());
        assert_eq!(repo.head().as_deref(), Some(first.as_str()), "from packed-refs");
        git(dir, &["checkout", "-q", "--detach"]);
        assert_eq!(repo.head().as_deref(), Some(first.as_str()), "detached");
        let out = tempfile::tempdir().unwrap();
        let linked = out.path().join("linked");
        git(dir, &["worktree", "add", "-q", "-b", "side", linked.to_str().unwrap()]);
        let second = commit(&linked, "b", "two");
        assert_eq!(Repo::find(&linked).unwrap().head().as_deref(), Some(second.as_str()));
    }

    #[test]
    fn revisions_come_from_one_walk_and_then_from_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("repo");
        std::fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "-q", "-b", "main"]);
        commit(&dir, "images/a/Dockerfile", "a1");
        let b1 = commit(&dir, "images/b/Dockerfile", "b1");
        let a2 = commit(&dir, "images/a/src/x", "a2");
        commit(&dir, "README", "docs");
        let store = Store::open(tmp.path().join("store")).unwrap();
        let sets = vec![
            vec![dir.join("images/a")],
            vec![dir.join("images/b"), dir.join("images/a/Dockerfile")],
            vec![dir.join("images/b")],
            vec![dir.clone()],
        ];
        let mut facts = HeadFacts::of(&dir, Some(&store)).unwrap();
        let revs = facts.revisions(&sets);
        let head = facts.commit().to_string();
        assert_eq!(
            revs,
            vec![Some(a2.clone()), Some(b1.clone()), Some(b1.clone()), Some(head.clone())]
        );
        assert!(facts.time().unwrap() > 1_600_000_000);
        // Another build of the same commit: everything is in the store, so no git runs.
        let again = HeadFacts::of(&dir, Some(&store)).unwrap();
        assert_eq!(again.facts.revisions.len(), 4);
        assert!(again.facts.time.is_some());
        let mut again = again;
        assert_eq!(again.revisions(&sets), revs);
    }
}
