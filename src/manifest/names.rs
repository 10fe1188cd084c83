//! Repository and registry name rules, as the OCI distribution spec and docker define them.

use std::sync::LazyLock;

use regex::Regex;

pub const REPOSITORY_HELP: &str = "a repository is one or more '/'-separated parts of lowercase letters and digits, joined inside a part by '.', '_', '__' or dashes, e.g. \"acme/api\"";

static COMPONENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$").unwrap_or_else(|_| unreachable!())
});
static HOST: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$").unwrap_or_else(|_| unreachable!())
});

/// A repository path such as `acme/api`.
pub fn check_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() {
        return Err("it is empty".into());
    }
    if repo.len() > 255 {
        return Err("it is longer than 255 characters".into());
    }
    for part in repo.split('/') {
        if part.is_empty() {
            return Err("it has an empty part (a leading, trailing or double '/')".into());
        }
        if !COMPONENT.is_match(part) {
            return Err(format!(
                "part `{part}` is not lowercase letters and digits joined by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

/// A registry host with optional port: `registry.example.com`, `127.0.0.1:5000`, `[::1]:5000`.
pub fn check_registry_host(host: &str) -> Result<(), String> {
    if !HOST.is_match(host) {
        return Err("expected host[:port]".into());
    }
    if let Some((_, port)) = host.rsplit_once("]:").or_else(|| {
        if host.starts_with('[') {
            None
        } else {
            host.rsplit_once(':')
        }
    }) {
        if port.parse::<u16>().is_err() {
            return Err(format!("port `{port}` is not a number from 0 to 65535"));
        }
    }
    Ok(())
}

/// An environment's registry: host[:port] followed by an optional repository prefix.
pub fn check_registry_prefix(prefix: &str) -> Result<(), String> {
    let prefix = prefix.trim_end_matches('/');
    if prefix.contains("://") {
        return Err("write it without a scheme (no https://)".into());
    }
    let (host, path) = prefix.split_once('/').unwrap_or((prefix, ""));
    check_registry_host(host)?;
    if !host.contains(['.', ':', '[']) && host != "localhost" {
        return Err(format!(
            "`{host}` does not look like a registry host (no '.', no port, not localhost)"
        ));
    }
    if !path.is_empty() {
        check_repository(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories() {
        assert!(check_repository("acme/api").is_ok());
        assert!(check_repository("a.b_c__d-e--f/x").is_ok());
        assert!(check_repository("Acme/api").is_err());
        assert!(check_repository("acme//api").is_err());
        assert!(check_repository("acme/-api").is_err());
        assert!(check_repository("").is_err());
    }

    #[test]
    fn registries() {
        assert!(check_registry_prefix("127.0.0.1:5000/acme-dev").is_ok());
        assert!(check_registry_prefix("registry.example.com/acme").is_ok());
        assert!(check_registry_prefix("localhost:5000").is_ok());
        assert!(check_registry_prefix("[::1]:5000/x").is_ok());
        assert!(check_registry_prefix("https://registry.example.com").is_err());
        assert!(check_registry_prefix("acme/api").is_err());
        assert!(check_registry_prefix("host:99999").is_err());
        assert!(check_registry_prefix("registry.example.com/Acme").is_err());
    }
}
