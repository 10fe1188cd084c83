//! images.toml version 1, as serde types. These are the source of truth for the file format:
//! the JSON schema in `schema/images.schema.json` and the unknown-key check are both derived
//! from them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// The whole images.toml file.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields, title = "ferry images.toml")]
pub struct ManifestFile {
    pub project: ProjectSection,
    #[serde(default)]
    pub defaults: DefaultsSection,
    /// The images of the fleet, by name.
    #[serde(default)]
    pub images: BTreeMap<String, ImageSection>,
    /// Where and how images are published, by environment name.
    #[serde(default)]
    pub environments: BTreeMap<String, EnvironmentSection>,
    /// Per-registry settings, by host[:port].
    #[serde(default)]
    pub registries: BTreeMap<String, RegistrySection>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ProjectSection {
    /// Project name; the default repository of an image is `<name>/<image>`.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Seconds since 1970, "git" (the time of the HEAD commit) or "none" (mtimes kept, as
    /// docker does); mtimes are clamped to it. Default: "git" in a git checkout, else "none".
    #[serde(default)]
    #[schemars(with = "Option<SourceDateEpoch>")]
    pub source_date_epoch: Option<Spanned<SourceDateEpoch>>,
    /// Layer compression in the store and, by default, on push.
    #[serde(default)]
    pub compression: Compression,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(untagged)]
pub enum SourceDateEpoch {
    /// Seconds since 1970-01-01.
    Seconds(i64),
    /// "git" or "none".
    Keyword(String),
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Gzip,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct DefaultsSection {
    /// Build args for every image.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// Labels for every image.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ImageSection {
    /// The build context, relative to images.toml.
    #[schemars(with = "String")]
    pub context: Spanned<String>,
    /// The Dockerfile, relative to the context; default "Dockerfile".
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub dockerfile: Option<Spanned<String>>,
    /// Semantic version (semver 2.0).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub version: Option<Spanned<String>>,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Multi-stage target; default: the last stage.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub target: Option<Spanned<String>>,
    /// Repository path; default "<project.name>/<image name>".
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub repository: Option<Spanned<String>>,
    /// Extra ordering edges to other images of the manifest.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub depends_on: Vec<Spanned<String>>,
    /// Extra tag templates for this image, added in every environment.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub tags: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EnvironmentSection {
    /// host[:port][/path] that every repository of this environment lives under.
    #[schemars(with = "String")]
    pub registry: Spanned<String>,
    /// Tag templates, rendered per image.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub tags: Vec<Spanned<String>>,
    /// Every image pushed here must have a version.
    #[serde(default)]
    pub require_version: bool,
    /// A tag that exists with another digest is an error, never overwritten.
    #[serde(default)]
    pub immutable: bool,
    /// Only digests already published in this environment may be promoted here.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub promote_from: Option<Spanned<String>>,
    /// No pre-release versions.
    #[serde(default)]
    pub release_only: bool,
    /// Layer compression on push; default: project.compression.
    #[serde(default)]
    pub compression: Option<Compression>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RegistrySection {
    /// Skip TLS verification, and allow plain HTTP (always allowed for loopback hosts); only
    /// on a network you trust. A private CA is better trusted with `ca_file`.
    #[serde(default)]
    pub insecure: bool,
    /// Mirrors tried in order before the registry itself (pulls only).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub mirrors: Vec<Spanned<String>>,
    /// A PEM file of extra CA certificates to trust for this registry, relative to images.toml.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub ca_file: Option<Spanned<String>>,
}

/// The JSON schema of images.toml, as checked in under schema/.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(ManifestFile)).unwrap_or_default()
}
