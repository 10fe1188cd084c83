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
//! "Changed since REF" is [`crate::changes`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::changes::{self, ChangeError};
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
/// The changes listed are those of images that existed at REF (a new image has no version
/// to compare with).
pub fn since_violations(
    manifest: &Manifest,
    graph: &Graph,
    git_ref: &str,
) -> Result<(Vec<Violation>, Vec<Change>), ChangeError> {
    let since = changes::since(manifest, graph, git_ref)?;
    let Some(old_images) = since.old_images else {
        return Ok((Vec::new(), Vec::new()));
    };
    let changes: BTreeMap<String, String> =
        since.changed.into_iter().filter(|(name, _)| old_images.contains_key(name)).collect();
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
