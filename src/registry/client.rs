//! The HTTP registry client: one per process, shared by threads.
//!
//! Per host it learns the scheme (HTTPS; plain HTTP only for insecure or loopback hosts,
//! found the way docker does: HTTPS first, HTTP if the TLS connection fails), the auth
//! scheme (from the first 401 challenge) and caches bearer tokens per scope set. Requests
//! are retried with exponential backoff on connect errors, timeouts, 5xx and 429 (honouring
//! Retry-After up to a cap), never on other 4xx and never on an untrusted certificate.
//!
//! A registry that goes quiet is given up on after the configured timeout: for the answer
//! to a request, and for each next piece of a response body; an upload also gets the time
//! to send its body at a minimal rate. Errors name the registry and what was being done
//! ("GET manifest acme/api:1.0"), never a URL (which may carry signed query strings).

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::blocking::{Body, Client, Response};
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
};
use reqwest::{Method, StatusCode};
use url::Url;

use super::auth::{parse_challenges, pull_scope, push_scope, TokenResponse};
use super::config::{RegistryConfig, RetryPolicy, MIN_UPLOAD_RATE};
use super::credentials::{Credential, DockerConfigFile, Secret};
use super::{seconds, BlobStream, FetchedManifest, MountOutcome, Registry, RegistryError, Result};
use crate::digest::Digest;
use crate::oci::{self, media_type, Descriptor, ImageIndex};
use crate::permits::Permits;
use crate::reference::{Repository, DEFAULT_REGISTRY, DOCKER_HUB_API_HOST};

/// How many requests one client has in flight at once, however many threads ask: enough
/// to keep a registry busy with small requests (a promotion's mounts and manifest PUTs),
/// few enough not to swamp it.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 32;

/// Manifests are small; refuse to buffer anything larger.
const MANIFEST_MAX: u64 = 16 * 1024 * 1024;

/// How blobs are uploaded: one PUT up to `monolithic_max` bytes, else PATCH chunks.
#[derive(Debug, Clone)]
pub struct UploadPolicy {
    pub monolithic_max: u64,
    pub chunk_size: u64,
}

impl Default for UploadPolicy {
    fn default() -> UploadPolicy {
        UploadPolicy { monolithic_max: 32 * 1024 * 1024, chunk_size: 16 * 1024 * 1024 }
    }
}

/// How a host's API check failed, kept to fail later requests to it the same way.
#[derive(Debug, Clone)]
enum ProbeFailure {
    Unreachable { reason: String },
    Timeout { tries: u32 },
}

impl ProbeFailure {
    fn error(&self, registry: &str, timeout: Duration) -> RegistryError {
        match self {
            ProbeFailure::Unreachable { reason } => RegistryError::Unreachable {
                registry: registry.to_string(),
                reason: reason.clone(),
            },
            ProbeFailure::Timeout { tries } => RegistryError::Timeout {
                registry: registry.to_string(),
                what: "GET /v2/ (the API check)".to_string(),
                after: timeout,
                tries: *tries,
            },
        }
    }
}

#[derive(Debug, Clone)]
enum HostAuth {
    Basic,
    Bearer { realm: String, service: Option<String> },
}

/// Where a request goes: the registry itself or one of its mirrors.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The registry as references name it (settings, credentials and messages use it).
    name: String,
    /// `host[:port]` that serves the API.
    api_host: String,
    /// A fixed URL base (a mirror given with its scheme).
    base: Option<Url>,
    is_mirror: bool,
}

pub struct RegistryClient {
    config: RegistryConfig,
    docker_config: Option<DockerConfigFile>,
    explicit: Mutex<HashMap<String, Credential>>,
    clients: Mutex<HashMap<(String, bool), Client>>,
    bases: Mutex<HashMap<String, Url>>,
    /// Hosts whose API check failed after its retries: later requests fail at once the same
    /// way, instead of each waiting out the backoff again (a fleet of images behind one
    /// stopped registry took minutes to fail).
    unreachable: Mutex<HashMap<String, ProbeFailure>>,
    /// Held while a client is built or a host probed, so that threads starting together
    /// build one client and send one probe instead of one each.
    building: Mutex<()>,
    probing: Mutex<()>,
    auth: Mutex<HashMap<String, HostAuth>>,
    /// Per API host: whether it serves the OCI referrers API. The spec forbids a registry
    /// that has it to answer 404, so one 404 settles it for the host; the first asker
    /// finds out (holding `referrers_probing`) while the others wait for its answer.
    referrers_api: Mutex<HashMap<String, bool>>,
    referrers_probing: Mutex<()>,
    tokens: Mutex<HashMap<String, (Secret, Instant)>>,
    retry: RetryPolicy,
    upload: UploadPolicy,
    /// Taken for each request until its response headers arrive (not while a download's
    /// body is read: a thread streaming one registry's blob into another's upload holds
    /// only the upload's).
    in_flight: Permits,
}

impl RegistryClient {
    /// A client with these settings, reading credentials from docker's `config.json`.
    pub fn new(config: RegistryConfig) -> RegistryClient {
        let docker_config = DockerConfigFile::locate(config.docker_config_dir.as_deref());
        let retry = config.retry.clone();
        RegistryClient {
            config,
            docker_config,
            explicit: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            bases: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(HashMap::new()),
            building: Mutex::new(()),
            probing: Mutex::new(()),
            auth: Mutex::new(HashMap::new()),
            referrers_api: Mutex::new(HashMap::new()),
            referrers_probing: Mutex::new(()),
            tokens: Mutex::new(HashMap::new()),
            retry,
            upload: UploadPolicy::default(),
            in_flight: Permits::new(MAX_REQUESTS_IN_FLIGHT),
        }
    }

    pub fn with_upload_policy(mut self, upload: UploadPolicy) -> RegistryClient {
        self.upload = upload;
        self
    }

    /// Retry with this policy instead of the configuration's.
    pub fn with_retry(mut self, retry: RetryPolicy) -> RegistryClient {
        self.retry = retry;
        self
    }

    /// Use these credentials for `registry` instead of config.json (login checks them so).
    pub fn set_credential(&self, registry: &str, credential: Credential) {
        lock(&self.explicit).insert(registry.to_string(), credential);
    }

