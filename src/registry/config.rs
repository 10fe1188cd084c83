//! Per-registry settings: plain HTTP, mirrors, extra CA. The lead fills this from
//! images.toml `[registries."host"]`; the CLI adds docker-style `certs.d` directories.
//! Also how patiently every request is made: retries, backoff, timeouts, which come from
//! the environment (`FERRY_REGISTRY_*`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::reference::is_loopback_registry;

/// Settings of one registry host (`host[:port]`, as in image references).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryHostConfig {
    /// Allow plain HTTP and unverified TLS. A loopback host may use plain HTTP without it,
    /// but a loopback host that speaks TLS is verified like any other: a certificate is only
    /// worth presenting if it is checked.
    pub insecure: bool,
    /// Pull-through mirrors tried in order before the registry itself, for pulls only.
    /// Each is a URL base (`https://mirror.internal`, `http://10.0.0.5:5000`) or a host.
    pub mirrors: Vec<String>,
    /// PEM files of CAs trusted for this host, in addition to the system's.
    pub ca_files: Vec<PathBuf>,
}

/// How often and how patiently a request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total tries of one request, the first included.
    pub attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// The longest Retry-After ferry agrees to wait; a registry asking for more fails the
    /// request at once (waiting out a long rate limit is the user's call, not ferry's).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before try `attempt + 1`: exponential from `initial_delay`, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// How long ferry waits for a registry that has gone quiet: for an answer to a request, and
/// for each next piece of a response body. A request body (an upload) may also take the
/// time to send it at [`MIN_UPLOAD_RATE`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes per second below which an upload counts as stalled.
pub const MIN_UPLOAD_RATE: u64 = 100 * 1024;

/// Settings of every registry ferry talks to, by host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    pub hosts: BTreeMap<String, RegistryHostConfig>,
    /// Where docker's `config.json` is read and `login` writes (default `$DOCKER_CONFIG`,
    /// else `~/.docker`).
    pub docker_config_dir: Option<PathBuf>,
    /// Retries of transient failures (connection errors, timeouts, 5xx, 429).
    pub retry: RetryPolicy,
    /// See [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// A `FERRY_REGISTRY_*` variable that could not be read. Every request fails with it,
    /// rather than silently running with a default the user did not ask for.
    pub settings_error: Option<String>,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            hosts: BTreeMap::new(),
            docker_config_dir: None,
            retry: RetryPolicy::default(),
            timeout: DEFAULT_TIMEOUT,
            settings_error: None,
        }
    }
}

impl RegistryConfig {
    pub fn host(&self, host: &str) -> RegistryHostConfig {
        self.hosts.get(host).cloned().unwrap_or_default()
    }

    pub fn host_mut(&mut self, host: &str) -> &mut RegistryHostConfig {
        self.hosts.entry(host.to_string()).or_default()
    }

    /// Whether plain HTTP may be used for `host`: `insecure`, or a loopback host (as docker
    /// allows). A host with its own CA is always reached over verified TLS.
    pub fn allows_plain_http(&self, host: &str) -> bool {
        let h = self.host(host);
        h.ca_files.is_empty() && (h.insecure || is_loopback_registry(host))
    }

    /// Whether TLS certificates of `host` go unverified: only when images.toml says
    /// `insecure = true` for it (and gives it no CA). Loopback is no exception.
    pub fn skips_tls_verification(&self, host: &str) -> bool {
        let h = self.host(host);
        h.ca_files.is_empty() && h.insecure
    }

    /// Read the `FERRY_REGISTRY_*` variables through `var`: `_TIMEOUT` (seconds a quiet
    /// registry is waited for, default 60), `_RETRIES` (retries of a failed request, default
    /// 4), `_BACKOFF` (seconds before the first retry, doubling up to 10; default 0.2),
    /// `_MAX_RETRY_AFTER` (the longest Retry-After honoured, default 60 seconds).
    pub fn apply_network_variables(&mut self, var: impl Fn(&str) -> Option<String>) {
        let mut problems = Vec::new();
        let mut seconds = |name: &str, allow_zero: bool| -> Option<Duration> {
            let raw = var(name)?;
            let parsed = raw.trim().parse::<f64>().ok().filter(|s| {
                s.is_finite() && *s <= 86_400.0 && (*s > 0.0 || (allow_zero && *s == 0.0))
            });
            if parsed.is_none() {
                problems.push(format!(
                    "{name}={raw:?} is not a number of seconds (like 30 or 0.5){}",
                    if allow_zero { "" } else { " above 0" }
                ));
            }
            parsed.map(Duration::from_secs_f64)
        };
        if let Some(t) = seconds("FERRY_REGISTRY_TIMEOUT", false) {
            self.timeout = t;
        }
        if let Some(b) = seconds("FERRY_REGISTRY_BACKOFF", true) {
            self.retry.initial_delay = b;
        }
        if let Some(m) = seconds("FERRY_REGISTRY_MAX_RETRY_AFTER", true) {
            self.retry.max_retry_after = m;
        }
        if let Some(raw) = var("FERRY_REGISTRY_RETRIES") {
            match raw.trim().parse::<u32>() {
                Ok(n) if n <= 100 => self.retry.attempts = n + 1,
                _ => problems.push(format!(
                    "FERRY_REGISTRY_RETRIES={raw:?} is not a number of retries from 0 to 100"
                )),
            }
        }
        if !problems.is_empty() {
            self.settings_error = Some(problems.join("; "));
        }
    }

