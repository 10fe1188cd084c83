//! OCI distribution client (DESIGN.md section 9): auth (anonymous, Basic, bearer tokens with
//! scopes; docker `config.json`), mirrors, insecure registries, retries; and `pull` into the
//! store. Everything that talks to a registry goes through the [`Registry`] trait, so
//! push/promote reuse the client and tests can put a fake behind it.

mod auth;
mod client;
mod config;
mod credentials;
mod from_manifest;
pub(crate) mod pull;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use crate::digest::Digest;
use crate::oci::{Descriptor, ImageIndex};
use crate::reference::Repository;
use crate::store::StoreError;

pub use auth::{parse_challenges, pull_scope, push_scope, Challenge};
pub(crate) use client::{describe, retry_after};
pub use client::{RegistryClient, UploadPolicy, MAX_REQUESTS_IN_FLIGHT};
pub use config::{
    RegistryConfig, RegistryHostConfig, RetryPolicy, DEFAULT_TIMEOUT, MIN_UPLOAD_RATE,
};
pub use credentials::{auth_key, Credential, DockerConfigFile, Secret, StoredIn};
pub use pull::{pull, PullOptions, PullReport};

/// Registry failures, worded for the user. No variant ever holds a credential or token.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach registry {registry}: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("registry {registry} requires authentication; run `ferry login {registry}`")]
    AuthRequired { registry: String },
    #[error("registry {registry} refused the credentials{}; run `ferry login {registry}` to store valid ones", user.as_ref().map(|u| format!(" of user {u:?}")).unwrap_or_default())]
    Unauthorized { registry: String, user: Option<String> },
    #[error("registry {registry} denied access to {what}{}; check your permissions or run `ferry login {registry}`", detail_suffix(detail))]
    Denied { registry: String, what: String, detail: String },
    #[error("{what} not found in {registry}{}", detail_suffix(detail))]
    NotFound { registry: String, what: String, detail: String },
    #[error("registry {registry} answered {status} to {what}{}", detail_suffix(detail))]
    Status {
        registry: String,
        what: String,
        status: u16,
        detail: String,
        /// The Retry-After the registry asked for (429, 503), within ferry's cap, in whole
        /// seconds (as the header gives it; keeps the error small).
        retry_after: Option<u32>,
    },
    #[error("registry {registry} did not answer {what} within {} ({tries} {}); if it is only slow, raise FERRY_REGISTRY_TIMEOUT (seconds)", seconds(after), if *tries == 1 { "try" } else { "tries" })]
    Timeout { registry: String, what: String, after: Duration, tries: u32 },
    #[error("registry {registry} broke off {what}: {reason}")]
    Interrupted { registry: String, what: String, reason: String },
    #[error("registry {registry} is rate-limiting {what} and asks to retry in {}, longer than ferry waits ({}, FERRY_REGISTRY_MAX_RETRY_AFTER); try again later", seconds(retry_after), seconds(cap))]
    RateLimited { registry: String, what: String, retry_after: Duration, cap: Duration },
    #[error("the TLS certificate of registry {registry} is not trusted: {problem}. To trust its CA, add `ca_file = \"ca.pem\"` (a PEM file, relative to images.toml) under `[registries.\"{registry}\"]` in images.toml, or copy it to `$FERRY_CERTS_DIR/{registry}/ca.crt` (default ~/.config/ferry/certs.d); to skip verification instead, on a network you trust, set `insecure = true` there")]
    Tls { registry: String, problem: String },
    #[error("{what} from {registry} does not match its digest: expected {expected}, got {actual}; it was not stored")]
    DigestMismatch { registry: String, what: String, expected: Digest, actual: Digest },
    #[error("{what} from {registry} is not valid: {reason}")]
    Invalid { registry: String, what: String, reason: String },
    #[error("credentials for {registry}: {reason}")]
    Credentials { registry: String, reason: String },
    #[error("registry settings for {registry}: {reason}")]
    Config { registry: String, reason: String },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegistryError {
    /// Whether trying again may help: the network or the registry failed, not the request.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::Interrupted { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// `1s`, `1.5s`, `60s`: durations as a user sets them.
pub(crate) fn seconds(d: &Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{}s", (s * 1000.0).round() / 1000.0)
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// A manifest or index as the registry served it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The exact bytes: the digest is computed over these, never over a re-serialisation.
    pub bytes: Vec<u8>,
    /// The media type it was served with (or its own `mediaType`).
    pub media_type: String,
    pub digest: Digest,
}

impl FetchedManifest {
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.media_type.clone(), self.digest.clone(), self.bytes.len() as u64)
    }
}

