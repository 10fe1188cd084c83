//! Registry settings of a project: images.toml `[registries."host"]` on top of what the
//! machine provides (docker-style certs directories). Shared by the commands that talk to
//! a project's registries (push, promote).

use ferry::manifest::Manifest;
use ferry::registry::RegistryConfig;

/// The registry settings for a command run inside a project.
pub fn registry_config(manifest: &Manifest) -> RegistryConfig {
    RegistryConfig::for_manifest(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry::diagnostic::SourceFile;

    #[test]
    fn manifest_settings_map_to_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
[project]
name = "acme"
[registries."reg.example:5000"]
insecure = true
mirrors = ["https://mirror.internal"]
ca_file = "certs/ca.pem"
"#;
        let m = Manifest::from_source(SourceFile::new("images.toml", text), dir.path()).unwrap();
        let c = registry_config(&m);
        let h = c.host("reg.example:5000");
        assert!(h.insecure);
        assert_eq!(h.mirrors, ["https://mirror.internal"]);
        assert_eq!(h.ca_files, [dir.path().join("certs/ca.pem")]);
        // A CA file means the host is verified, insecure or not.
        assert!(!c.allows_plain_http("reg.example:5000"));
        assert!(!c.host("other.example").insecure);
    }
}