    /// Add the CAs of a docker-style certs directory: `DIR/<host[:port]>/*.crt`.
    pub fn add_certs_dir(&mut self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for host_dir in entries.flatten() {
            let Ok(files) = std::fs::read_dir(host_dir.path()) else {
                continue;
            };
            let host = host_dir.file_name().to_string_lossy().to_string();
            let mut cas: Vec<PathBuf> = files
                .flatten()
                .map(|f| f.path())
                .filter(|p| p.extension().is_some_and(|e| e == "crt"))
                .collect();
            cas.sort();
            for ca in cas {
                let h = self.host_mut(&host);
                if !h.ca_files.contains(&ca) {
                    h.ca_files.push(ca);
                }
            }
        }
    }

    /// What the CLI uses when no manifest says more: CAs from `$FERRY_CERTS_DIR`, else
    /// `$XDG_CONFIG_HOME/ferry/certs.d` (`~/.config/ferry/certs.d`), and `/etc/docker/certs.d`.
    /// Retries and timeouts from the `FERRY_REGISTRY_*` variables.
    pub fn from_environment() -> RegistryConfig {
        let mut c = RegistryConfig::default();
        c.apply_network_variables(|k| {
            std::env::var_os(k).filter(|v| !v.is_empty()).map(|v| v.to_string_lossy().into_owned())
        });
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(d) = var("FERRY_CERTS_DIR") {
            c.add_certs_dir(&d);
        } else if let Some(d) = var("XDG_CONFIG_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".config")))
            .map(|d| d.join("ferry/certs.d"))
        {
            c.add_certs_dir(&d);
        }
        c.add_certs_dir(Path::new("/etc/docker/certs.d"));
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_rules() {
        let mut c = RegistryConfig::default();
        assert!(c.allows_plain_http("127.0.0.1:5000"));
        assert!(!c.skips_tls_verification("127.0.0.1:5000"), "loopback TLS is verified");
        assert!(!c.allows_plain_http("registry.example.com"));
        assert!(!c.skips_tls_verification("registry.example.com"));
        c.host_mut("registry.example.com").insecure = true;
        assert!(c.allows_plain_http("registry.example.com"));
        assert!(c.skips_tls_verification("registry.example.com"));
        c.host_mut("127.0.0.1:5000").ca_files.push("/ca.pem".into());
        assert!(!c.allows_plain_http("127.0.0.1:5000"));
        c.host_mut("127.0.0.1:5000").insecure = true;
        assert!(!c.skips_tls_verification("127.0.0.1:5000"), "a CA means verify");
    }

    #[test]
    fn network_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let mut c = RegistryConfig::default();
        c.apply_network_variables(vars(&[
            ("FERRY_REGISTRY_TIMEOUT", "1.5"),
            ("FERRY_REGISTRY_RETRIES", "0"),
            ("FERRY_REGISTRY_BACKOFF", "0"),
            ("FERRY_REGISTRY_MAX_RETRY_AFTER", "2"),
        ]));
        assert_eq!(c.settings_error, None);
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!(c.retry.attempts, 1);
        assert_eq!(c.retry.initial_delay, Duration::ZERO);
        assert_eq!(c.retry.max_retry_after, Duration::from_secs(2));

        let mut c = RegistryConfig::default();
        c.apply_network_variables(vars(&[
            ("FERRY_REGISTRY_TIMEOUT", "0"),
            ("FERRY_REGISTRY_RETRIES", "many"),
        ]));
        let err = c.settings_error.unwrap();
        assert!(err.contains("FERRY_REGISTRY_TIMEOUT=\"0\""), "{err}");
        assert!(err.contains("FERRY_REGISTRY_RETRIES=\"many\""), "{err}");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT, "a bad value changes nothing");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(200));
        assert_eq!(p.backoff(2), Duration::from_millis(400));
        assert_eq!(p.backoff(40), p.max_delay);
    }

    #[test]
    fn certs_dir_layout() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("reg.example:5000")).unwrap();
        std::fs::write(d.path().join("reg.example:5000/ca.crt"), "x").unwrap();
        std::fs::write(d.path().join("reg.example:5000/client.key"), "x").unwrap();
        let mut c = RegistryConfig::default();
        c.add_certs_dir(d.path());
        assert_eq!(c.host("reg.example:5000").ca_files, [d.path().join("reg.example:5000/ca.crt")]);
    }
}
