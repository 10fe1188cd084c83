//! images.toml: loading with spans, validation, and the validated [`Manifest`] the rest of
//! ferry works on. Every problem in the file is collected and reported at once.

mod keys;
pub mod names;
mod types;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use types::{json_schema, Compression, SourceDateEpoch};

use crate::diagnostic::{did_you_mean, Problem, Problems, SourceFile};
use crate::release::template::TagTemplate;
use types::ManifestFile;

/// A validated images.toml.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub file: SourceFile,
    /// The directory holding images.toml; contexts are relative to it.
    pub root: PathBuf,
    pub project: Project,
    pub images: BTreeMap<String, Image>,
    pub environments: BTreeMap<String, Environment>,
    pub registries: BTreeMap<String, RegistrySettings>,
}

#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    pub source_date_epoch: EpochSetting,
    pub compression: Compression,
}

/// Where SOURCE_DATE_EPOCH comes from (the environment variable wins over all of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochSetting {
    /// Not set: the time of the HEAD commit when the project is in a git checkout with a
    /// commit, else no epoch.
    Auto,
    Seconds(i64),
    /// The time of the HEAD commit; an error without one.
    Git,
    /// "none": no epoch; mtimes are kept, as docker does.
    Unset,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    /// The context as written in images.toml, and resolved against the manifest's directory.
    pub context_rel: String,
    pub context: PathBuf,
    pub dockerfile_rel: String,
    pub dockerfile: PathBuf,
    pub version: Option<semver::Version>,
    /// Build args: `[defaults].args` overridden by the image's own.
    pub args: BTreeMap<String, String>,
    /// Labels: `[defaults].labels` overridden by the image's own.
    pub labels: BTreeMap<String, String>,
    pub target: Option<String>,
    pub repository: String,
    pub depends_on: Vec<String>,
    pub tags: Vec<TagTemplate>,
    /// The span of the image's key in images.toml, for errors about the image as a whole.
    pub span: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct Environment {
    pub name: String,
    /// host[:port][/path]
    pub registry: String,
    pub tags: Vec<TagTemplate>,
    pub require_version: bool,
    pub immutable: bool,
    pub promote_from: Option<String>,
    pub release_only: bool,
    pub compression: Compression,
}

#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    pub insecure: bool,
    pub mirrors: Vec<String>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Invalid(Problems),
}

impl ManifestError {
    pub fn into_report(self) -> miette::Report {
        match self {
            ManifestError::Invalid(p) => p.into_report(),
            other => miette::Report::msg(other.to_string()),
        }
    }

    /// The problems, if the file was read but is invalid.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ManifestError::Invalid(p) => &p.problems,
            ManifestError::Read { .. } => &[],
        }
    }
}