    /// Check that the registry accepts the configured (or explicitly set) credentials:
    /// `GET /v2/`, answering any challenge.
    pub fn check_login(&self, registry: &str) -> Result<()> {
        let ep = self.upstream(registry);
        let url = self.url(&ep, "/v2/")?;
        let resp = self.send(&ep, &[], Method::GET, url, HeaderMap::new(), None, true)?;
        if resp.status().is_success() {
            return Ok(());
        }
        // A registry without auth accepts anyone; one that still refuses has told us why.
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(self.unauthorized(&ep));
        }
        Err(self.failure(&ep, "the login check".to_string(), resp))
    }

    fn credential(&self, ep: &Endpoint) -> Result<Option<Credential>> {
        if let Some(c) = lock(&self.explicit).get(&ep.name) {
            return Ok(Some(c.clone()));
        }
        match &self.docker_config {
            Some(f) => f.credential(&ep.name),
            None => Ok(None),
        }
    }

    fn upstream(&self, registry: &str) -> Endpoint {
        let api_host = if registry == DEFAULT_REGISTRY {
            DOCKER_HUB_API_HOST.to_string()
        } else {
            registry.to_string()
        };
        Endpoint { name: registry.to_string(), api_host, base: None, is_mirror: false }
    }

    /// Where pulls go: the mirrors in order, then the registry itself.
    fn endpoints(&self, registry: &str, for_pull: bool) -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        if for_pull {
            for m in &self.config.host(registry).mirrors {
                out.push(mirror_endpoint(m).map_err(|reason| RegistryError::Config {
                    registry: registry.to_string(),
                    reason,
                })?);
            }
        }
        out.push(self.upstream(registry));
        Ok(out)
    }

    fn http(&self, host: &str, insecure: bool) -> Result<Client> {
        let key = (host.to_string(), insecure);
        if let Some(c) = lock(&self.clients).get(&key) {
            return Ok(c.clone());
        }
        let _building = lock(&self.building);
        if let Some(c) = lock(&self.clients).get(&key) {
            return Ok(c.clone());
        }
        let cfg_err = |reason: String| RegistryError::Config { registry: host.to_string(), reason };
        if let Some(problem) = &self.config.settings_error {
            return Err(cfg_err(problem.clone()));
        }
        // Every request sets its own timeout (an upload gets longer); this one covers the
        // probes and token requests.
        let mut b = super::http_client_builder()
            .timeout(self.config.timeout)
            .connect_timeout(self.config.timeout.min(Duration::from_secs(20)));
        let cas = &self.config.host(host).ca_files;
        let mut certs = Vec::new();
        for ca in cas {
            let pem = std::fs::read(ca)
                .map_err(|e| cfg_err(format!("cannot read CA file {}: {e}", ca.display())))?;
            let c = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| cfg_err(format!("CA file {} is not PEM: {e}", ca.display())))?;
            certs.extend(c);
        }
        if !certs.is_empty() {
            b = b.tls_certs_merge(certs);
        }
        if insecure {
            b = b.tls_danger_accept_invalid_certs(true);
        }
        let client =
            b.build().map_err(|e| cfg_err(format!("cannot set up HTTP: {}", describe(&e))))?;
        lock(&self.clients).insert(key, client.clone());
        Ok(client)
    }

    /// The URL base of an endpoint, probing HTTPS then HTTP for insecure hosts.
    fn base(&self, ep: &Endpoint) -> Result<Url> {
        if let Some(b) = &ep.base {
            return Ok(b.clone());
        }
        if let Some(b) = lock(&self.bases).get(&ep.api_host) {
            return Ok(b.clone());
        }
        let _probing = lock(&self.probing);
        if let Some(b) = lock(&self.bases).get(&ep.api_host) {
            return Ok(b.clone());
        }
        if let Some(failure) = lock(&self.unreachable).get(&ep.api_host) {
            return Err(failure.error(&ep.name, self.config.timeout));
        }
        let parse = |s: String| {
            Url::parse(&s).map_err(|e| RegistryError::Config {
                registry: ep.name.clone(),
                reason: e.to_string(),
            })
        };
        let https = parse(format!("https://{}/", ep.api_host))?;
        if !self.config.allows_plain_http(&ep.name) {
            return Ok(https);
        }
        let client = self.http(&ep.name, self.config.skips_tls_verification(&ep.name))?;
        let probe = https.join("v2/").map_err(|e| RegistryError::Config {
            registry: ep.name.clone(),
            reason: e.to_string(),
        })?;
        let chosen = match client.get(probe).send() {
            Ok(_) => https,
            // The host speaks TLS, with a certificate ferry cannot trust: plain HTTP would
            // only hide that (a TLS server answers it with 400), so say it.
            Err(e) if certificate_problem(&e).is_some() => {
                return Err(RegistryError::Tls {
                    registry: ep.name.clone(),
                    problem: certificate_problem(&e).unwrap_or_default(),
                })
            }
            Err(tls_err) => {
                tracing::debug!(registry = %ep.name, error = %describe(&tls_err), "HTTPS failed; trying plain HTTP");
                let http = parse(format!("http://{}/", ep.api_host))?;
                let probe = http.join("v2/").map_err(|e| RegistryError::Config {
                    registry: ep.name.clone(),
                    reason: e.to_string(),
                })?;
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let failure = match client.get(probe.clone()).send() {
                        Ok(_) => break http,
                        Err(e) if attempt < self.retry.attempts && transient(&e) => {
                            std::thread::sleep(self.retry.backoff(attempt));
                            continue;
                        }
                        Err(e) if e.is_timeout() => ProbeFailure::Timeout { tries: attempt },
                        Err(e) => ProbeFailure::Unreachable {
                            reason: format!(
                                "HTTPS: {}; HTTP: {}",
                                describe(&tls_err),
                                describe(&e)
                            ),
                        },
                    };
                    let error = failure.error(&ep.name, self.config.timeout);
                    lock(&self.unreachable).insert(ep.api_host.clone(), failure);
                    return Err(error);
                }
            }
        };
        lock(&self.bases).insert(ep.api_host.clone(), chosen.clone());
        Ok(chosen)
    }

    fn url(&self, ep: &Endpoint, path: &str) -> Result<Url> {
        let base = self.base(ep)?;
        base.join(path.trim_start_matches('/')).map_err(|e| RegistryError::Config {
            registry: ep.name.clone(),
            reason: format!("bad URL for {path}: {e}"),
        })
    }

    /// The Authorization header to send for `scopes`, fetching a token if needed.
    fn auth_header(&self, ep: &Endpoint, scopes: &[String]) -> Result<Option<String>> {
        let state = lock(&self.auth).get(&ep.api_host).cloned();
        match state {
            None => Ok(None),
            Some(HostAuth::Basic) => Ok(self.credential(ep)?.and_then(|c| c.basic_header())),
            Some(HostAuth::Bearer { realm, service }) => {
                let key = token_key(&ep.api_host, scopes);
                if let Some((t, until)) = lock(&self.tokens).get(&key) {
                    if Instant::now() < *until {
                        return Ok(Some(format!("Bearer {}", t.expose())));
                    }
                }
                let t = self.fetch_token(ep, &realm, service.as_deref(), scopes)?;
                Ok(Some(format!("Bearer {}", t.expose())))
            }
        }
    }

    fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<Secret> {
        let cred = self.credential(ep)?;
        let mut url = Url::parse(realm).map_err(|e| RegistryError::Invalid {
            registry: ep.name.clone(),
            what: "the token realm".to_string(),
            reason: e.to_string(),
        })?;
        let realm_host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => ep.name.clone(),
        };
        let client = self.http(&ep.name, self.config.skips_tls_verification(&realm_host))?;
        let scope = scopes.join(" ");
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            let req = match &cred {
                Some(Credential::IdentityToken(t)) => {
                    let mut form = url::form_urlencoded::Serializer::new(String::new());
                    form.append_pair("grant_type", "refresh_token");
                    form.append_pair("refresh_token", t.expose());
                    form.append_pair("client_id", "ferry");
                    if let Some(s) = service {
                        form.append_pair("service", s);
                    }
                    if !scope.is_empty() {
                        form.append_pair("scope", &scope);
                    }
                    client
                        .post(url.clone())
                        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(form.finish())
                }
                other => {
                    {
                        let mut q = url.query_pairs_mut();
                        q.clear();
                        if let Some(s) = service {
                            q.append_pair("service", s);
                        }
                        for s in scopes {
                            q.append_pair("scope", s);
                        }
                        if let Some(u) = other.as_ref().and_then(|c| c.username()) {
                            q.append_pair("account", u);
                        }
                    }
                    let mut r = client.get(url.clone());
                    if let Some(h) = other.as_ref().and_then(|c| c.basic_header()) {
                        r = r.header(AUTHORIZATION, h);
                    }
                    r
                }
            };
            match req.send() {
                Ok(r)
                    if (r.status().is_server_error()
                        || r.status() == StatusCode::TOO_MANY_REQUESTS)
                        && attempt < self.retry.attempts =>
                {
                    let what = "a token request".to_string();
                    std::thread::sleep(self.delay_for_response(ep, &what, &r, attempt)?);
                }
                Ok(r) => break r,
                Err(e) => {
                    let err = self.request_error(ep, &Method::GET, &url, &e, attempt);
                    match self.retry_delay_for(&err, attempt) {
                        Some(d) => std::thread::sleep(d),
                        None => return Err(err),
                    }
                }
            }
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(match &cred {
                Some(_) => self.unauthorized(ep),
                None => RegistryError::AuthRequired { registry: ep.name.clone() },
            });
        }
        if !status.is_success() {
            return Err(self.failure(ep, "a token request".to_string(), resp));
        }
        let body: TokenResponse = resp.json().map_err(|e| RegistryError::Invalid {
            registry: ep.name.clone(),
            what: "the token response".to_string(),
            reason: describe(&e),
        })?;
        let token =
            body.token.or(body.access_token).filter(|t| !t.is_empty()).ok_or_else(|| {
                RegistryError::Invalid {
                    registry: ep.name.clone(),
                    what: "the token response".to_string(),
                    reason: "it has no token".to_string(),
                }
            })?;
        // At most a day: the value is the token service's, and an Instant cannot hold any.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).clamp(20, 86_400) - 10);
        let secret = Secret::new(token);
        lock(&self.tokens)
            .insert(token_key(&ep.api_host, scopes), (secret.clone(), Instant::now() + lifetime));
        Ok(secret)
    }

    /// Learn the auth scheme from a 401 and get ready to answer it.
    fn on_challenge(
        &self,
        ep: &Endpoint,
        scopes: &[String],
        header: Option<&str>,
        sent_auth: bool,
    ) -> Result<()> {
        let challenges = header.map(parse_challenges).unwrap_or_default();
        if let Some(b) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = b.param("realm").ok_or_else(|| RegistryError::Invalid {
                registry: ep.name.clone(),
                what: "the authentication challenge".to_string(),
                reason: "a Bearer challenge without realm".to_string(),
            })?;
            let mut all: BTreeSet<String> = scopes.iter().cloned().collect();
            if let Some(s) = b.param("scope") {
                all.extend(s.split(' ').filter(|s| !s.is_empty()).map(str::to_string));
            }
            let all: Vec<String> = all.into_iter().collect();
            let state = HostAuth::Bearer {
                realm: realm.to_string(),
                service: b.param("service").map(str::to_string),
            };
            lock(&self.auth).insert(ep.api_host.clone(), state);
            lock(&self.tokens).remove(&token_key(&ep.api_host, scopes));
            let token = self.fetch_token(ep, realm, b.param("service"), &all)?;
            // Requests name their own scopes; file the token under those too.
            if all != scopes {
                let until = lock(&self.tokens).get(&token_key(&ep.api_host, &all)).map(|(_, u)| *u);
                if let Some(until) = until {
                    lock(&self.tokens).insert(token_key(&ep.api_host, scopes), (token, until));
                }
            }
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let was_basic = matches!(lock(&self.auth).get(&ep.api_host), Some(HostAuth::Basic));
            return match self.credential(ep)? {
                None => Err(RegistryError::AuthRequired { registry: ep.name.clone() }),
                Some(_) if sent_auth && was_basic => Err(self.unauthorized(ep)),
                Some(_) => {
                    lock(&self.auth).insert(ep.api_host.clone(), HostAuth::Basic);
                    Ok(())
                }
            };
        }
        Err(RegistryError::Status {
            registry: ep.name.clone(),
            what: "a request".to_string(),
            status: 401,
            detail: "unsupported authentication scheme".to_string(),
            retry_after: None,
        })
    }

    fn unauthorized(&self, ep: &Endpoint) -> RegistryError {
        let user =
            self.credential(ep).ok().flatten().and_then(|c| c.username().map(str::to_string));
        RegistryError::Unauthorized { registry: ep.name.clone(), user }
    }

    /// How long to wait before retrying after a 5xx or 429: the Retry-After the registry
    /// asked for, else the backoff. A Retry-After beyond the cap is an error now: waiting
    /// that long is for the user to decide.
    fn delay_for_response(
        &self,
        ep: &Endpoint,
        what: &str,
        resp: &Response,
        attempt: u32,
    ) -> Result<Duration> {
        match retry_after(resp.headers()) {
            Some(d) if d > self.retry.max_retry_after => Err(RegistryError::RateLimited {
                registry: ep.name.clone(),
                what: what.to_string(),
                retry_after: d,
                cap: self.retry.max_retry_after,
            }),
            Some(d) => Ok(d),
            None => Ok(self.retry.backoff(attempt)),
        }
    }

    /// Whether an operation that failed with `error` on try `attempt` is tried again, and
    /// after how long.
    fn retry_delay_for(&self, error: &RegistryError, attempt: u32) -> Option<Duration> {
        if attempt >= self.retry.attempts || !error.is_transient() {
            return None;
        }
        Some(match error {
            RegistryError::Status { retry_after: Some(secs), .. } => {
                Duration::from_secs(u64::from(*secs))
            }
            _ => self.retry.backoff(attempt),
        })
    }

    /// A failed request as the user should read it.
    fn request_error(
        &self,
        ep: &Endpoint,
        method: &Method,
        url: &Url,
        e: &reqwest::Error,
        attempt: u32,
    ) -> RegistryError {
        if let Some(problem) = certificate_problem(e) {
            return RegistryError::Tls { registry: ep.name.clone(), problem };
        }
        // The body being sent was another registry's download, and that broke off.
        if let Some(b) = causes(e).find_map(|c| c.downcast_ref::<DownloadBroke>()) {
            return RegistryError::Interrupted {
                registry: b.registry.clone(),
                what: b.what.clone(),
                reason: b.reason.clone(),
            };
        }
        if e.is_timeout() {
            // The configured timeout, as the user set it: an upload's extra time to send its
            // body is not the registry's silence.
            return RegistryError::Timeout {
                registry: ep.name.clone(),
                what: request_subject(method, url),
                after: self.config.timeout,
                tries: attempt,
            };
        }
        if e.is_connect() {
            return RegistryError::Unreachable { registry: ep.name.clone(), reason: describe(e) };
        }
        RegistryError::Interrupted {
            registry: ep.name.clone(),
            what: request_subject(method, url),
            reason: describe(e),
        }
    }

    /// A plain GET of `repo`'s (pull scope, no headers), retried like any request.
    fn get_pulling(&self, ep: &Endpoint, repo: &Repository, url: Url) -> Result<Response> {
        self.send(ep, &[pull_scope(&repo.path)], Method::GET, url, HeaderMap::new(), None, true)
    }

    /// Send one request: auth, challenge answering, retries. Returns any final response
    /// other than 401 (the caller judges the status).
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        ep: &Endpoint,
        scopes: &[String],
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<Outgoing<'_>>,
        retry: bool,
    ) -> Result<Response> {
        let client = self.http(&ep.name, self.config.skips_tls_verification(&ep.name))?;
        let timeout = self.config.timeout
            + body.as_ref().map_or(Duration::ZERO, |b| {
                Duration::from_secs_f64(b.len as f64 / MIN_UPLOAD_RATE as f64)
            });
        let mut attempt = 0;
        let mut answered_challenge = false;
        loop {
            attempt += 1;
            let auth = self.auth_header(ep, scopes)?;
            let mut req = client
                .request(method.clone(), url.clone())
                .headers(headers.clone())
                .timeout(timeout);
            if let Some(a) = &auth {
                let mut v = HeaderValue::from_str(a).map_err(|_| RegistryError::Credentials {
                    registry: ep.name.clone(),
                    reason: "the credentials contain characters not allowed in an HTTP header"
                        .to_string(),
                })?;
                v.set_sensitive(true);
                req = req.header(AUTHORIZATION, v);
            }
            if let Some(b) = &body {
                req = req.body(
                    (b.make)()
                        .map_err(|e| RegistryError::Io { path: url.path().into(), source: e })?,
                );
            }
            tracing::debug!(registry = %ep.name, %method, path = url.path(), attempt, "request");
            match self.in_flight.with(|| req.send()) {
                Err(e) => {
                    let err = self.request_error(ep, &method, &url, &e, attempt);
                    if let Some(delay) = self.retry_delay_for(&err, attempt).filter(|_| retry) {
                        tracing::info!(registry = %ep.name, error = %err, ?delay, "retrying");
                        std::thread::sleep(delay);
                        continue;
                    }
                    return Err(err);
                }
                Ok(resp) => {
                    let status = resp.status();
                    if status == StatusCode::UNAUTHORIZED {
                        if answered_challenge {
                            return Err(match self.credential(ep)? {
                                Some(_) => self.unauthorized(ep),
                                None => RegistryError::AuthRequired { registry: ep.name.clone() },
                            });
                        }
                        let header = resp
                            .headers()
                            .get(reqwest::header::WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        self.on_challenge(ep, scopes, header.as_deref(), auth.is_some())?;
                        answered_challenge = true;
                        attempt -= 1;
                        continue;
                    }
                    if retry
                        && attempt < self.retry.attempts
                        && (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
                    {
                        let what = request_subject(&method, &url);
                        let delay = self.delay_for_response(ep, &what, &resp, attempt)?;
                        tracing::info!(registry = %ep.name, %status, ?delay, "retrying");
                        drop(resp);
                        std::thread::sleep(delay);
                        continue;
                    }
                    return Ok(resp);
                }
            }
        }
    }

    /// Turn an unexpected response into an error, with the registry's own error message.
    fn failure(&self, ep: &Endpoint, what: String, resp: Response) -> RegistryError {
        let status = resp.status();
        let mut retry_after = None;
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            match self.delay_for_response(ep, &what, &resp, 1) {
                Err(limited) => return limited,
                Ok(_) => {
                    retry_after = self::retry_after(resp.headers())
                        .map(|d| u32::try_from(d.as_secs_f64().ceil() as u64).unwrap_or(u32::MAX))
                }
            }
        }
        let mut body = String::new();
        let _ = resp.take(4096).read_to_string(&mut body);
        let detail = error_detail(&body);
        match status {
            StatusCode::NOT_FOUND => {
                RegistryError::NotFound { registry: ep.name.clone(), what, detail }
            }
            StatusCode::FORBIDDEN => {
                RegistryError::Denied { registry: ep.name.clone(), what, detail }
            }
            StatusCode::UNAUTHORIZED => self.unauthorized(ep),
            s => RegistryError::Status {
                registry: ep.name.clone(),
                what,
                status: s.as_u16(),
                detail,
                retry_after,
            },
        }
    }

    /// Try each endpoint in turn; a mirror's failure falls through to the next.
    fn on_endpoints<T>(
        &self,
        registry: &str,
        for_pull: bool,
        f: impl Fn(&Endpoint) -> Result<T>,
    ) -> Result<T> {
        let eps = self.endpoints(registry, for_pull)?;
        let mut last = None;
        for ep in &eps {
            match f(ep) {
                Ok(v) => return Ok(v),
                Err(e) if ep.is_mirror => {
                    tracing::warn!(mirror = %ep.api_host, error = %e, "mirror failed; trying the next source");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config {
            registry: registry.to_string(),
            reason: "no endpoint to try".to_string(),
        }))
    }

    fn get_manifest_from(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        reference: &str,
    ) -> Result<FetchedManifest> {
        let what = format!("manifest {}:{reference}", repo.path).replace(":sha256:", "@sha256:");
        let url = self.url(ep, &format!("/v2/{}/manifests/{reference}", repo.path))?;
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(media_type::MANIFEST_ACCEPT));
        let resp = self.send(ep, &[pull_scope(&repo.path)], Method::GET, url, h, None, true)?;
        if !resp.status().is_success() {
            return Err(self.failure(ep, what, resp));
        }
        let content_type = header_str(resp.headers(), CONTENT_TYPE.as_str());
        let header_digest = header_str(resp.headers(), "docker-content-digest");
        let mut bytes = Vec::new();
        resp.take(MANIFEST_MAX + 1).read_to_end(&mut bytes).map_err(|e| {
            RegistryError::Interrupted {
                registry: ep.name.clone(),
                what: format!("the download of {what}"),
                reason: describe_io(&e, self.config.timeout),
            }
        })?;
        if bytes.len() as u64 > MANIFEST_MAX {
            return Err(RegistryError::Invalid {
                registry: ep.name.clone(),
                what,
                reason: "it is larger than 16 MiB".to_string(),
            });
        }
        let digest = Digest::of(&bytes);
        let expected =
            reference.parse::<Digest>().ok().or_else(|| header_digest.and_then(|h| h.parse().ok()));
        if let Some(exp) = expected {
            if exp != digest {
                return Err(RegistryError::DigestMismatch {
                    registry: ep.name.clone(),
                    what,
                    expected: exp,
                    actual: digest,
                });
            }
        }
        let (mt, _) = oci::parse_manifest(&bytes, content_type.as_deref())
            .map_err(|reason| RegistryError::Invalid { registry: ep.name.clone(), what, reason })?;
        Ok(FetchedManifest { bytes, media_type: mt, digest })
    }

    /// Upload a blob into an upload session (`location`), or a new one.
    #[allow(clippy::too_many_arguments)]
    fn upload(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        path: &Path,
        mut location: Option<Url>,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.upload_once(ep, repo, digest, size, path, location.take()) {
                Ok(()) => return Ok(()),
                Err(e) => match self.retry_delay_for(&e, attempt) {
                    Some(delay) => {
                        tracing::info!(registry = %ep.name, %digest, error = %e, ?delay, "upload failed; starting over");
                        std::thread::sleep(delay);
                    }
                    None => return Err(e),
                },
            }
        }
    }

    fn upload_once(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        path: &Path,
        location: Option<Url>,
    ) -> Result<()> {
        let scopes = [push_scope(&repo.path)];
        let what = format!("upload of blob {digest} to {}", repo.path);
        let (mut location, min_chunk) = match location {
            Some(l) => (l, 0),
            None => {
                let url = self.url(ep, &format!("/v2/{}/blobs/uploads/", repo.path))?;
                let mut h = HeaderMap::new();
                h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
                let resp = self.send(ep, &scopes, Method::POST, url.clone(), h, None, false)?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(self.failure(ep, what, resp));
                }
                let min = header_str(resp.headers(), "oci-chunk-min-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                (location_of(&resp, &url, ep)?, min)
            }
        };
        let io_err = |e: std::io::Error| RegistryError::Io { path: path.to_path_buf(), source: e };
        let file_part = move |offset: u64, len: u64| -> std::io::Result<Body> {
            let mut f = std::fs::File::open(path)?;
            f.seek(SeekFrom::Start(offset))?;
            Ok(Body::sized(f.take(len), len))
        };
        if size > self.upload.monolithic_max {
            let chunk = self.upload.chunk_size.max(min_chunk).max(1);
            let mut offset = 0;
            while offset < size {
                let len = chunk.min(size - offset);
                let mut h = HeaderMap::new();
                h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                h.insert("content-range", header_value(&format!("{offset}-{}", offset + len - 1))?);
                let make = || file_part(offset, len);
                let body = Outgoing { make: &make, len };
                let resp =
                    self.send(ep, &scopes, Method::PATCH, location.clone(), h, Some(body), false)?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(self.failure(ep, what, resp));
                }
                location = location_of(&resp, &location, ep)?;
                offset += len;
            }
            location.query_pairs_mut().append_pair("digest", &digest.to_string());
            let mut h = HeaderMap::new();
            h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
            let resp = self.send(ep, &scopes, Method::PUT, location, h, None, false)?;
            return self.check_created(ep, what, resp, digest);
        }
        // Fail before sending if the file is not what the caller says.
        let actual = std::fs::metadata(path).map_err(io_err)?.len();
        if actual != size {
            return Err(RegistryError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!("it has {actual} bytes, expected {size}")),
            });
        }
        location.query_pairs_mut().append_pair("digest", &digest.to_string());
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let make = || file_part(0, size);
        let body = Outgoing { make: &make, len: size };
        let resp = self.send(ep, &scopes, Method::PUT, location, h, Some(body), false)?;
        self.check_created(ep, what, resp, digest)
    }

    fn check_created(
        &self,
        ep: &Endpoint,
        what: String,
        resp: Response,
        digest: &Digest,
    ) -> Result<()> {
        if resp.status() != StatusCode::CREATED {
            return Err(self.failure(ep, what, resp));
        }
        if let Some(d) = header_str(resp.headers(), "docker-content-digest")
            .and_then(|h| h.parse::<Digest>().ok())
        {
            if d != *digest {
                return Err(RegistryError::DigestMismatch {
                    registry: ep.name.clone(),
                    what,
                    expected: digest.clone(),
                    actual: d,
                });
            }
        }
        Ok(())
    }

    /// The referrers API's answer; None when the registry has no such API (404).
    /// One page of a tag list and the URL of the next; a repository the registry does not
    /// know has no tags.
    fn tag_page(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        url: &Url,
    ) -> Result<(Vec<String>, Option<Url>)> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let resp = self.get_pulling(ep, repo, url.clone())?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok((Vec::new(), None));
        }
        if !resp.status().is_success() {
            return Err(self.failure(ep, format!("tags of {}", repo.path), resp));
        }
        let next = header_str(resp.headers(), "link")
            .and_then(|l| next_link(&l))
            .and_then(|n| url.join(&n).ok());
        let list: TagList = resp.json().map_err(|e| RegistryError::Invalid {
            registry: ep.name.clone(),
            what: format!("tag list of {}", repo.path),
            reason: describe(&e),
        })?;
        Ok((list.tags.unwrap_or_default(), next))
    }

    fn referrers_from_api(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<ImageIndex>> {
        let known = |client: &Self| lock(&client.referrers_api).get(&ep.api_host).copied();
        let probe_guard = match known(self) {
            Some(false) => return Ok(None),
            Some(true) => None,
            None => {
                let guard = lock(&self.referrers_probing);
                match known(self) {
                    Some(false) => return Ok(None),
                    Some(true) => None,
                    None => Some(guard),
                }
            }
        };
        let mut url = self.url(ep, &format!("/v2/{}/referrers/{digest}", repo.path))?;
        if let Some(t) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", t);
        }
        let resp = self.get_pulling(ep, repo, url)?;
        if resp.status() == StatusCode::NOT_FOUND {
            lock(&self.referrers_api).insert(ep.api_host.clone(), false);
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.failure(ep, format!("referrers of {digest}"), resp));
        }
        lock(&self.referrers_api).insert(ep.api_host.clone(), true);
        drop(probe_guard);
        let mut bytes = Vec::new();
        resp.take(MANIFEST_MAX).read_to_end(&mut bytes).map_err(|e| {
            RegistryError::Unreachable {
                registry: ep.name.clone(),
                reason: format!("reading referrers: {e}"),
            }
        })?;
        serde_json::from_slice::<ImageIndex>(&bytes).map(Some).map_err(|e| RegistryError::Invalid {
            registry: ep.name.clone(),
            what: format!("referrers of {digest}"),
            reason: e.to_string(),
        })
    }
}

