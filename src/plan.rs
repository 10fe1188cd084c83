//! The plan: per image, in build order, what will be built from what, and the tags it gets in
//! each environment. `ferry plan` prints it; every other command runs on the same value.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::graph::{BaseRef, Graph};
use crate::manifest::{Environment, Image, Manifest};
use crate::release::template::{Rendered, TagTemplate, TagValues};

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub project: String,
    pub levels: Vec<Vec<String>>,
    pub images: Vec<PlannedImage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedImage {
    pub name: String,
    pub level: usize,
    pub parents: Vec<String>,
    pub children: Vec<String>,
    pub external_bases: Vec<ExternalBase>,
    pub context: String,
    pub dockerfile: String,
    /// The target stage by name, or `#N` for an unnamed one.
    pub target: String,
    pub stages: Vec<PlannedStage>,
    pub version: Option<String>,
    pub repository: String,
    /// Per environment: the full references this image is tagged with.
    pub environments: BTreeMap<String, EnvironmentTags>,
}

/// A base image from a registry, with the digest it is pinned to when the store has it
/// (`ferry build` pulls and pins every base before it builds).
#[derive(Debug, Clone, Serialize)]
pub struct ExternalBase {
    pub reference: String,
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedStage {
    pub index: usize,
    pub name: Option<String>,
    pub from: BaseRef,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct EnvironmentTags {
    pub repository: String,
    pub tags: Vec<String>,
    /// Templates not applied, with the reason (a pre-release, a value not available).
    pub skipped: Vec<SkippedTag>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedTag {
    pub template: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("image `{image}`, environment `{env}`: {source}")]
    InvalidTag { image: String, env: String, source: crate::release::template::InvalidTag },
    #[error("image `{image}` has no version, and environment `{env}` requires one (require_version = true)")]
    VersionRequired { image: String, env: String },
    #[error("unknown environment `{env}`{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownEnvironment { env: String, suggestion: Option<String> },
}

/// Facts about the source tree that tag templates use, read once per run.
#[derive(Debug, Clone, Default)]
pub struct SourceInfo {
    pub git_sha: Option<String>,
    pub branch: Option<String>,
    pub build: Option<String>,
    /// UTC date, YYYYMMDD.
    pub date: String,
}

impl SourceInfo {
    /// Ask git about the tree at `dir`; the build number comes from `FERRY_BUILD` or the CI's
    /// run number; the date from SOURCE_DATE_EPOCH when set (reproducible), else today.
    pub fn discover(dir: &Path) -> SourceInfo {
        SourceInfo::discover_with(dir, true)
    }

    /// [`SourceInfo::discover`] for rendering only `templates`: git runs only when one of
    /// them needs its commit or branch (a promotion usually needs neither, and git costs a
    /// process).
    pub fn discover_for<'a>(
        dir: &Path,
        templates: impl IntoIterator<Item = &'a TagTemplate>,
    ) -> SourceInfo {
        SourceInfo::discover_with(dir, templates.into_iter().any(TagTemplate::uses_git))
    }

    fn discover_with(dir: &Path, ask_git: bool) -> SourceInfo {
        let git = |args: &[&str]| -> Option<String> {
            if !ask_git {
                return None;
            }
            crate::git::run(dir, args, &[]).ok().filter(|s| !s.is_empty())
        };
        let env = |names: &[&str]| {
            names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        // One git for both (`--abbrev-ref` applies to the arguments after it): the commit,
        // then the branch ("HEAD" when detached).
        let head = git(&["rev-parse", "HEAD", "--abbrev-ref", "HEAD"]);
        let mut lines = head.as_deref().unwrap_or_default().lines().map(str::to_string);
        let git_sha = lines.next();
        let branch = lines.next().filter(|b| b != "HEAD").or_else(|| {
            env(&["GITHUB_HEAD_REF", "GITHUB_REF_NAME", "CI_COMMIT_REF_NAME", "BRANCH_NAME"])
        });
        let now = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .unwrap_or_else(chrono::Utc::now);
        SourceInfo {
            git_sha,
            branch,
            build: env(&["FERRY_BUILD", "GITHUB_RUN_NUMBER", "CI_PIPELINE_IID", "BUILD_NUMBER"]),
            date: now.format("%Y%m%d").to_string(),
        }
    }
}

/// The references an image gets in one environment.
pub fn render_tags(
    image: &Image,
    env: &Environment,
    info: &SourceInfo,
) -> Result<EnvironmentTags, PlanError> {
    let values = TagValues {
        version: image.version.clone(),
        git_sha: info.git_sha.clone(),
        branch: info.branch.clone(),
        build: info.build.clone(),
        env: env.name.clone(),
        date: info.date.clone(),
        image: image.name.clone(),
    };
    let mut out = EnvironmentTags {
        repository: format!("{}/{}", env.registry, image.repository),
        ..Default::default()
    };
    for template in env.tags.iter().chain(&image.tags) {
        match template.render(&values) {
            Ok(Rendered::Tag(t)) => {
                if !out.tags.contains(&t) {
                    out.tags.push(t);
                }
            }
            Ok(Rendered::Skipped(reason)) => {
                out.skipped.push(SkippedTag { template: template.to_string(), reason })
            }
            Err(source) => {
                return Err(PlanError::InvalidTag {
                    image: image.name.clone(),
                    env: env.name.clone(),
                    source,
                })
            }
        }
    }
    Ok(out)
}

impl Plan {
    /// Plan the `selected` images (all when None) for `env` (every environment when None).
    pub fn new(
        manifest: &Manifest,
        graph: &Graph,
        selected: &std::collections::BTreeSet<String>,
        env: Option<&str>,
        info: &SourceInfo,
        pins: &BTreeMap<String, String>,
    ) -> Result<Plan, PlanError> {
        let envs: Vec<&Environment> = match env {
            Some(e) => {
                vec![manifest.environments.get(e).ok_or_else(|| PlanError::UnknownEnvironment {
                    env: e.to_string(),
                    suggestion: crate::diagnostic::did_you_mean(
                        e,
                        manifest.environments.keys().map(String::as_str),
                    )
                    .map(str::to_string),
                })?]
            }
            None => manifest.environments.values().collect(),
        };
        let mut images = Vec::new();
        for node in graph.build_order() {
            if !selected.contains(&node.name) {
                continue;
            }
            let Some(image) = manifest.images.get(&node.name) else { continue };
            let mut environments = BTreeMap::new();
            for e in &envs {
                if e.require_version && image.version.is_none() && env.is_some() {
                    return Err(PlanError::VersionRequired {
                        image: image.name.clone(),
                        env: e.name.clone(),
                    });
                }
                environments.insert(e.name.clone(), render_tags(image, e, info)?);
            }
            let df = &node.dockerfile;
            let target = df.stages[node.target_stage]
                .name
                .clone()
                .unwrap_or_else(|| format!("#{}", node.target_stage));
            images.push(PlannedImage {
                name: node.name.clone(),
                level: node.level,
                parents: node.parents.iter().cloned().collect(),
                children: graph
                    .children(&node.name)
                    .into_iter()
                    .filter(|c| selected.contains(c))
                    .collect(),
                external_bases: node
                    .external_bases
                    .iter()
                    .map(|r| ExternalBase { reference: r.clone(), digest: pins.get(r).cloned() })
                    .collect(),
                context: image.context_rel.clone(),
                dockerfile: image.dockerfile_rel.clone(),
                target,
                stages: node
                    .stages
                    .iter()
                    .map(|&i| PlannedStage {
                        index: i,
                        name: df.stages[i].name.clone(),
                        from: node.stage_bases.get(&i).cloned().unwrap_or(BaseRef::Scratch),
                    })
                    .collect(),
                version: image.version.as_ref().map(ToString::to_string),
                repository: image.repository.clone(),
                environments,
            });
        }
        let levels = graph
            .levels()
            .into_iter()
            .map(|l| l.into_iter().filter(|n| selected.contains(n)).collect::<Vec<_>>())
            .filter(|l| !l.is_empty())
            .collect();
        Ok(Plan { project: manifest.project.name.clone(), levels, images })
    }

    /// The plan as people read it.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} image{} in {} level{}",
            self.project,
            self.images.len(),
            if self.images.len() == 1 { "" } else { "s" },
            self.levels.len(),
            if self.levels.len() == 1 { "" } else { "s" }
        );
        for img in &self.images {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "[{}] {}{}",
                img.level,
                img.name,
                img.version.as_ref().map(|v| format!(" {v}")).unwrap_or_default()
            );
            let _ = writeln!(
                s,
                "    dockerfile  {}/{} (target {})",
                img.context.trim_end_matches('/'),
                img.dockerfile,
                img.target
            );
            let _ = writeln!(s, "    repository  {}", img.repository);
            if !img.parents.is_empty() {
                let _ = writeln!(s, "    parents     {}", img.parents.join(", "));
            }
            for base in &img.external_bases {
                match &base.digest {
                    Some(d) => {
                        let _ = writeln!(s, "    external    {}@{d}", base.reference);
                    }
                    None => {
                        let _ = writeln!(s, "    external    {} (not pulled yet)", base.reference);
                    }
                }
            }
            for (env, tags) in &img.environments {
                let list = if tags.tags.is_empty() {
                    "(no tags)".to_string()
                } else {
                    tags.tags.join(", ")
                };
                let _ = writeln!(s, "    {:<11} {}:{}", env, tags.repository, list);
                for skip in &tags.skipped {
                    let _ =
                        writeln!(s, "    {:<11}   skipped {}: {}", "", skip.template, skip.reason);
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn source_info_reads_the_commit_and_branch() {
        let dir = tempfile::tempdir().unwrap();
        let none = SourceInfo::discover(dir.path());
        assert_eq!(none.git_sha, None, "not a repository");

        git(dir.path(), &["init", "-q", "-b", "feature/x"]);
        git(dir.path(), &["commit", "-q", "--allow-empty", "-m", "one"]);
        let sha = git(dir.path(), &["rev-parse", "HEAD"]);
        let info = SourceInfo::discover(dir.path());
        assert_eq!(info.git_sha.as_deref(), Some(sha.as_str()));
        assert_eq!(info.branch.as_deref(), Some("feature/x"));

        git(dir.path(), &["checkout", "-q", "--detach"]);
        let detached = SourceInfo::discover(dir.path());
        assert_eq!(detached.git_sha.as_deref(), Some(sha.as_str()));
        assert_ne!(detached.branch.as_deref(), Some("HEAD"), "a detached HEAD is no branch");

        // git is asked only for templates that need it.
        let parse = |t: &str| TagTemplate::parse(t).unwrap();
        let plain = [parse("{version}"), parse("latest"), parse("{env}-{build}")];
        assert_eq!(SourceInfo::discover_for(dir.path(), &plain).git_sha, None);
        for needs_git in ["{git_sha}", "{version}-{git_short}", "{branch}"] {
            let templates = [parse("{version}"), parse(needs_git)];
            let info = SourceInfo::discover_for(dir.path(), &templates);
            assert_eq!(info.git_sha.as_deref(), Some(sha.as_str()), "{needs_git}");
        }
    }
}