impl Manifest {
    /// Read and validate images.toml at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        Manifest::load_with(path, ContextCheck::Required)
    }

    /// Read and validate images.toml for a command that never builds (promotion): build
    /// contexts and Dockerfiles need not exist, as in a CI job that has only images.toml.
    pub fn load_for_release(path: &Path) -> Result<Manifest, ManifestError> {
        Manifest::load_with(path, ContextCheck::Skipped)
    }

    fn load_with(path: &Path, contexts: ContextCheck) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ManifestError::Read { path: path.to_path_buf(), source })?;
        let root = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Absolute, so that contexts stay valid for processes started elsewhere (the RUN
        // sandbox binds context files by path).
        let root = std::fs::canonicalize(&root).unwrap_or(root);
        Manifest::validate_source(
            SourceFile::new(path.display().to_string(), text),
            &root,
            contexts,
        )
    }

    /// Validate images.toml text whose contexts are relative to `root`.
    pub fn from_source(file: SourceFile, root: &Path) -> Result<Manifest, ManifestError> {
        Manifest::validate_source(file, root, ContextCheck::Required)
    }

    /// Parse and validate images.toml text without reading the disk: every rule is checked
    /// except that contexts and Dockerfiles exist. For callers that hold only the text
    /// (tools, the fuzz targets).
    pub fn parse_text(file: SourceFile, root: &Path) -> Result<Manifest, ManifestError> {
        Manifest::validate_source(file, root, ContextCheck::Skipped)
    }

    fn validate_source(
        file: SourceFile,
        root: &Path,
        contexts: ContextCheck,
    ) -> Result<Manifest, ManifestError> {
        let mut problems = Vec::new();
        let text = file.text.clone();
        let doc = match toml::de::DeTable::parse(&text) {
            Ok(doc) => doc,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                problems.push(
                    Problem::new(
                        &file,
                        span,
                        format!("TOML syntax: {}", e.message().trim()),
                        "here",
                    )
                    .with_help("images.toml must be valid TOML 1.0"),
                );
                return Err(ManifestError::Invalid(Problems { file, problems }));
            }
        };
        keys::check_unknown_keys(&file, doc.get_ref(), &mut problems);
        let image_spans = keys::image_key_spans(doc.get_ref());

        let raw: ManifestFile = match toml::from_str(&text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                problems.push(Problem::new(&file, span, e.message().trim().to_string(), "here"));
                return Err(ManifestError::Invalid(Problems { file, problems }));
            }
        };
        let manifest = Validator { file: &file, root, contexts, problems: &mut problems }
            .validate(raw, &image_spans);
        if problems.is_empty() {
            Ok(manifest)
        } else {
            problems.sort_by_key(|p| p.span.start);
            Err(ManifestError::Invalid(Problems { file, problems }))
        }
    }

    /// A problem pointing at an image's key in images.toml.
    pub fn image_problem(&self, image: &str, message: String, label: &str) -> Problem {
        let span = self.images.get(image).map_or(0..0, |i| i.span.clone());
        Problem::new(&self.file, span, message, label)
    }
}

/// Whether build contexts and Dockerfiles must exist on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContextCheck {
    Required,
    Skipped,
}

