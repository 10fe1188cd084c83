//! Docker's `config.json`: reading credentials (`auths`, `credHelpers`, `credsStore`) and
//! writing them for `ferry login` the way `docker login` does.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use docker_credential::{CredentialRetrievalError, DockerCredential};

use super::RegistryError;
use crate::reference::{DEFAULT_REGISTRY, DOCKER_HUB_AUTH_KEY};

/// A secret string whose Debug and Display never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself; only for building an Authorization header or writing config.json.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Basic {
        username: String,
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken` in config.json).
    IdentityToken(Secret),
}

impl Credential {
    pub fn username(&self) -> Option<&str> {
        match self {
            Credential::Basic { username, .. } => Some(username),
            Credential::IdentityToken(_) => None,
        }
    }

    pub fn basic_header(&self) -> Option<String> {
        match self {
            Credential::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{}", password.expose()))
            )),
            Credential::IdentityToken(_) => None,
        }
    }
}

/// The key docker files a registry's credentials under.
pub fn auth_key(registry: &str) -> String {
    if registry == DEFAULT_REGISTRY
        || registry == "index.docker.io"
        || registry == "registry-1.docker.io"
    {
        DOCKER_HUB_AUTH_KEY.to_string()
    } else {
        registry.to_string()
    }
}

/// Where `login` put the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredIn {
    ConfigFile(PathBuf),
    Helper(String),
}

/// Docker's client configuration directory (`$DOCKER_CONFIG`, else `~/.docker`).
#[derive(Debug, Clone)]
pub struct DockerConfigFile {
    dir: PathBuf,
}

impl DockerConfigFile {
    pub fn new(dir: impl Into<PathBuf>) -> DockerConfigFile {
        DockerConfigFile { dir: dir.into() }
    }

    /// `dir` if given, else `$DOCKER_CONFIG`, else `~/.docker`; None without a home.
    pub fn locate(dir: Option<&Path>) -> Option<DockerConfigFile> {
        if let Some(d) = dir {
            return Some(DockerConfigFile::new(d));
        }
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        var("DOCKER_CONFIG")
            .or_else(|| var("HOME").map(|h| h.join(".docker")))
            .map(DockerConfigFile::new)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The credentials configured for `registry`, if any.
    pub fn credential(&self, registry: &str) -> Result<Option<Credential>, RegistryError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(RegistryError::Credentials {
                    registry: registry.to_string(),
                    reason: format!("cannot read {}: {e}", path.display()),
                })
            }
        };
        let key = auth_key(registry);
        match docker_credential::get_credential_from_reader(&bytes[..], &key) {
            Ok(DockerCredential::UsernamePassword(username, password)) => {
                Ok(Some(Credential::Basic { username, password: Secret(password) }))
            }
            Ok(DockerCredential::IdentityToken(t)) => {
                Ok(Some(Credential::IdentityToken(Secret(t))))
            }
            Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(None),
            Err(CredentialRetrievalError::HelperFailure { helper, stdout, .. }) => {
                // A helper that has nothing for this registry says so and exits 1.
                if stdout.contains("credentials not found") {
                    Ok(None)
                } else {
                    Err(RegistryError::Credentials {
                        registry: registry.to_string(),
                        reason: format!("credential helper {helper} failed"),
                    })
                }
            }
            Err(e) => Err(RegistryError::Credentials {
                registry: registry.to_string(),
                reason: format!("{} ({})", describe(&e), path.display()),
            }),
        }
    }

    /// Save credentials as `docker login` does: through `credHelpers[registry]` or
    /// `credsStore` when configured (leaving an empty `auths` entry, as docker does), else
    /// base64 in `auths`. Every other setting in the file is kept; the file is replaced
    /// atomically and readable by its owner only.
    pub fn store(
        &self,
        registry: &str,
        username: &str,
        secret: &Secret,
    ) -> Result<StoredIn, RegistryError> {
        let path = self.path();
        let err =
            |reason: String| RegistryError::Credentials { registry: registry.to_string(), reason };
        let mut doc: serde_json::Value = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| err(format!("{} is not valid JSON: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => return Err(err(format!("cannot read {}: {e}", path.display()))),
        };
        let obj = doc
            .as_object_mut()
            .ok_or_else(|| err(format!("{} is not a JSON object", path.display())))?;
        let key = auth_key(registry);
        let helper = obj
            .get("credHelpers")
            .and_then(|h| h.get(&key))
            .and_then(|h| h.as_str())
            .or_else(|| obj.get("credsStore").and_then(|s| s.as_str()))
            .filter(|h| !h.is_empty())
            .map(str::to_string);
        let auths = obj
            .entry("auths")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
            .ok_or_else(|| err(format!("\"auths\" in {} is not an object", path.display())))?;
        let stored = match &helper {
            Some(h) => {
                run_helper_store(h, &key, username, secret).map_err(err)?;
                auths.insert(key.clone(), serde_json::json!({}));
                StoredIn::Helper(format!("docker-credential-{h}"))
            }
            None => {
                let auth = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{}", secret.expose()));
                auths.insert(key.clone(), serde_json::json!({ "auth": auth }));
                StoredIn::ConfigFile(path.clone())
            }
        };
        let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| err(e.to_string()))?;
        write_private(&path, &bytes)
            .map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
        Ok(stored)
    }
}

fn describe(e: &CredentialRetrievalError) -> String {
    match e {
        CredentialRetrievalError::ConfigReadError | CredentialRetrievalError::ConfigNotFound => {
            "the docker config file cannot be read or is not valid JSON".to_string()
        }
        CredentialRetrievalError::CredentialDecodingError => {
            "an \"auth\" entry is not valid base64 of user:password".to_string()
        }
        CredentialRetrievalError::CredentialMismatchError => {
            "an \"auth\" entry disagrees with its username/password fields".to_string()
        }
        CredentialRetrievalError::HelperCommunicationError => {
            "the credential helper could not be run".to_string()
        }
        CredentialRetrievalError::MalformedHelperResponse => {
            "the credential helper's answer is malformed".to_string()
        }
        other => other.to_string(),
    }
}

fn run_helper_store(
    helper: &str,
    key: &str,
    username: &str,
    secret: &Secret,
) -> Result<(), String> {
    let program = format!("docker-credential-{helper}");
    crate::report::work::process_started();
    let mut child = Command::new(&program)
        .arg("store")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let body =
        serde_json::json!({"ServerURL": key, "Username": username, "Secret": secret.expose()});
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(body.to_string().as_bytes())
            .map_err(|e| format!("cannot talk to {program}: {e}"))?;
    }
    let status = child.wait().map_err(|e| format!("{program} failed: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} store failed ({status})"))
    }
}

/// Replace a file atomically with owner-only permissions.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // tempfile creates the file with mode 0600.
    let mut tmp = tempfile::Builder::new().prefix(".config.json.").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let c = Credential::Basic { username: "u".into(), password: Secret::new("hunter2") };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!Secret::new("hunter2").to_string().contains("hunter2"));
    }

    #[test]
    fn login_writes_auths_and_keeps_other_settings() {
        let d = tempfile::tempdir().unwrap();
        let cfg = DockerConfigFile::new(d.path());
        std::fs::write(
            cfg.path(),
            r#"{"auths":{"other.io":{"auth":"eDp5"}},"detachKeys":"ctrl-x"}"#,
        )
        .unwrap();
        let stored = cfg.store("127.0.0.1:5000", "alice", &Secret::new("s3cret")).unwrap();
        assert_eq!(stored, StoredIn::ConfigFile(cfg.path()));
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cfg.path()).unwrap()).unwrap();
        assert_eq!(v["detachKeys"], "ctrl-x");
        assert_eq!(v["auths"]["other.io"]["auth"], "eDp5");
        assert_eq!(v["auths"]["127.0.0.1:5000"]["auth"], "YWxpY2U6czNjcmV0");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(cfg.path()).unwrap().permissions().mode() & 0o777, 0o600);
        let c = cfg.credential("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!(
            c,
            Credential::Basic { username: "alice".into(), password: Secret::new("s3cret") }
        );
        assert_eq!(cfg.credential("nowhere.io").unwrap(), None);
    }

    #[test]
    fn docker_hub_uses_the_index_key() {
        let d = tempfile::tempdir().unwrap();
        let cfg = DockerConfigFile::new(d.path());
        cfg.store("docker.io", "bob", &Secret::new("pw")).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cfg.path()).unwrap()).unwrap();
        assert!(v["auths"]["https://index.docker.io/v1/"]["auth"].is_string());
        assert!(cfg.credential("docker.io").unwrap().is_some());
    }

    #[test]
    fn cred_helpers_are_used_for_get_and_store() {
        let d = tempfile::tempdir().unwrap();
        // A credential helper is a program on PATH; write a tiny one that keeps one secret
        // in a file.
        let bin = d.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let helper = bin.join("docker-credential-ferrytest");
        let db = d.path().join("db.json");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\ncase \"$1\" in\n store) cat > {db} ;;\n get) read server; if [ -f {db} ]; then cat {db}; else echo 'credentials not found in native keychain'; exit 1; fi ;;\nesac\n",
                db = db.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg_dir = d.path().join("docker");
        std::fs::create_dir_all(&cfg_dir).unwrap();
        let cfg = DockerConfigFile::new(&cfg_dir);
        std::fs::write(cfg.path(), r#"{"credHelpers":{"reg.example":"ferrytest"}}"#).unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        // PATH is process-wide; this is the only test in the crate that runs a helper.
        std::env::set_var("PATH", path);
        assert_eq!(cfg.credential("reg.example").unwrap(), None);
        let stored = cfg.store("reg.example", "carol", &Secret::new("pw")).unwrap();
        assert_eq!(stored, StoredIn::Helper("docker-credential-ferrytest".into()));
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cfg.path()).unwrap()).unwrap();
        assert_eq!(v["auths"]["reg.example"], serde_json::json!({}));
        assert_eq!(
            cfg.credential("reg.example").unwrap(),
            Some(Credential::Basic { username: "carol".into(), password: Secret::new("pw") })
        );
    }
}
