//! Docker image references: `[HOST[:PORT]/]PATH[:TAG][@DIGEST]`, normalised as docker does
//! (`alpine` is `docker.io/library/alpine:latest`).

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// The registry docker uses when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The host that actually serves the `docker.io` API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// The key docker uses for Docker Hub in `config.json` and credential helpers.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";
pub const DEFAULT_TAG: &str = "latest";

const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;

/// Which part of a reference is wrong, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferencePart {
    Reference,
    Registry,
    Repository,
    Tag,
    Digest,
}

impl fmt::Display for ReferencePart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReferencePart::Reference => "reference",
            ReferencePart::Registry => "registry host",
            ReferencePart::Repository => "repository",
            ReferencePart::Tag => "tag",
            ReferencePart::Digest => "digest",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: the {part} {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub part: ReferencePart,
    pub reason: String,
}

/// A repository in a registry: where the registry API's `/v2/<path>/...` endpoints live.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// `library/alpine`, `acme/api`.
    pub path: String,
}

impl Repository {
    /// The name as docker shows it: `alpine` for `docker.io/library/alpine`.
    pub fn familiar(&self) -> String {
        if self.registry == DEFAULT_REGISTRY {
            // Only an official image (`library/<one component>`) loses the prefix: the short
            // form of `library/a/b` would be read back as `docker.io/a/b`. And a path whose
            // first component looks like a host (`docker.io/example.com/x`) keeps the
            // registry, or it would be read back as that host.
            let short = match self.path.strip_prefix("library/") {
                Some(official) if !official.contains('/') => official,
                _ => &self.path,
            };
            match split_registry(short) {
                (None, _) => short.to_string(),
                (Some(_), _) => format!("{}/{}", self.registry, self.path),
            }
        } else {
            format!("{}/{}", self.registry, self.path)
        }
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)
    }
}

/// A parsed, normalised image reference. A reference with neither tag nor digest gets the
/// tag `latest`; with a digest, a tag is kept only for display (the digest decides).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub repository: Repository,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let err = |part, reason: &str| ReferenceError {
            input: input.to_string(),
            part,
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(err(ReferencePart::Reference, "is empty"));
        }
        if input.trim() != input || input.contains(char::is_whitespace) {
            return Err(err(ReferencePart::Reference, "contains whitespace"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = d.parse::<Digest>().map_err(|e| {
                    err(ReferencePart::Digest, &format!("{d:?} is not valid: {}", e.reason))
                })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag follows the last ':' that comes after the last '/'; a ':' before that is a port.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|r| err(ReferencePart::Tag, &r))?;
        }
        if name.is_empty() {
            return Err(err(ReferencePart::Repository, "is empty"));
        }
        let (registry, path) = split_registry(name);
        let registry = match registry {
            Some(r) => {
                validate_registry(r).map_err(|reason| err(ReferencePart::Registry, &reason))?;
                if r == "index.docker.io" {
                    DEFAULT_REGISTRY.to_string()
                } else {
                    r.to_string()
                }
            }
            None => DEFAULT_REGISTRY.to_string(),
        };
        validate_path(path).map_err(|reason| err(ReferencePart::Repository, &reason))?;
        let path = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if registry.len() + 1 + path.len() > NAME_MAX {
            return Err(err(
                ReferencePart::Repository,
                &format!("name is longer than {NAME_MAX} characters"),
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference { repository: Repository { registry, path }, tag, digest })
    }

    pub fn registry(&self) -> &str {
        &self.repository.registry
    }

    /// What to ask the registry's manifest endpoint for: the digest if there is one.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The name a pulled image is stored under: `host/path:tag`, or `host/path@digest` when
    /// pulled by digest (a tag next to a digest is ignored, as docker does).
    pub fn store_name(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.repository),
            (None, Some(t)) => format!("{}:{t}", self.repository),
            (None, None) => format!("{}:{DEFAULT_TAG}", self.repository),
        }
    }

    /// The reference as docker prints it (`alpine:3.19`, `ghcr.io/x/y@sha256:…`).
    pub fn familiar(&self) -> String {
        let mut s = self.repository.familiar();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(&d.to_string());
        }
        s
    }

    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference { repository: self.repository.clone(), tag: Some(tag.to_string()), digest: None }
    }

    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference { repository: self.repository.clone(), tag: None, digest: Some(digest) }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(s)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Docker's rule: the first component is a registry when it has a '.' or ':', is
