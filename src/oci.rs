//! OCI image-spec and docker schema2 types: descriptors, manifests, indexes, image configs.
//!
//! One set of types serves both formats: docker schema2 and OCI differ only in media types
//! (and docker configs carry a few extra fields, which the types keep). Maps are `BTreeMap`
//! so that a config ferry writes serialises the same way on every machine (DESIGN.md
//! section 7). Bytes read from a registry or the store are never re-serialised to compute a
//! digest: a manifest's identity is the exact bytes it came in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Media types of OCI and docker schema2 objects.
pub mod media_type {
    pub const OCI_LAYOUT_VERSION: &str = "1.0.0";

    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const OCI_LAYER_NONDIST: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    pub const OCI_LAYER_NONDIST_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    pub const OCI_LAYER_NONDIST_ZSTD: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
    pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
    /// Schema 1 is deprecated and unsupported; named only to reject it with a clear error.
    pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    pub const DOCKER_MANIFEST_V1_SIGNED: &str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";

    /// The `Accept` header for a manifest GET: every manifest and index type ferry reads.
    pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
        application/vnd.oci.image.manifest.v1+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.docker.distribution.manifest.v2+json";

    pub fn is_index(mt: &str) -> bool {
        mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST
    }

    pub fn is_manifest(mt: &str) -> bool {
        mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
    }
}

/// The annotation that names a manifest in an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd reads for the full image name in an archive's index.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type says, or None for a type that is not a layer.
    pub fn of_layer_media_type(mt: &str) -> Option<Compression> {
        use media_type::*;
        match mt {
            OCI_LAYER | OCI_LAYER_NONDIST => Some(Compression::None),
            OCI_LAYER_GZIP
            | OCI_LAYER_NONDIST_GZIP
            | DOCKER_LAYER_GZIP
            | DOCKER_LAYER_FOREIGN_GZIP => Some(Compression::Gzip),
            OCI_LAYER_ZSTD | OCI_LAYER_NONDIST_ZSTD => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The compression of a byte stream, judged from its first bytes.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_layer_media_type(self) -> &'static str {
        match self {
            Compression::None => media_type::OCI_LAYER,
            Compression::Gzip => media_type::OCI_LAYER_GZIP,
            Compression::Zstd => media_type::OCI_LAYER_ZSTD,
        }
    }

    /// A reader of the uncompressed bytes of `inner`.
    pub fn decoder<'a, R: std::io::Read + 'a>(
        self,
        inner: R,
    ) -> std::io::Result<Box<dyn std::io::Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(inner),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(inner)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(inner)?),
        })
    }
}

/// A content descriptor: what a manifest, index or `index.json` says about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            platform: None,
            artifact_type: None,
        }
    }

    /// A descriptor of `bytes` with the given media type.
    pub fn of_bytes(media_type: impl Into<String>, bytes: &[u8]) -> Descriptor {
        Descriptor::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }
}

/// An image platform, as in an index entry or an image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(rename = "os.version", default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the machine ferry runs on, in GOARCH terms (linux/amd64, linux/arm64/v8).
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            os_version: None,
            os_features: Vec::new(),
            variant: variant.map(str::to_string),
        }
    }

    /// Parse `os/arch[/variant]` as docker's `--platform`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?;
        let arch = parts.next().filter(|p| !p.is_empty())?;
        let variant = parts.next().filter(|p| !p.is_empty());
        if parts.next().is_some() {
            return None;
        }
        Some(Platform {
            architecture: arch.to_string(),
            os: os.to_string(),
            os_version: None,
            os_features: Vec::new(),
            variant: variant.map(str::to_string),
        })
    }

    /// Whether an index entry for `other` serves this (wanted) platform. A variant is only
    /// compared when both name one, except that arm64's default variant is v8.
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        let norm = |v: &Option<String>| -> Option<String> {
            match (self.architecture.as_str(), v.as_deref()) {
                ("arm64", None) => Some("v8".to_string()),
                (_, v) => v.map(str::to_string),
            }
        };
        match (norm(&self.variant), norm(&other.variant)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (OCI, or docker schema2 which has the same shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index (OCI) or manifest list (docker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageIndex {
    pub fn new_oci() -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media_type::OCI_INDEX.to_string()),
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: BTreeMap::new(),
        }
    }
}

/// Only the fields needed to tell a manifest from an index before parsing it fully.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestProbe {
    #[serde(default)]
    pub schema_version: Option<u32>,
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<serde_json::Value>,
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

impl ManifestProbe {
    /// The media type of a manifest document: its own field, else what its shape says.
    pub fn effective_media_type(&self) -> Option<&str> {
        if let Some(mt) = &self.media_type {
            return Some(mt);
        }
        if self.manifests.is_some() {
            Some(media_type::OCI_INDEX)
        } else if self.config.is_some() {
            Some(media_type::OCI_MANIFEST)
        } else {
            None
        }
    }
}

/// A manifest document, parsed by what it is. Short-lived, so the size difference of the
/// variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedManifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