impl Registry for RegistryClient {
    fn get_manifest(&self, repo: &Repository, reference: &str) -> Result<FetchedManifest> {
        self.on_endpoints(&repo.registry, true, |ep| self.get_manifest_from(ep, repo, reference))
    }

    fn head_manifest(&self, repo: &Repository, reference: &str) -> Result<Option<Descriptor>> {
        self.on_endpoints(&repo.registry, true, |ep| {
            let url = self.url(ep, &format!("/v2/{}/manifests/{reference}", repo.path))?;
            let mut h = HeaderMap::new();
            h.insert(ACCEPT, HeaderValue::from_static(media_type::MANIFEST_ACCEPT));
            let resp =
                self.send(ep, &[pull_scope(&repo.path)], Method::HEAD, url, h, None, true)?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !resp.status().is_success() {
                return Err(self.failure(ep, format!("manifest {}:{reference}", repo.path), resp));
            }
            let digest = header_str(resp.headers(), "docker-content-digest")
                .and_then(|d| d.parse::<Digest>().ok());
            let size = header_len(resp.headers());
            match (digest, size) {
                (Some(d), Some(s)) => {
                    let mt = header_str(resp.headers(), CONTENT_TYPE.as_str()).unwrap_or_default();
                    Ok(Some(Descriptor::new(mt, d, s)))
                }
                // Without a digest header, only a GET can say what it is.
                _ => self.get_manifest_from(ep, repo, reference).map(|m| Some(m.descriptor())),
            }
        })
    }