/// A blob being downloaded.
pub struct BlobStream {
    pub reader: Box<dyn Read + Send>,
    /// The size the registry announced, if it did.
    pub size: Option<u64>,
}

/// What a cross-repository mount did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    /// 201: the registry linked the blob; nothing was sent.
    Mounted,
    /// 202: the registry did not mount it; the blob was uploaded instead.
    Uploaded,
}

/// Where every HTTP client of ferry starts (registries, `ADD <url>`): ring as the TLS
/// crypto (reqwest is built without one, see Cargo.toml, so it must be installed before
/// any client is built), ferry's user agent, TCP keepalive.
pub fn http_client_builder() -> reqwest::blocking::ClientBuilder {
    // Err only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
        .tcp_keepalive(std::time::Duration::from_secs(30))
}

/// The OCI distribution operations ferry needs.
pub trait Registry: Send + Sync {
    /// GET a manifest or index by tag or digest (mirrors first). When `reference` is a
    /// digest, the bytes are verified against it.
    fn get_manifest(&self, repo: &Repository, reference: &str) -> Result<FetchedManifest>;
    /// HEAD a manifest: its descriptor, or None if the registry does not have it.
    fn head_manifest(&self, repo: &Repository, reference: &str) -> Result<Option<Descriptor>>;
    /// PUT a manifest with its exact bytes and media type; the digest the registry stored.
    fn put_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest>;
    /// HEAD a blob: its size, or None if absent.
    fn blob_exists(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>>;
    /// GET a blob as a stream (mirrors first). The caller verifies the digest.
    fn get_blob(&self, repo: &Repository, digest: &Digest) -> Result<BlobStream>;
    /// Upload a blob from a file: monolithic PUT when small, chunked PATCH when large.
    fn put_blob(&self, repo: &Repository, digest: &Digest, size: u64, path: &Path) -> Result<()>;
    /// Mount a blob from another repository of the same registry; upload it from `path`
    /// if the registry does not mount it.
    fn mount_blob(
        &self,
        repo: &Repository,
        from: &Repository,
        digest: &Digest,
        size: u64,
        path: &Path,
    ) -> Result<MountOutcome>;
    /// Ask the registry to mount a blob from another repository of the same registry,
    /// uploading nothing: true when it did (201); false when it would not (202, whose upload
    /// session is cancelled). A registry without mounts answers false.
    fn try_mount_blob(
        &self,
        repo: &Repository,
        from: &Repository,
        digest: &Digest,
    ) -> Result<bool> {
        let _ = (repo, from, digest);
        Ok(false)
    }
    /// Upload a blob of `size` bytes from a stream (e.g. another registry's GET), without
    /// putting it on disk. Not retried: the stream cannot be rewound; the caller re-opens it.
    /// The default spools it to a temporary file and uses `put_blob`.
    fn put_blob_stream(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        mut reader: Box<dyn Read + Send>,
    ) -> Result<()> {
        let io = |e: std::io::Error| RegistryError::Io { path: std::env::temp_dir(), source: e };
        let mut tmp = tempfile::NamedTempFile::new().map_err(io)?;
        std::io::copy(&mut reader, tmp.as_file_mut()).map_err(io)?;
        self.put_blob(repo, digest, size, tmp.path())
    }
    /// Whether to try again an operation that failed with `error` on try `attempt` (from
    /// 1), and after how long; None: give up. Callers that restart a whole operation (an
    /// upload, a download, a streamed copy) ask here, so every retry follows one policy.
    fn retry_delay(&self, error: &RegistryError, attempt: u32) -> Option<Duration> {
        (error.is_transient() && attempt < 3).then(|| Duration::from_millis(200 * attempt as u64))
    }
    /// Every tag of a repository.
    fn list_tags(&self, repo: &Repository) -> Result<Vec<String>>;
    /// The first page of a repository's tags, at most `limit` (a registry may send fewer),
    /// and whether more follow. Enough to learn that a repository has no tags, or which of
    /// a few tags exist, in one request.
    fn tags_page(&self, repo: &Repository, limit: usize) -> Result<(Vec<String>, bool)> {
        let _ = limit;
        self.list_tags(repo).map(|tags| (tags, false))
    }
    /// Manifests that refer to `digest` (signatures, SBOMs): the referrers API, else the
    /// `sha256-<hex>` tag schema; an empty index when there are none.
    fn referrers(
        &self,
        repo: &Repository,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ImageIndex>;
    /// What the referrers API alone says; None when the registry has no such API (404),
    /// for a caller that reads the tag schema itself (it may know the tags already).
    fn referrers_api(&self, repo: &Repository, digest: &Digest) -> Result<Option<ImageIndex>> {
        self.referrers(repo, digest, None).map(Some)
    }
}