/// Parse a manifest or index. Its media type is the document's own `mediaType`, else the
/// one it was served with (`declared`), else what its shape says. Returns the media type
/// too; the error is a reason to put after the manifest's name.
pub fn parse_manifest(
    bytes: &[u8],
    declared: Option<&str>,
) -> Result<(String, ParsedManifest), String> {
    let probe: ManifestProbe =
        serde_json::from_slice(bytes).map_err(|e| format!("it is not a JSON manifest: {e}"))?;
    let declared = declared
        .map(|d| d.split(';').next().unwrap_or(d).trim())
        .filter(|d| !d.is_empty() && *d != "application/json" && *d != "text/plain");
    let mt = probe
        .media_type
        .clone()
        .or_else(|| declared.map(str::to_string))
        .or_else(|| probe.effective_media_type().map(str::to_string))
        .ok_or_else(|| "it has no media type and is neither a manifest nor an index".to_string())?;
    if mt == media_type::DOCKER_MANIFEST_V1
        || mt == media_type::DOCKER_MANIFEST_V1_SIGNED
        || probe.schema_version == Some(1)
    {
        return Err("it is a docker schema 1 manifest, deprecated and not supported; \
                    push the image again with a current client"
            .to_string());
    }
    if probe.schema_version != Some(2) {
        return Err(format!("schemaVersion is {:?}, expected 2", probe.schema_version));
    }
    if media_type::is_index(&mt) {
        let index: ImageIndex =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid image index: {e}"))?;
        Ok((mt, ParsedManifest::Index(index)))
    } else if media_type::is_manifest(&mt) {
        let m: ImageManifest =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid image manifest: {e}"))?;
        Ok((mt, ParsedManifest::Image(m)))
    } else {
        Err(format!("media type {mt:?} is neither an image manifest nor an index"))
    }
}

/// Whether a config media type is an image config (rather than an artifact's).
pub fn is_image_config(mt: &str) -> bool {
    mt == media_type::OCI_CONFIG || mt == media_type::DOCKER_CONFIG
}

/// An image configuration (`application/vnd.oci.image.config.v1+json`, docker's
/// `container.image.v1+json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(rename = "os.version", default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerConfig>,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

/// The runtime defaults of an image (`config` in an image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "null_map")]
    pub exposed_ports: BTreeMap<String, EmptyObject>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_vec")]
    pub env: Vec<String>,
    /// `None` (not set) differs from `Some([])` (reset by `ENTRYPOINT []`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "null_map")]
    pub volumes: BTreeMap<String, EmptyObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "null_map")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub args_escaped: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_vec")]
    pub shell: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_vec")]
    pub on_build: Vec<String>,
}

/// A docker HEALTHCHECK. Durations are nanoseconds, as docker writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args…]` or `["CMD-SHELL", command]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_vec")]
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Docker writes `null` for empty lists and maps; treat it as empty.
fn null_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn null_map<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    Ok(Option::<BTreeMap<String, V>>::deserialize(d)?.unwrap_or_default())
}

/// The `{}` value of `ExposedPorts` and `Volumes` entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyObject {}

/// The layer chain of an image config: uncompressed digests, bottom first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "null_vec")]
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> RootFs {
        RootFs { kind: "layers".to_string(), diff_ids: Vec::new() }
    }
}

/// One build step in an image's history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// The chain ID of a layer stack (OCI image spec): identity of "these layers, in this order".
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_with_nulls_parses() {
        let json = r#"{"architecture":"amd64","os":"linux","config":{"Env":null,"Cmd":["sh"],
            "Entrypoint":null,"Labels":null,"ExposedPorts":{"80/tcp":{}},"OnBuild":null},
            "rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
            "history":[{"created":"2024-01-01T00:00:00Z","created_by":"/bin/sh -c #(nop) CMD [\"sh\"]","empty_layer":true}],
            "container_config":{"Hostname":"x"}}"#;
        let c: ImageConfig = serde_json::from_str(json).unwrap();
        let cc = c.config.as_ref().unwrap();
        assert!(cc.env.is_empty());
        assert_eq!(cc.cmd.as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(cc.entrypoint, None);
        assert!(cc.exposed_ports.contains_key("80/tcp"));
        assert_eq!(c.rootfs.diff_ids.len(), 1);
        assert!(c.history[0].empty_layer);
        let out = serde_json::to_string(&c).unwrap();
        assert!(out.contains(r#""ExposedPorts":{"80/tcp":{}}"#), "{out}");
        assert!(!out.contains("Entrypoint"));
    }

    #[test]
    fn empty_entrypoint_is_kept_distinct_from_unset() {
        let cc = ContainerConfig { entrypoint: Some(vec![]), ..Default::default() };
        let out = serde_json::to_string(&cc).unwrap();
        assert_eq!(out, r#"{"Entrypoint":[]}"#);
    }

    #[test]
    fn platform_matching() {
        let want = Platform::parse("linux/arm64").unwrap();
        let mut have = Platform::parse("linux/arm64/v8").unwrap();
        assert!(want.matches(&have));
        have.variant = Some("v9".into());
        assert!(!Platform::parse("linux/arm64/v8").unwrap().matches(&have));
        assert!(!want.matches(&Platform::parse("linux/amd64").unwrap()));
        assert!(Platform::parse("linux").is_none());
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn compression_sniffing() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(Compression::sniff(b"usr/"), Compression::None);
    }
}