    fn put_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest> {
        let ep = self.upstream(&repo.registry);
        let url = self.url(&ep, &format!("/v2/{}/manifests/{reference}", repo.path))?;
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, header_value(media_type)?);
        let owned = bytes.to_vec();
        let make = || Ok(Body::from(owned.clone()));
        let body = Outgoing { make: &make, len: bytes.len() as u64 };
        let resp =
            self.send(&ep, &[push_scope(&repo.path)], Method::PUT, url, h, Some(body), true)?;
        let digest = Digest::of(bytes);
        let what = format!("manifest {}:{reference}", repo.path).replace(":sha256:", "@sha256:");
        self.check_created(&ep, what, resp, &digest)?;
        Ok(digest)
    }

    fn blob_exists(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        let ep = self.upstream(&repo.registry);
        let url = self.url(&ep, &format!("/v2/{}/blobs/{digest}", repo.path))?;
        let resp = self.send(
            &ep,
            &[pull_scope(&repo.path)],
            Method::HEAD,
            url,
            HeaderMap::new(),
            None,
            true,
        )?;
        match resp.status() {
            s if s.is_success() => Ok(Some(header_len(resp.headers()).unwrap_or(0))),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.failure(&ep, format!("blob {digest}"), resp)),
        }
    }

    fn get_blob(&self, repo: &Repository, digest: &Digest) -> Result<BlobStream> {
        self.on_endpoints(&repo.registry, true, |ep| {
            let url = self.url(ep, &format!("/v2/{}/blobs/{digest}", repo.path))?;
            let resp = self.get_pulling(ep, repo, url)?;
            if !resp.status().is_success() {
                return Err(self.failure(ep, format!("blob {digest} of {}", repo.path), resp));
            }
            let size = resp.content_length();
            let reader = BodyReader {
                resp,
                timeout: self.config.timeout,
                registry: ep.name.clone(),
                what: format!("the download of blob {digest} of {}", repo.path),
            };
            Ok(BlobStream { reader: Box::new(reader), size })
        })
    }

    fn put_blob(&self, repo: &Repository, digest: &Digest, size: u64, path: &Path) -> Result<()> {
        let ep = self.upstream(&repo.registry);
        self.upload(&ep, repo, digest, size, path, None)
    }

    fn retry_delay(&self, error: &RegistryError, attempt: u32) -> Option<Duration> {
        self.retry_delay_for(error, attempt)
    }

    fn mount_blob(
        &self,
        repo: &Repository,
        from: &Repository,
        digest: &Digest,
        size: u64,
        path: &Path,
    ) -> Result<MountOutcome> {
        if from.registry != repo.registry {
            return Err(RegistryError::Config {
                registry: repo.registry.clone(),
                reason: format!("cannot mount from another registry ({})", from.registry),
            });
        }
        let ep = self.upstream(&repo.registry);
        let mut url = self.url(&ep, &format!("/v2/{}/blobs/uploads/", repo.path))?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", &from.path);
        let scopes = [push_scope(&repo.path), pull_scope(&from.path)];
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.send(&ep, &scopes, Method::POST, url.clone(), h, None, true)?;
        match resp.status() {
            StatusCode::CREATED => Ok(MountOutcome::Mounted),
            StatusCode::ACCEPTED => {
                let location = location_of(&resp, &url, &ep)?;
                self.upload(&ep, repo, digest, size, path, Some(location))?;
                Ok(MountOutcome::Uploaded)
            }
            _ => Err(self.failure(&ep, format!("mount of blob {digest} from {}", from.path), resp)),
        }
    }

    fn try_mount_blob(
        &self,
        repo: &Repository,
        from: &Repository,
        digest: &Digest,
    ) -> Result<bool> {
        if from.registry != repo.registry {
            return Ok(false);
        }
        let ep = self.upstream(&repo.registry);
        let mut url = self.url(&ep, &format!("/v2/{}/blobs/uploads/", repo.path))?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", &from.path);
        let scopes = [push_scope(&repo.path), pull_scope(&from.path)];
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.send(&ep, &scopes, Method::POST, url.clone(), h, None, true)?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // Not mounted: close the upload session it opened instead of leaving it to
                // expire. A failure to cancel costs nothing but a stale session.
                let location = location_of(&resp, &url, &ep)?;
                let cancelled = self.send(
                    &ep,
                    &[push_scope(&repo.path)],
                    Method::DELETE,
                    location,
                    HeaderMap::new(),
                    None,
                    true,
                );
                if let Err(e) = cancelled {
                    tracing::debug!(registry = %ep.name, error = %e, "cancelling an upload session failed");
                }
                Ok(false)
            }
            _ => Err(self.failure(&ep, format!("mount of blob {digest} from {}", from.path), resp)),
        }
    }

    fn put_blob_stream(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        reader: Box<dyn Read + Send>,
    ) -> Result<()> {
        let ep = self.upstream(&repo.registry);
        let scopes = [push_scope(&repo.path)];
        let what = format!("upload of blob {digest} to {}", repo.path);
        let url = self.url(&ep, &format!("/v2/{}/blobs/uploads/", repo.path))?;
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.send(&ep, &scopes, Method::POST, url.clone(), h, None, true)?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.failure(&ep, what, resp));
        }
        let mut location = location_of(&resp, &url, &ep)?;
        location.query_pairs_mut().append_pair("digest", &digest.to_string());
        // One monolithic PUT whose body is the stream itself: the bytes go from one
        // connection to the other and never touch the disk. The stream can be sent once.
        let reader = Mutex::new(Some(reader));
        let make = || match lock(&reader).take() {
            Some(r) => Ok(Body::sized(r, size)),
            None => Err(std::io::Error::other("the blob stream was already sent once")),
        };
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let body = Outgoing { make: &make, len: size };
        let resp = self.send(&ep, &scopes, Method::PUT, location, h, Some(body), false)?;
        self.check_created(&ep, what, resp, digest)
    }

    fn list_tags(&self, repo: &Repository) -> Result<Vec<String>> {
        let ep = self.upstream(&repo.registry);
        let mut url = self.url(&ep, &format!("/v2/{}/tags/list", repo.path))?;
        url.query_pairs_mut().append_pair("n", "1000");
        let mut tags = Vec::new();
        for _page in 0..10_000 {
            let (page, next) = self.tag_page(&ep, repo, &url)?;
            tags.extend(page);
            match next {
                Some(n) => url = n,
                None => break,
            }
        }
        Ok(tags)
    }

    fn tags_page(&self, repo: &Repository, limit: usize) -> Result<(Vec<String>, bool)> {
        let ep = self.upstream(&repo.registry);
        let mut url = self.url(&ep, &format!("/v2/{}/tags/list", repo.path))?;
        url.query_pairs_mut().append_pair("n", &limit.to_string());
        let (tags, next) = self.tag_page(&ep, repo, &url)?;
        Ok((tags, next.is_some()))
    }

    fn referrers(
        &self,
        repo: &Repository,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ImageIndex> {
        let ep = self.upstream(&repo.registry);
        let mut index = match self.referrers_from_api(&ep, repo, digest, artifact_type)? {
            Some(index) => index,
            None => {
                // No referrers API: the tag schema.
                let tag = format!("sha256-{}", digest.hex());
                match self.get_manifest_from(&ep, repo, &tag) {
                    Ok(m) => serde_json::from_slice::<ImageIndex>(&m.bytes)
                        .unwrap_or_else(|_| ImageIndex::new_oci()),
                    Err(RegistryError::NotFound { .. }) => ImageIndex::new_oci(),
                    Err(e) => return Err(e),
                }
            }
        };
        if let Some(t) = artifact_type {
            index.manifests.retain(|m| m.artifact_type.as_deref() == Some(t));
        }
        Ok(index)
    }

    fn referrers_api(&self, repo: &Repository, digest: &Digest) -> Result<Option<ImageIndex>> {
        let ep = self.upstream(&repo.registry);
        self.referrers_from_api(&ep, repo, digest, None)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it consistent (plain inserts).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn token_key(host: &str, scopes: &[String]) -> String {
    let mut s: Vec<&str> = scopes.iter().map(String::as_str).collect();
    s.sort();
    format!("{host}|{}", s.join(" "))
}

fn mirror_endpoint(m: &str) -> std::result::Result<Endpoint, String> {
    if m.contains("://") {
        let url = Url::parse(m).map_err(|e| format!("mirror {m:?} is not a URL: {e}"))?;
        let host = url.host_str().ok_or_else(|| format!("mirror {m:?} has no host"))?;
        let api_host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let mut base = url.clone();
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        Ok(Endpoint { name: api_host.clone(), api_host, base: Some(base), is_mirror: true })
    } else {
        let host = m.trim_end_matches('/').to_string();
        Ok(Endpoint { name: host.clone(), api_host: host, base: None, is_mirror: true })
    }
}

/// Connection-level failures worth another try.
fn transient(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
}

/// A request body: how to make it (again, for a retry) and how long it is.
struct Outgoing<'a> {
    make: &'a dyn Fn() -> io::Result<Body>,
    len: u64,
}

/// A blob download: its read errors say, in the user's terms, which registry broke off
/// which download. When the stream is the body of an upload to another registry (a
/// promotion), that is how the failure is blamed on the source, not the destination.
struct BodyReader {
    resp: Response,
    timeout: Duration,
    registry: String,
    what: String,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.resp.read(buf).map_err(|e| {
            let broke = DownloadBroke {
                registry: self.registry.clone(),
                what: self.what.clone(),
                reason: describe_io(&e, self.timeout),
            };
            io::Error::new(e.kind(), broke)
        })
    }
}

