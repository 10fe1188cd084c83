//! Tag templates (`{version}-rc.{build}`, `{major}.{minor}`, `latest`, ...) and their rendering
//! per image and environment (DESIGN.md section 10).

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "version",
    "major",
    "minor",
    "patch",
    "prerelease",
    "git_sha",
    "git_short",
    "branch",
    "build",
    "env",
    "date",
    "image",
];

static VALID_TAG: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$").unwrap_or_else(|_| unreachable!())
});

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(&'static str),
}

/// A parsed tag template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTemplate {
    source: String,
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("tag template `{template}` uses unknown placeholder `{{{name}}}`")]
    UnknownPlaceholder { template: String, name: String },
    #[error("tag template `{template}` has an unclosed `{{`")]
    Unclosed { template: String },
    #[error("tag template `{template}` is empty")]
    Empty { template: String },
}

impl TemplateError {
    pub fn help(&self) -> String {
        match self {
            TemplateError::UnknownPlaceholder { name, .. } => {
                match crate::diagnostic::did_you_mean(name, PLACEHOLDERS.iter().copied()) {
                    Some(s) => format!("did you mean `{{{s}}}`?"),
                    None => format!(
                        "placeholders: {}",
                        PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                }
            }
            _ => format!(
                "placeholders: {}",
                PLACEHOLDERS.iter().map(|p| format!("{{{p}}}")).collect::<Vec<_>>().join(" ")
            ),
        }
    }
}

/// The values a template is rendered with.
#[derive(Debug, Clone, Default)]
pub struct TagValues {
    pub version: Option<semver::Version>,
    pub git_sha: Option<String>,
    pub branch: Option<String>,
    pub build: Option<String>,
    pub env: String,
    /// UTC date, YYYYMMDD.
    pub date: String,
    pub image: String,
}

/// What a template gives for one image in one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    Tag(String),
    /// Not applied, and why (e.g. `{major}` for a pre-release).
    Skipped(String),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("tag template `{template}` renders `{rendered}`, which is not a valid tag")]
pub struct InvalidTag {
    pub template: String,
    pub rendered: String,
}

impl TagTemplate {
    pub fn parse(source: &str) -> Result<TagTemplate, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty { template: source.into() });
        }
        let mut pieces = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close =
                after.find('}').ok_or(TemplateError::Unclosed { template: source.into() })?;
            let name = after[..close].trim();
            let var = PLACEHOLDERS.iter().find(|p| **p == name).ok_or_else(|| {
                TemplateError::UnknownPlaceholder { template: source.into(), name: name.into() }
            })?;
            pieces.push(Piece::Var(var));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(TagTemplate { source: source.into(), pieces })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether rendering needs git: the commit or the branch.
    pub fn uses_git(&self) -> bool {
        ["git_sha", "git_short", "branch"].iter().any(|name| self.uses(name))
    }

    fn uses(&self, name: &str) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Var(v) if *v == name))
    }

    /// Floating tags (`latest`, `{major}`, `{major}.{minor}`) follow the newest release only,
    /// so, as docker/metadata-action does, they are not applied to a pre-release version.
    fn is_floating(&self) -> bool {
        self.source == "latest"
            || ((self.uses("major") || self.uses("minor"))
                && !self.uses("patch")
                && !self.uses("version")
                && !self.uses("prerelease"))
    }

    pub fn render(&self, values: &TagValues) -> Result<Rendered, InvalidTag> {
        if let Some(v) = &values.version {
            if !v.pre.is_empty() && self.is_floating() {
                return Ok(Rendered::Skipped(format!(
                    "floating tag not applied to pre-release {v}"
                )));
            }
        }
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(name) => match value_of(name, values) {
                    Some(v) => out.push_str(&v),
                    None => return Ok(Rendered::Skipped(format!("no value for {{{name}}}"))),
                },
            }
        }
        if VALID_TAG.is_match(&out) {
            Ok(Rendered::Tag(out))
        } else {
            Err(InvalidTag { template: self.source.clone(), rendered: out })
        }
    }
}