struct Validator<'a> {
    file: &'a SourceFile,
    root: &'a Path,
    contexts: ContextCheck,
    problems: &'a mut Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, span: Range<usize>, message: String, label: &str, help: Option<String>) {
        let mut p = Problem::new(self.file, span, message, label);
        p.help = help;
        self.problems.push(p);
    }

    fn validate(
        &mut self,
        raw: ManifestFile,
        image_spans: &BTreeMap<String, Range<usize>>,
    ) -> Manifest {
        let project = self.project(&raw);
        let templates = |v: &mut Self, list: &[toml::Spanned<String>]| -> Vec<TagTemplate> {
            list.iter()
                .filter_map(|t| match TagTemplate::parse(t.get_ref()) {
                    Ok(tpl) => Some(tpl),
                    Err(e) => {
                        v.problem(t.span(), e.to_string(), "invalid tag template", Some(e.help()));
                        None
                    }
                })
                .collect()
        };

        let mut images = BTreeMap::new();
        for (name, img) in &raw.images {
            let span = image_spans.get(name).cloned().unwrap_or(0..0);
            let context_rel = img.context.get_ref().clone();
            let context = self.root.join(&context_rel);
            let check = self.contexts == ContextCheck::Required;
            if check && !context.is_dir() {
                self.problem(
                    img.context.span(),
                    format!("image `{name}`: context directory `{context_rel}` does not exist"),
                    "no such directory",
                    Some(format!(
                        "contexts are relative to the directory of images.toml ({})",
                        self.root.display()
                    )),
                );
            }
            let dockerfile_rel =
                img.dockerfile.as_ref().map_or("Dockerfile".to_string(), |d| d.get_ref().clone());
            let dockerfile = context.join(&dockerfile_rel);
            if check && context.is_dir() && !dockerfile.is_file() {
                let span = img.dockerfile.as_ref().map_or(img.context.span(), |d| d.span());
                self.problem(
                    span,
                    format!(
                        "image `{name}`: Dockerfile `{}` does not exist",
                        Path::new(&context_rel).join(&dockerfile_rel).display()
                    ),
                    "no such file",
                    Some(
                        "`dockerfile` is relative to the context; it defaults to \"Dockerfile\""
                            .into(),
                    ),
                );
            }
            let version = img.version.as_ref().and_then(|v| match semver::Version::parse(v.get_ref()) {
                Ok(ver) => Some(ver),
                Err(e) => {
                    self.problem(
                        v.span(),
                        format!("image `{name}`: `{}` is not a semantic version: {e}", v.get_ref()),
                        "not semver",
                        Some("use MAJOR.MINOR.PATCH, optionally with -PRERELEASE and +BUILD, e.g. \"1.4.2\" or \"2.0.0-rc.1\"".into()),
                    );
                    None
                }
            });
            let repository = match &img.repository {
                Some(r) => {
                    if let Err(why) = names::check_repository(r.get_ref()) {
                        self.problem(
                            r.span(),
                            format!("image `{name}`: invalid repository `{}`: {why}", r.get_ref()),
                            "invalid repository",
                            Some(names::REPOSITORY_HELP.into()),
                        );
                    }
                    r.get_ref().clone()
                }
                None => {
                    let repo = format!("{}/{name}", project.name);
                    if let Err(why) = names::check_repository(&repo) {
                        self.problem(
                            span.clone(),
                            format!("image `{name}`: its default repository `{repo}` is invalid: {why}"),
                            "image name used as a repository",
                            Some("set `repository` for this image, or rename it in lowercase letters, digits, '.', '_' and '-'".into()),
                        );
                    }
                    repo
                }
            };
            let mut args = raw.defaults.args.clone();
            args.extend(img.args.clone());
            let mut labels = raw.defaults.labels.clone();
            labels.extend(img.labels.clone());
            let tags = templates(self, &img.tags);
            images.insert(
                name.clone(),
                Image {
                    name: name.clone(),
                    context_rel,
                    context,
                    dockerfile_rel,
                    dockerfile,
                    version,
                    args,
                    labels,
                    target: img.target.as_ref().map(|t| t.get_ref().clone()),
                    repository,
                    depends_on: img.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
                    tags,
                    span,
                },
            );
        }

        // Cross-image checks: depends_on targets and repository uniqueness.
        let names: Vec<&str> = raw.images.keys().map(String::as_str).collect();
        let mut seen_repos: BTreeMap<String, String> = BTreeMap::new();
        for (name, img) in &raw.images {
            for dep in &img.depends_on {
                if !raw.images.contains_key(dep.get_ref()) {
                    let help = did_you_mean(dep.get_ref(), names.iter().copied())
                        .map(|s| format!("did you mean `{s}`?"))
                        .or_else(|| Some(format!("known images: {}", names.join(", "))));
                    self.problem(
                        dep.span(),
                        format!("image `{name}` depends on `{}`, which is not an image of this manifest", dep.get_ref()),
                        "unknown image",
                        help,
                    );
                }
            }
            let Some(image) = images.get(name) else { continue };
            if let Some(first) = seen_repos.get(&image.repository) {
                let span = img.repository.as_ref().map_or(image.span.clone(), |r| r.span());
                self.problem(
                    span,
                    format!(
                        "images `{first}` and `{name}` have the same repository `{}`",
                        image.repository
                    ),
                    "repository used twice",
                    Some(
                        "each image needs a repository of its own; set `repository` on one of them"
                            .into(),
                    ),
                );
            } else {
                seen_repos.insert(image.repository.clone(), name.clone());
            }
        }

        let env_names: Vec<&str> = raw.environments.keys().map(String::as_str).collect();
        let mut environments = BTreeMap::new();
        for (name, env) in &raw.environments {
            if let Err(why) = names::check_registry_prefix(env.registry.get_ref()) {
                self.problem(
                    env.registry.span(),
                    format!("environment `{name}`: invalid registry `{}`: {why}", env.registry.get_ref()),
                    "invalid registry",
                    Some("write host[:port][/path], e.g. \"registry.example.com/acme\" or \"127.0.0.1:5000/acme-dev\"".into()),
                );
            }
            if let Some(from) = &env.promote_from {
                if from.get_ref() == name {
                    self.problem(
                        from.span(),
                        format!("environment `{name}` promotes from itself"),
                        "same environment",
                        None,
                    );
                } else if !raw.environments.contains_key(from.get_ref()) {
                    let help = did_you_mean(from.get_ref(), env_names.iter().copied())
                        .map(|s| format!("did you mean `{s}`?"))
                        .or_else(|| Some(format!("known environments: {}", env_names.join(", "))));
                    self.problem(
                        from.span(),
                        format!("environment `{name}` promotes from `{}`, which is not an environment of this manifest", from.get_ref()),
                        "unknown environment",
                        help,
                    );
                }
            }
            let tags = templates(self, &env.tags);
            environments.insert(
                name.clone(),
                Environment {
                    name: name.clone(),
                    registry: env.registry.get_ref().trim_end_matches('/').to_string(),
                    tags,
                    require_version: env.require_version,
                    immutable: env.immutable,
                    promote_from: env.promote_from.as_ref().map(|p| p.get_ref().clone()),
                    release_only: env.release_only,
                    compression: env.compression.unwrap_or(project.compression),
                },
            );
        }

        let mut registries = BTreeMap::new();
        for (host, reg) in &raw.registries {
            if let Err(why) = names::check_registry_host(host) {
                let span = keys::registry_key_span(self.file, host).unwrap_or(0..0);
                self.problem(
                    span,
                    format!("invalid registry host `{host}`: {why}"),
                    "invalid registry",
                    Some(
                        "registries are keyed by host[:port], e.g. [registries.\"127.0.0.1:5000\"]"
                            .into(),
                    ),
                );
            }
            for m in &reg.mirrors {
                if !(m.get_ref().starts_with("https://") || m.get_ref().starts_with("http://"))
                    || url::Url::parse(m.get_ref()).is_err()
                {
                    self.problem(
                        m.span(),
                        format!(
                            "registry `{host}`: mirror `{}` is not an http(s) URL",
                            m.get_ref()
                        ),
                        "invalid mirror",
                        Some("write the mirror as a URL, e.g. \"https://mirror.internal\"".into()),
                    );
                }
            }
            registries.insert(
                host.clone(),
                RegistrySettings {
                    insecure: reg.insecure,
                    mirrors: reg.mirrors.iter().map(|m| m.get_ref().clone()).collect(),
                    ca_file: reg.ca_file.as_ref().map(|f| self.root.join(f.get_ref())),
                },
            );
        }

        Manifest {
            file: self.file.clone(),
            root: self.root.to_path_buf(),
            project,
            images,
            environments,
            registries,
        }
    }

    fn project(&mut self, raw: &ManifestFile) -> Project {
        let name = raw.project.name.get_ref().clone();
        if let Err(why) = names::check_repository(&name) {
            self.problem(raw.project.name.span(), format!("invalid project name `{name}`: {why}"), "invalid name", Some("the project name is the first part of every default repository: lowercase letters, digits, '.', '_' and '-'".into()));
        }
        let source_date_epoch = match &raw.project.source_date_epoch {
            None => EpochSetting::Auto,
            Some(s) => match s.get_ref() {
                SourceDateEpoch::Seconds(n) if *n >= 0 => EpochSetting::Seconds(*n),
                SourceDateEpoch::Keyword(k) if k == "git" => EpochSetting::Git,
                SourceDateEpoch::Keyword(k) if k == "none" => EpochSetting::Unset,
                _ => {
                    self.problem(
                        s.span(),
                        "source_date_epoch must be \"git\", \"none\" or a non-negative integer"
                            .into(),
                        "invalid value",
                        None,
                    );
                    EpochSetting::Auto
                }
            },
        };
        Project { name, source_date_epoch, compression: raw.project.compression }
    }
}
