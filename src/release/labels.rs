//! The OCI annotations every built image carries in its manifest:
//! `org.opencontainers.image.{version,revision,created,source,title}` and
//! `org.opencontainers.image.base.{name,digest}`. Not in its config labels: docker puts no
//! label of its own there, and ferry builds what docker builds.
//!
//! They are part of the image, so they change its digest; they are chosen so that the
//! digest still depends only on the image's inputs:
//! - `revision` is the last commit that touched the image's context or Dockerfile, not
//!   HEAD: with HEAD every commit anywhere would change every digest, and `ferry check`
//!   would demand a bump of every image on every commit;
//! - `created` is the build's SOURCE_DATE_EPOCH time, as the config's `created` (the
//!   build's start when no epoch applies, as docker's).
//!
//! Precedence: images.toml `labels` win over everything; then the values ferry knows
//! (version, revision, created, base.*); `title` and `source` only fill a gap, so a
//! Dockerfile `LABEL org.opencontainers.image.title=...` is the title. A label merely
//! inherited from the parent image (equal to the parent's) is not this image's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::manifest::Image;
use crate::store::Store;

pub const VERSION: &str = "org.opencontainers.image.version";
pub const REVISION: &str = "org.opencontainers.image.revision";
pub const CREATED: &str = "org.opencontainers.image.created";
pub const SOURCE: &str = "org.opencontainers.image.source";
pub const TITLE: &str = "org.opencontainers.image.title";
pub const BASE_NAME: &str = "org.opencontainers.image.base.name";
pub const BASE_DIGEST: &str = "org.opencontainers.image.base.digest";

/// The keys this module manages, which also become manifest annotations.
pub const KEYS: [&str; 7] = [VERSION, REVISION, CREATED, SOURCE, TITLE, BASE_NAME, BASE_DIGEST];

/// The image a target stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    /// A reference: `<repository>:<version>` for an image of the manifest, the FROM as
    /// written for an external one.
    pub name: String,
    pub digest: Digest,
    pub labels: BTreeMap<String, String>,
}

/// Facts about the source that labels use.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub revision: Option<String>,
    pub source: Option<String>,
}

impl Provenance {
    /// The provenance of each image of `images`, by name, from what git says of HEAD: the
    /// last commit touching the image's context or Dockerfile, and the `origin` remote's
    /// URL (without credentials). Git runs once for the whole fleet, and not at all for a
    /// commit `store` has seen (see [`crate::git`]). Outside a git repository, nothing.
    pub fn for_images<'a>(
        root: &Path,
        store: &Store,
        images: impl IntoIterator<Item = &'a Image>,
    ) -> BTreeMap<String, Provenance> {
        let images: Vec<&Image> = images.into_iter().collect();
        let Some(mut head) = crate::git::HeadFacts::of(root, Some(store)) else {
            return images.iter().map(|i| (i.name.clone(), Provenance::default())).collect();
        };
        let inputs: Vec<Vec<PathBuf>> = images
            .iter()
            .map(|image| {
                let mut paths = vec![image.context.clone()];
                // A Dockerfile outside its context is an input of its own.
                if let (Ok(df), Ok(ctx)) = (
                    std::fs::canonicalize(&image.dockerfile),
                    std::fs::canonicalize(&image.context),
                ) {
                    if !df.starts_with(&ctx) {
                        paths.push(df);
                    }
                }
                paths
            })
            .collect();
        let revisions = head.revisions(&inputs);
        let source = head.origin().map(|u| strip_credentials(&u));
        images
            .iter()
            .zip(revisions)
            .map(|(image, revision)| {
                (image.name.clone(), Provenance { revision, source: source.clone() })
            })
            .collect()
    }
}

/// `https://user:token@host/x` → `https://host/x`: labels are public.
fn strip_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((cred, host)) if !cred.contains('/') => format!("{scheme}://{host}"),
            _ => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// The manifest annotations of an image, after the images.toml labels are applied to