/// A download that broke off, carried through I/O errors; displays as its reason.
#[derive(Debug)]
struct DownloadBroke {
    registry: String,
    what: String,
    reason: String,
}

impl std::fmt::Display for DownloadBroke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for DownloadBroke {}

/// The errors an error wraps, following io::Errors' inner errors too (an io::Error's
/// `source` skips the error it wraps).
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |c| {
        match c.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        }
    })
}

/// An I/O error of a response body, with reqwest's causes and a timeout spelled out.
fn describe_io(e: &io::Error, timeout: Duration) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<reqwest::Error>());
    match inner {
        Some(r) if r.is_timeout() => {
            format!("the registry sent nothing for {} (FERRY_REGISTRY_TIMEOUT)", seconds(&timeout))
        }
        Some(r) => describe(r),
        None if e.kind() == io::ErrorKind::TimedOut => {
            format!("the registry sent nothing for {} (FERRY_REGISTRY_TIMEOUT)", seconds(&timeout))
        }
        None => e.to_string(),
    }
}

/// Why a TLS certificate was refused, if that is what failed. (rustls' error sits under
/// hyper's, inside io::Errors that may wrap one another.)
fn certificate_problem(e: &reqwest::Error) -> Option<String> {
    causes(e).find_map(|c| match c.downcast_ref::<rustls::Error>() {
        Some(rustls::Error::InvalidCertificate(problem)) => Some(certificate_problem_text(problem)),
        _ => None,
    })
}

