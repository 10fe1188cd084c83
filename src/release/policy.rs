//! The semantic-version policy `ferry check` enforces in CI (DESIGN.md section 10).
//!
//! Every rule returns violations rather than stopping at the first, so CI lists them all:
//! - every version is semver (checked on the raw file, so the other problems of a file
//!   that does not load are not needed to report it);
//! - `require_version` environments need a version, `release_only` ones no pre-release;
//! - an image whose digest differs from the one published under its version tag must bump;
//! - with `--since REF`, a changed image must have a greater version than at REF, and no
//!   version may decrease.
//!
//! "Changed since REF" compares git objects, not build outputs: the tree of the image's
//! context (the working tree's, uncommitted changes included) against REF's, the
//! Dockerfile's blob when it lives outside the context, the image's own table and
//! `[defaults]` in images.toml; and an image whose parent changed has changed too. That
//! needs no build of REF (a second worktree and a cold build would make CI slow); its one
//! imprecision is conservative: a change to a file the `.dockerignore` excludes counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::graph::Graph;
use crate::manifest::{Environment, Manifest};

/// Which rule a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    NotSemver,
    VersionRequired,
    PreRelease,
    DigestChangedWithoutBump,
    ChangedWithoutBump,
    VersionDecreased,
    NotBuilt,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub rule: Rule,
    pub image: String,
    pub environment: Option<String>,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("--since {git_ref}: {reason}")]
    Git { git_ref: String, reason: String },
    #[error("--since {git_ref}: images.toml at {git_ref} is not valid TOML: {reason}")]
    OldManifest { git_ref: String, reason: String },
}

/// The versions bumping from `v` gives: (patch, minor, major). A pre-release bumps to its
/// release first, as `npm version` and `cargo release` do (2.1.0-rc.1 → 2.1.0).
pub fn next_versions(v: &semver::Version) -> (semver::Version, semver::Version, semver::Version) {
    let pre = !v.pre.is_empty();
    let make = |major, minor, patch| semver::Version::new(major, minor, patch);
    let patch =
        if pre { make(v.major, v.minor, v.patch) } else { make(v.major, v.minor, v.patch + 1) };
    let minor =
        if pre && v.patch == 0 { make(v.major, v.minor, 0) } else { make(v.major, v.minor + 1, 0) };
    let major = if pre && v.minor == 0 && v.patch == 0 {
        make(v.major, 0, 0)
    } else {
        make(v.major + 1, 0, 0)
    };
    (patch, minor, major)
}

fn bump_hint(v: &semver::Version) -> String {
    let (p, mi, ma) = next_versions(v);
    format!("bump to {p} (patch), {mi} (minor) or {ma} (major)")
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    images: BTreeMap<String, RawImage>,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(default)]
    version: Option<toml::Spanned<toml::Value>>,
}

/// Versions that are not semver, from the raw text of images.toml (`file` names it).
pub fn semver_violations(file: &str, text: &str) -> Vec<Violation> {
    let Ok(raw) = toml::from_str::<RawFile>(text) else { return Vec::new() };
    let mut out = Vec::new();
    for (name, img) in raw.images {
        let Some(v) = img.version else { continue };
        let line = text[..v.span().start.min(text.len())].matches('\n').count() + 1;
        let problem = match v.get_ref() {
            toml::Value::String(s) => semver::Version::parse(s)
                .err()
                .map(|e| format!("`{s}` is not a semantic version: {e}")),
            other => Some(format!("{other} is not a string")),
        };
        if let Some(p) = problem {
            out.push(Violation {
                rule: Rule::NotSemver,
                image: name,
                environment: None,
                message: format!("{file}:{line}: {p}; use MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]"),
            });
        }
    }
    out
}

/// `require_version` and `release_only` for the images of `images` in `envs`.
pub fn environment_violations(
    manifest: &Manifest,
    images: &BTreeSet<String>,
    envs: &[&Environment],
) -> Vec<Violation> {
    let mut out = Vec::new();
    for env in envs {
        for name in images {
            let Some(img) = manifest.images.get(name) else { continue };
            match &img.version {
                None if env.require_version => out.push(Violation {
                    rule: Rule::VersionRequired,
                    image: name.clone(),
                    environment: Some(env.name.clone()),
                    message: format!(
                        "image `{name}` has no version, and environment `{}` requires one (require_version = true)",
                        env.name
                    ),
                }),
                Some(v) if env.release_only && !v.pre.is_empty() => out.push(Violation {
                    rule: Rule::PreRelease,
                    image: name.clone(),
                    environment: Some(env.name.clone()),
                    message: format!(
                        "image `{name}`: {v} is a pre-release, and environment `{}` takes releases only (release_only = true); release it as {}",
                        env.name,
                        next_versions(v).0
                    ),
                }),
                _ => {}
            }
        }
    }
    out
}