fn value_of(name: &str, v: &TagValues) -> Option<String> {
    let version = v.version.as_ref();
    match name {
        "version" => version.map(|v| v.to_string().replace('+', "_")),
        "major" => version.map(|v| v.major.to_string()),
        "minor" => version.map(|v| v.minor.to_string()),
        "patch" => version.map(|v| v.patch.to_string()),
        "prerelease" => version.filter(|v| !v.pre.is_empty()).map(|v| v.pre.to_string()),
        "git_sha" => v.git_sha.clone(),
        "git_short" => v.git_sha.as_ref().map(|s| s.chars().take(7).collect()),
        "branch" => v.branch.as_deref().map(sanitise),
        "build" => v.build.clone(),
        "env" => Some(v.env.clone()),
        "date" => Some(v.date.clone()),
        "image" => Some(sanitise(&v.image)),
        _ => None,
    }
}

/// Make a free-form value (a branch name like `feature/Foo Bar`) usable inside a tag, as
/// docker/metadata-action does: every character outside `[A-Za-z0-9_.-]` becomes `-`.
pub fn sanitise(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' })
        .collect()
}

impl fmt::Display for TagTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(version: &str) -> TagValues {
        TagValues {
            version: Some(semver::Version::parse(version).unwrap()),
            git_sha: Some("0123456789abcdef".into()),
            branch: Some("feature/Big Change".into()),
            build: Some("42".into()),
            env: "staging".into(),
            date: "20261123".into(),
            image: "api".into(),
        }
    }

    fn render(t: &str, v: &str) -> Rendered {
        TagTemplate::parse(t).unwrap().render(&values(v)).unwrap()
    }

    #[test]
    fn renders_every_placeholder() {
        assert_eq!(render("{version}", "1.4.2"), Rendered::Tag("1.4.2".into()));
        assert_eq!(render("{major}.{minor}", "1.4.2"), Rendered::Tag("1.4".into()));
        assert_eq!(render("{version}-rc.{build}", "1.4.2"), Rendered::Tag("1.4.2-rc.42".into()));
        assert_eq!(
            render("{version}-dev.{git_short}", "1.4.2"),
            Rendered::Tag("1.4.2-dev.0123456".into())
        );
        assert_eq!(render("{branch}", "1.4.2"), Rendered::Tag("feature-Big-Change".into()));
        assert_eq!(
            render("{env}-{date}-{image}", "1.4.2"),
            Rendered::Tag("staging-20261123-api".into())
        );
        assert_eq!(render("{git_sha}", "1.4.2"), Rendered::Tag("0123456789abcdef".into()));
        assert_eq!(render("{prerelease}", "1.0.0-rc.1"), Rendered::Tag("rc.1".into()));
    }

    #[test]
    fn floating_tags_skip_prereleases() {
        for t in ["latest", "{major}", "{major}.{minor}"] {
            assert!(matches!(render(t, "2.0.0-rc.1"), Rendered::Skipped(_)), "{t}");
            assert!(matches!(render(t, "2.0.0"), Rendered::Tag(_)), "{t}");
        }
        assert_eq!(render("{version}", "2.0.0-rc.1"), Rendered::Tag("2.0.0-rc.1".into()));
    }

    #[test]
    fn build_metadata_is_made_tag_safe() {
        assert_eq!(render("{version}", "1.0.0+build.5"), Rendered::Tag("1.0.0_build.5".into()));
    }

    #[test]
    fn invalid_render_is_an_error() {
        let t = TagTemplate::parse("-{version}").unwrap();
        assert!(t.render(&values("1.0.0")).is_err());
        let long = format!("{}{{version}}", "x".repeat(127));
        assert!(TagTemplate::parse(&long).unwrap().render(&values("1.0.0")).is_err());
    }

    #[test]
    fn unknown_placeholders_are_rejected_with_a_suggestion() {
        let e = TagTemplate::parse("{verison}").unwrap_err();
        assert!(e.to_string().contains("unknown placeholder `{verison}`"));
        assert!(e.help().contains("{version}"));
        assert!(matches!(TagTemplate::parse("{version"), Err(TemplateError::Unclosed { .. })));
    }
}