fn certificate_problem_text(e: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    let what = match e {
        C::UnknownIssuer => "it is signed by an unknown certificate authority (issuer)",
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "it is not valid for this host name"
        }
        C::Expired | C::ExpiredContext { .. } => "it has expired",
        C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet",
        C::Revoked => "it has been revoked",
        // Typically a CA of the right name but another key: the wrong CA file.
        C::BadSignature => {
            "its signature does not verify against the certificate authority it names"
        }
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => "it is not meant for a TLS server",
        _ => "",
    };
    if what.is_empty() {
        format!("it was rejected ({e})")
    } else {
        what.to_string()
    }
}

/// What a request is about, for messages: `GET manifest acme/api:1.0`,
/// `PUT upload of blob sha256:… to acme/api`. Built from the path only: a URL may carry
/// signed query strings.
fn request_subject(method: &Method, url: &Url) -> String {
    let path = url.path();
    let Some(rest) = path.strip_prefix("/v2/") else {
        return format!("{method} {path}");
    };
    if rest.is_empty() {
        return format!("{method} /v2/ (the API check)");
    }
    let split = |marker: &str| rest.rfind(marker).map(|i| (&rest[..i], &rest[i + marker.len()..]));
    if let Some((repo, reference)) = split("/manifests/") {
        let sep = if reference.contains(':') { '@' } else { ':' };
        return format!("{method} manifest {repo}{sep}{reference}");
    }
    if let Some((repo, _)) = split("/blobs/uploads/") {
        let digest = url.query_pairs().find(|(k, _)| k == "digest").map(|(_, v)| v.to_string());
        let mounted = url.query_pairs().find(|(k, _)| k == "mount").map(|(_, v)| v.to_string());
        return match (digest, mounted) {
            (Some(d), _) => format!("{method} upload of blob {d} to {repo}"),
            (None, Some(d)) => format!("{method} mount of blob {d} into {repo}"),
            (None, None) => format!("{method} blob upload to {repo}"),
        };
    }
    if let Some((repo, digest)) = split("/blobs/") {
        return format!("{method} blob {digest} of {repo}");
    }
    if let Some((repo, _)) = split("/tags/list") {
        return format!("{method} tag list of {repo}");
    }
    if let Some((repo, digest)) = split("/referrers/") {
        return format!("{method} referrers of {repo}@{digest}");
    }
    format!("{method} {path}")
}