/// The violation when `built` differs from what `reference` (the version tag in `env`)
/// already points at.
pub fn digest_violation(
    image: &str,
    version: &semver::Version,
    env: &str,
    reference: &str,
    built: &Digest,
    published: &Digest,
) -> Option<Violation> {
    (built != published).then(|| Violation {
        rule: Rule::DigestChangedWithoutBump,
        image: image.to_string(),
        environment: Some(env.to_string()),
        message: format!(
            "image `{image}` changed but its version {version} did not: the build is {built}, and {reference} in `{env}` is {published}; {}",
            bump_hint(version)
        ),
    })
}

/// Why an image counts as changed since a git ref.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub image: String,
    pub reason: String,
}

/// The `--since REF` rules: a changed image's version must increase; none may decrease.
pub fn since_violations(
    manifest: &Manifest,
    graph: &Graph,
    git_ref: &str,
) -> Result<(Vec<Violation>, Vec<Change>), PolicyError> {
    let root = &manifest.root;
    let git_err = |reason: String| PolicyError::Git { git_ref: git_ref.to_string(), reason };
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
        Some(t) => toml::from_str(t).map_err(|e| PolicyError::OldManifest {
            git_ref: git_ref.to_string(),
            reason: e.message().to_string(),
        })?,
        // No images.toml at REF: every image is new, nothing to compare.
        None => return Ok((Vec::new(), Vec::new())),
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
            continue; // new since REF
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

    let mut violations = Vec::new();
    for (name, img) in &manifest.images {
        let Some(current) = &img.version else { continue };
        let Some(old_version) = old_images
            .get(name)
            .and_then(|t| t.get("version"))
            .and_then(toml::Value::as_str)
            .and_then(|v| semver::Version::parse(v).ok())
        else {
            continue;
        };
        if *current < old_version {
            violations.push(Violation {
                rule: Rule::VersionDecreased,
                image: name.clone(),
                environment: None,
                message: format!("image `{name}`: version {current} is lower than {old_version} at {git_ref}; versions never go back"),
            });
        } else if let Some(why) = changes.get(name) {
            if *current <= old_version {
                violations.push(Violation {
                    rule: Rule::ChangedWithoutBump,
                    image: name.clone(),
                    environment: None,
                    message: format!(
                        "image `{name}` changed since {git_ref} ({why}) but its version is still {current}; {}",
                        bump_hint(current)
                    ),
                });
            }
        }
    }
    let changes = changes.into_iter().map(|(image, reason)| Change { image, reason }).collect();
    Ok((violations, changes))
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
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args(args);
    if let Some(i) = index {
        cmd.env("GIT_INDEX_FILE", i);
    }
    let out = cmd.output().map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
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
            std::fs::copy(&real, index.path())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> semver::Version {
        semver::Version::parse(s).unwrap()
    }

    #[test]
    fn next_versions_follow_npm() {
        let s = |t: (semver::Version, semver::Version, semver::Version)| {
            format!("{} {} {}", t.0, t.1, t.2)
        };
        assert_eq!(s(next_versions(&v("1.4.2"))), "1.4.3 1.5.0 2.0.0");
        assert_eq!(s(next_versions(&v("2.1.0-rc.1"))), "2.1.0 2.1.0 3.0.0");
        assert_eq!(s(next_versions(&v("3.0.0-beta"))), "3.0.0 3.0.0 3.0.0");
        assert_eq!(s(next_versions(&v("1.2.3-rc.1"))), "1.2.3 1.3.0 2.0.0");
    }

    #[test]
    fn semver_violations_name_file_and_line() {
        let text = "[project]\nname = \"x\"\n\n[images.a]\ncontext = \"a\"\nversion = \"1.2\"\n\n[images.b]\ncontext = \"b\"\nversion = \"1.2.3\"\n";
        let v = semver_violations("images.toml", text);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].image, "a");
        assert!(
            v[0].message.starts_with("images.toml:6: `1.2` is not a semantic version"),
            "{}",
            v[0].message
        );
    }

    #[test]
    fn digest_violation_names_both_digests_and_the_next_versions() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert!(digest_violation("api", &v("2.0.0"), "prod", "r/api:2.0.0", &a, &a).is_none());
        let m =
            digest_violation("api", &v("2.0.0"), "prod", "r/api:2.0.0", &a, &b).unwrap().message;
        for part in [a.to_string(), b.to_string(), "2.0.1".into(), "2.1.0".into(), "3.0.0".into()] {
            assert!(m.contains(&part), "{m}");
        }
    }
}