/// `labels` (the config's, after the Dockerfile's). The config gets only the labels someone
/// asked for (the Dockerfile's `LABEL`, images.toml's `labels`, as `docker build --label`):
/// docker adds none of its own, and an image that differs from docker's by its labels is
/// another image.
pub fn apply(
    labels: &mut BTreeMap<String, String>,
    image: &Image,
    created: &str,
    base: Option<&BaseImage>,
    provenance: &Provenance,
) -> BTreeMap<String, String> {
    for (k, v) in &image.labels {
        labels.insert(k.clone(), v.clone());
    }
    // A value merely inherited from the parent (equal to the parent's) is not this image's.
    let own = |key: &str| -> Option<String> {
        let value = labels.get(key)?;
        let inherited = base.is_some_and(|b| b.labels.get(key) == Some(value));
        (!inherited || image.labels.contains_key(key)).then(|| value.clone())
    };
    let mut annotations = BTreeMap::new();
    let mut set = |key: &str, value: Option<String>| {
        if let Some(v) = value {
            annotations.insert(key.to_string(), v);
        }
    };
    let asked = |key: &str| image.labels.get(key).cloned();
    set(VERSION, asked(VERSION).or_else(|| image.version.as_ref().map(ToString::to_string)));
    set(REVISION, asked(REVISION).or_else(|| provenance.revision.clone()));
    set(CREATED, asked(CREATED).or_else(|| Some(created.to_string())));
    set(BASE_NAME, asked(BASE_NAME).or_else(|| base.map(|b| b.name.clone())));
    set(BASE_DIGEST, asked(BASE_DIGEST).or_else(|| base.map(|b| b.digest.to_string())));
    set(TITLE, own(TITLE).or_else(|| Some(image.name.clone())));
    set(SOURCE, own(SOURCE).or_else(|| provenance.source.clone()));
    annotations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, version: Option<&str>) -> Image {
        Image {
            name: name.into(),
            context_rel: "c".into(),
            context: "c".into(),
            dockerfile_rel: "Dockerfile".into(),
            dockerfile: "c/Dockerfile".into(),
            version: version.map(|v| semver::Version::parse(v).unwrap()),
            args: BTreeMap::new(),
            labels: BTreeMap::new(),
            target: None,
            repository: format!("acme/{name}"),
            depends_on: Vec::new(),
            tags: Vec::new(),
            span: 0..0,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn annotations_name_this_image_and_the_config_keeps_only_asked_labels() {
        let base = BaseImage {
            name: "acme/base:1.0.0".into(),
            digest: Digest::of(b"base"),
            labels: map(&[(TITLE, "base"), ("vendor", "Acme")]),
        };
        // Inherited from the parent, as a child's config starts.
        let mut labels = base.labels.clone();
        let prov = Provenance { revision: None, source: Some("https://git.example/acme".into()) };
        let ann =
            apply(&mut labels, &image("app", None), "2026-01-01T00:00:00Z", Some(&base), &prov);
        assert_eq!(labels, base.labels, "no label of ferry's own in the config");
        assert_eq!(ann.get(VERSION), None);
        assert_eq!(ann.get(REVISION), None);
        assert_eq!(ann[TITLE], "app", "the parent's title is not the child's");
        assert_eq!(ann[BASE_NAME], "acme/base:1.0.0");
        assert_eq!(ann[BASE_DIGEST], Digest::of(b"base").to_string());
        assert_eq!(ann[SOURCE], "https://git.example/acme");
        assert_eq!(ann[CREATED], "2026-01-01T00:00:00Z");
        assert!(!ann.contains_key("vendor"));
        assert_eq!(ann.len(), 5);

        // A title the Dockerfile set is the title; images.toml wins over everything and
        // its labels are in the config.
        let mut labels = map(&[(TITLE, "acme api")]);
        let mut img = image("api", Some("2.0.0"));
        img.labels = map(&[(SOURCE, "https://example.com/acme")]);
        let prov = Provenance { revision: Some("abc".into()), source: Some("x".into()) };
        let ann = apply(&mut labels, &img, "t", None, &prov);
        assert_eq!(labels, map(&[(TITLE, "acme api"), (SOURCE, "https://example.com/acme")]));
        assert_eq!(ann[TITLE], "acme api");
        assert_eq!(ann[VERSION], "2.0.0");
        assert_eq!(ann[REVISION], "abc");
        assert_eq!(ann[SOURCE], "https://example.com/acme");
        assert!(!ann.contains_key(BASE_NAME));
    }

    #[test]
    fn credentials_never_reach_a_label() {
        assert_eq!(
            strip_credentials("https://u:tok@git.example/a.git"),
            "https://git.example/a.git"
        );
        assert_eq!(strip_credentials("git@github.com:a/b.git"), "git@github.com:a/b.git");
    }
}
