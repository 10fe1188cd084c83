//! Per-registry settings: plain HTTP, mirrors, extra CA. The lead fills this from
//! images.toml `[registries."host"]`; the CLI adds docker-style `certs.d` directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::reference::is_loopback_registry;

/// Settings of one registry host (`host[:port]`, as in image references).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryHostConfig {
    /// Allow plain HTTP and unverified TLS (always allowed on loopback, as docker does).
    pub insecure: bool,
    /// Pull-through mirrors tried in order before the registry itself, for pulls only.
    /// Each is a URL base (`https://mirror.internal`, `http://10.0.0.5:5000`) or a host.
    pub mirrors: Vec<String>,
    /// PEM files of CAs trusted for this host, in addition to the system's.
    pub ca_files: Vec<PathBuf>,
}

/// Settings of every registry ferry talks to, by host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    pub hosts: BTreeMap<String, RegistryHostConfig>,
    /// Where docker's `config.json` is read and `login` writes (default `$DOCKER_CONFIG`,
    /// else `~/.docker`).
    pub docker_config_dir: Option<PathBuf>,
}

impl RegistryConfig {
    pub fn host(&self, host: &str) -> RegistryHostConfig {
        self.hosts.get(host).cloned().unwrap_or_default()
    }

    pub fn host_mut(&mut self, host: &str) -> &mut RegistryHostConfig {
        self.hosts.entry(host.to_string()).or_default()
    }

    /// Whether plain HTTP / unverified TLS may be used for `host`. A host with its own CA
    /// is always verified.
    pub fn allows_insecure(&self, host: &str) -> bool {
        let h = self.host(host);
        h.ca_files.is_empty() && (h.insecure || is_loopback_registry(host))
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
    pub fn from_environment() -> RegistryConfig {
        let mut c = RegistryConfig::default();
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
        assert!(c.allows_insecure("127.0.0.1:5000"));
        assert!(!c.allows_insecure("registry.example.com"));
        c.host_mut("registry.example.com").insecure = true;
        assert!(c.allows_insecure("registry.example.com"));
        c.host_mut("127.0.0.1:5000").ca_files.push("/ca.pem".into());
        assert!(!c.allows_insecure("127.0.0.1:5000"));
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