/// A reqwest error without its URL (which may carry signed query strings), with causes.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut s = String::new();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    s.push_str(kind);
    while let Some(c) = cur {
        let text = c.to_string();
        // A cause that already says what was said so far (ferry's own wrapped errors)
        // replaces it rather than repeating it.
        if text.starts_with(&s) {
            s = text;
        } else if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string())
}

/// Content-Length as sent (a HEAD response has no body, so reqwest reports 0 for it).
fn header_len(h: &HeaderMap) -> Option<u64> {
    header_str(h, CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok())
}

fn header_value(s: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(s).map_err(|_| RegistryError::Config {
        registry: String::new(),
        reason: format!("{s:?} is not a valid header value"),
    })
}

fn location_of(resp: &Response, base: &Url, ep: &Endpoint) -> Result<Url> {
    let loc =
        header_str(resp.headers(), LOCATION.as_str()).ok_or_else(|| RegistryError::Invalid {
            registry: ep.name.clone(),
            what: "an upload session".to_string(),
            reason: "no Location header".to_string(),
        })?;
    base.join(&loc).map_err(|e| RegistryError::Invalid {
        registry: ep.name.clone(),
        what: "an upload session".to_string(),
        reason: format!("bad Location: {e}"),
    })
}

/// `Retry-After`: seconds, or an HTTP date.
pub(crate) fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = header_str(h, "retry-after")?;
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(&v).ok()?;
    let now = chrono::Utc::now();
    (when.with_timezone(&chrono::Utc) - now).to_std().ok()
}