/// `localhost`, or has an uppercase letter (repository paths are lowercase).
fn split_registry(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("is empty (nothing after ':')".to_string());
    }
    if tag.len() > TAG_MAX {
        return Err(format!("{tag:?} is longer than {TAG_MAX} characters"));
    }
    let mut chars = tag.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok {
        return Err(format!("{tag:?} must start with a letter, digit or '_'"));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{tag:?} contains {bad:?}; a tag has only letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        // [IPv6]:port
        let (h, after) =
            rest.split_once(']').ok_or_else(|| format!("{registry:?} has an unclosed '['"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{registry:?} is not a valid IPv6 address"));
        }
        match after {
            "" => return Ok(()),
            p => (h, p.strip_prefix(':').ok_or_else(|| format!("{registry:?} is malformed"))?),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (h, p),
            None => (registry, ""),
        }
    };
    if !registry.starts_with('[') {
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!("{registry:?} is not a valid host name"));
            }
        }
    }
    let has_port = registry.contains(':') && !registry.starts_with('[') || registry.contains("]:");
    if has_port && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) || port.len() > 5)
    {
        return Err(format!("{registry:?} has an invalid port {port:?}"));
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), String> {
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("{path:?} must be lowercase"));
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Err(format!("{path:?} has an empty path component"));
        }
        if !path_component_ok(component) {
            return Err(format!(
                "component {component:?} is invalid: use lowercase letters and digits, \
                 separated by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !b.first().is_some_and(|&x| alnum(x)) || !b.last().is_some_and(|&x| alnum(x)) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Whether a registry host is on the loopback interface (plain HTTP is allowed there
/// without configuration, as docker does).
/// `host/path:tag@digest` → `host/path`, as written: for matching a FROM word against the
/// repositories of images.toml before any defaults (docker.io, library/) are applied.
pub fn strip_tag_and_digest(reference: &str) -> &str {
    let without_digest = reference.split_once('@').map_or(reference, |(n, _)| n);
    match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    }
}

pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    if host == "localhost" {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_defaults() {
        let r = p("alpine");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(r.familiar(), "alpine:latest");
        assert_eq!(p("user/app:1.0").to_string(), "docker.io/user/app:1.0");
        assert_eq!(
            p("index.docker.io/library/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(p("docker.io/alpine:3").store_name(), "docker.io/library/alpine:3");
    }

    #[test]
    fn hosts_ports_and_digests() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = p(&format!("localhost:5000/a/b:v1@{d}"));
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository.path, "a/b");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), d);
        assert_eq!(r.store_name(), format!("localhost:5000/a/b@{d}"));
        let r = p(&format!("127.0.0.1:5000/x@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(p("localhost/foo").registry(), "localhost");
        assert_eq!(p("[::1]:5000/foo:2").registry(), "[::1]:5000");
        assert_eq!(p("Example.com/foo").registry(), "Example.com");
        assert_eq!(p("a.b/c__d/e---f.g_h").repository.path, "c__d/e---f.g_h");
    }

    #[test]
    fn errors_name_the_part() {
        let e = |s: &str| Reference::parse(s).unwrap_err();
        assert_eq!(e("Alpine").part, ReferencePart::Repository);
        assert!(e("Alpine").to_string().contains("lowercase"));
        assert_eq!(e("alpine:").part, ReferencePart::Tag);
        assert_eq!(e("alpine:-x").part, ReferencePart::Tag);
        // As docker reads it: "alpine:a" is a registry with a bad port.
        assert_eq!(e("alpine:a/b").part, ReferencePart::Registry);
        assert_eq!(e("alpine@sha256:abc").part, ReferencePart::Digest);
        assert_eq!(e("host:xx/alpine").part, ReferencePart::Registry);
        assert_eq!(e("ho_st.com/alpine").part, ReferencePart::Registry);
        assert_eq!(e("a//b").part, ReferencePart::Repository);
        assert_eq!(e("a/-b").part, ReferencePart::Repository);
        assert_eq!(e("a/b..c").part, ReferencePart::Repository);
        assert_eq!(e("").part, ReferencePart::Reference);
        assert_eq!(e(&"a".repeat(300)).part, ReferencePart::Repository);
        let msg = e("alpine:bad!tag").to_string();
        assert!(msg.contains("tag") && msg.contains("'!'"), "{msg}");
    }

    /// Found by the `reference` fuzz target: a printed name must parse back to itself.
    #[test]
    fn familiar_names_parse_back_to_the_same_repository() {
        for input in [
            "docker.io/library/alpio/library/alpine:3.19",
            "library/a/b",
            "alpine",
            "docker.io/x/library/y",
            "ghcr.io/library/z",
            "docker.io/lcker.io/e/nraa/b",
            "docker.io/localhost/x",
        ] {
            let r = p(input);
            let again = p(&r.familiar());
            assert_eq!(again.repository, r.repository, "{input} → {}", r.familiar());
        }
        assert_eq!(p("library/a/b").familiar(), "library/a/b:latest");
        assert_eq!(p("docker.io/library/alpine").familiar(), "alpine:latest");
        assert_eq!(p("docker.io/example.com/x").familiar(), "docker.io/example.com/x:latest");
    }

    #[test]
    fn loopback() {
        assert!(is_loopback_registry("127.0.0.1:5000"));
        assert!(is_loopback_registry("127.8.0.1"));
        assert!(is_loopback_registry("localhost:1"));
        assert!(is_loopback_registry("[::1]:5000"));
        assert!(!is_loopback_registry("registry.example.com"));
        assert!(!is_loopback_registry("10.0.0.1:5000"));
    }
}