/// The registry's error JSON (`{"errors":[{"code","message"}]}`) as one line.
fn error_detail(body: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_str::<Errors>(body) {
        Ok(e) => e
            .errors
            .iter()
            .map(|i| {
                if i.message.is_empty() {
                    i.code.clone()
                } else {
                    format!("{}: {}", i.code, i.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => body.trim().chars().take(200).collect(),
    }
}

/// The `rel="next"` target of a Link header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find(|p| p.contains("rel=\"next\"") || p.contains("rel=next")).and_then(|p| {
        let start = p.find('<')? + 1;
        let end = p.find('>')?;
        Some(p[start..end].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_by_what_they_touch() {
        let subject = |m: Method, u: &str| request_subject(&m, &Url::parse(u).unwrap());
        let d = "sha256:aaaa";
        assert_eq!(
            subject(Method::GET, "http://h/v2/acme/api/manifests/1.0"),
            "GET manifest acme/api:1.0"
        );
        assert_eq!(
            subject(Method::HEAD, &format!("http://h/v2/acme/api/manifests/{d}")),
            format!("HEAD manifest acme/api@{d}")
        );
        assert_eq!(
            subject(Method::GET, &format!("http://h/v2/a/blobs/b/blobs/{d}")),
            format!("GET blob {d} of a/blobs/b")
        );
        assert_eq!(
            subject(Method::PUT, &format!("http://h/v2/a/blobs/uploads/u-1?_state=x&digest={d}")),
            format!("PUT upload of blob {d} to a")
        );
        assert_eq!(subject(Method::POST, "http://h/v2/a/blobs/uploads/"), "POST blob upload to a");
        assert_eq!(
            subject(Method::POST, &format!("http://h/v2/a/blobs/uploads/?mount={d}&from=b")),
            format!("POST mount of blob {d} into a")
        );
        assert_eq!(subject(Method::GET, "http://h/v2/a/tags/list?n=1"), "GET tag list of a");
        assert_eq!(subject(Method::GET, "http://h/v2/"), "GET /v2/ (the API check)");
        assert_eq!(subject(Method::GET, "http://h/token?scope=x"), "GET /token");
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let future = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        h.insert("retry-after", HeaderValue::from_str(&future).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d <= Duration::from_secs(30) && d >= Duration::from_secs(25), "{d:?}");
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn registry_error_bodies() {
        assert_eq!(
            error_detail(
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
            ),
            "MANIFEST_UNKNOWN: manifest unknown"
        );
        assert_eq!(error_detail("plain text"), "plain text");
    }

    #[test]
    fn link_pagination() {
        assert_eq!(
            next_link(r#"</v2/x/tags/list?last=b&n=2>; rel="next""#).as_deref(),
            Some("/v2/x/tags/list?last=b&n=2")
        );
        assert_eq!(next_link(r#"</a>; rel="prev""#), None);
    }

    #[test]
    fn mirrors_parse() {
        let e = mirror_endpoint("https://mirror.internal").unwrap();
        assert_eq!(e.api_host, "mirror.internal");
        assert_eq!(e.base.unwrap().as_str(), "https://mirror.internal/");
        let e = mirror_endpoint("http://10.0.0.5:5000/prefix").unwrap();
        assert_eq!(e.api_host, "10.0.0.5:5000");
        assert_eq!(e.base.unwrap().as_str(), "http://10.0.0.5:5000/prefix/");
        let e = mirror_endpoint("mirror.local:5000").unwrap();
        assert!(e.base.is_none());
        assert!(mirror_endpoint("http://").is_err());
    }

    #[test]
    fn token_keys_ignore_scope_order() {
        let a = token_key("h", &["b".into(), "a".into()]);
        let b = token_key("h", &["a".into(), "b".into()]);
        assert_eq!(a, b);
    }
}
