//! TLS is verified by default, loopback included: a registry whose certificate comes from
//! an unknown CA is refused, by pull, push and promote alike, with a message that names
//! the problem, the registry and the two ways out (images.toml `ca_file`, `insecure = true`).
//! With either, the same commands work.

mod promote_support;
mod push_support;

// One copy of the shared harness: push_support's (promote_support reads it as crate::common).
use common::*;
use push_support::common;

/// The refusal of a certificate from an unknown CA, as `ferry` words it for `host`.
fn refusal(host: &str) -> String {
    refusal_because(host, "it is signed by an unknown certificate authority (issuer)")
}

fn refusal_because(host: &str, problem: &str) -> String {
    format!(
        "the TLS certificate of registry {host} is not trusted: {problem}. \
         To trust its CA, add `ca_file = \"ca.pem\"` (a PEM file, relative to images.toml) under `[registries.\"{host}\"]` in images.toml, \
         or copy it to `$FERRY_CERTS_DIR/{host}/ca.crt` (default ~/.config/ferry/certs.d); \
         to skip verification instead, on a network you trust, set `insecure = true` there"
    )
}

fn tls_registry_with_image(work: &std::path::Path) -> (TestRegistry, TestImage) {
    let reg = TestRegistry::start(RegistryOptions { tls: true, ..Default::default() });
    let layers = [vec![dir("etc"), file("etc/motd", b"secure\n", 0o644)]];
    let img = make_oci_image(&work.join("src"), "v1", &layers, Comp::Gzip);
    reg.push(&img.layout, "v1", "secure/app:v1");
    (reg, img)
}

/// A project directory whose images.toml has only `[project]` and `registries`.
fn project_with(registries: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("images.toml"),
        format!("[project]\nname = \"t\"\n\n{registries}"),
    )
    .unwrap();
    dir
}

fn pull_in(ferry: &Ferry, project: &std::path::Path, reference: &str) -> std::process::Output {
    ferry.command().arg("-C").arg(project).args(["pull", reference]).output().unwrap()
}

#[test]
fn an_unknown_certificate_authority_is_refused_with_the_ways_out() {
    let work = tempfile::tempdir().unwrap();
    let (reg, _) = tls_registry_with_image(work.path());
    let ferry = Ferry::new();
    let out = ferry.run(&["pull", &format!("{}/secure/app:v1", reg.host)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(err.contains(&refusal(&reg.host)), "{err}");
    // The verifier's own log line is not repeated at the default level.
    assert!(!stderr(&out).contains("rustls"), "{}", stderr(&out));
    ferry.assert_clean_after_failure();
}

#[test]
fn a_ca_file_in_images_toml_or_insecure_makes_the_pull_work() {
    let work = tempfile::tempdir().unwrap();
    let (reg, img) = tls_registry_with_image(work.path());
    let name = format!("{}/secure/app:v1", reg.host);

    // The CA, relative to images.toml.
    let with_ca =
        project_with(&format!("[registries.\"{}\"]\nca_file = \"certs/ca.pem\"\n", reg.host));
    std::fs::create_dir_all(with_ca.path().join("certs")).unwrap();
    std::fs::copy(reg.ca_cert.as_ref().unwrap(), with_ca.path().join("certs/ca.pem")).unwrap();
    let ferry = Ferry::new();
    let out = pull_in(&ferry, with_ca.path(), &name);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ferry.ok(&["inspect", &name]).contains(&img.manifest_digest));

    // Another CA (of the same name) in ca_file: still verified, still refused (insecure
    // does not override a CA).
    let other = tempfile::tempdir().unwrap();
    let wrong = make_certs(other.path());
    let with_wrong = project_with(&format!(
        "[registries.\"{}\"]\nca_file = \"ca.pem\"\ninsecure = true\n",
        reg.host
    ));
    std::fs::copy(&wrong.ca_cert, with_wrong.path().join("ca.pem")).unwrap();
    let refused = Ferry::new();
    let out = pull_in(&refused, with_wrong.path(), &name);
    assert_eq!(out.status.code(), Some(2));
    let problem = "its signature does not verify against the certificate authority it names";
    assert!(
        error_text(&out).contains(&refusal_because(&reg.host, problem)),
        "{}",
        error_text(&out)
    );
    refused.assert_clean_after_failure();

    // insecure = true: TLS without verification.
    let insecure = project_with(&format!("[registries.\"{}\"]\ninsecure = true\n", reg.host));
    let ferry = Ferry::new();
    let out = pull_in(&ferry, insecure.path(), &name);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ferry.ok(&["inspect", &name]).contains(&img.manifest_digest));
}

#[test]
fn push_and_promote_are_refused_the_same_way_and_work_with_the_ca() {
    let reg = TestRegistry::start(RegistryOptions { tls: true, ..Default::default() });
    let host = reg.host.clone();

    // push: the example fleet, its `[registries]` section (insecure) taken out.
    let fleet = push_support::fleet(&host, "");
    let toml_path = fleet.path().join("images.toml");
    let toml = std::fs::read_to_string(&toml_path).unwrap();
    let section = format!("[registries.\"{host}\"]\ninsecure = true\n");
    assert!(toml.contains(&section), "{toml}");
    std::fs::write(&toml_path, toml.replace(&section, "")).unwrap();
    let store = tempfile::tempdir().unwrap();
    let out = push_support::run(fleet.path(), store.path(), &["push", "--env", "dev"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(error_text(&out).contains(&refusal(&host)), "{}", error_text(&out));
    std::fs::copy(reg.ca_cert.as_ref().unwrap(), fleet.path().join("ca.pem")).unwrap();
    std::fs::write(
        &toml_path,
        toml.replace(&section, &format!("[registries.\"{host}\"]\nca_file = \"ca.pem\"\n")),
    )
    .unwrap();
    let report = push_support::json(fleet.path(), store.path(), &["push", "--env", "dev"], 0);
    assert_eq!(report["report"]["tags_moved"], 13, "{report}");

    // promote: staging has api 1.0.0; prod is in the same registry.
    let work = tempfile::tempdir().unwrap();
    let api = promote_support::publish(
        &reg,
        work.path(),
        "api",
        1,
        1,
        10_000,
        "acme-staging/acme/api:1.0.0-rc",
    );
    let envs = format!(
        "[environments.staging]\nregistry = \"{host}/acme-staging\"\ntags = [\"{{version}}-rc\"]\n\n\
         [environments.prod]\nregistry = \"{host}/acme-prod\"\ntags = [\"{{version}}\"]\n"
    );
    let project = promote_support::Project::new(&[("api", "1.0.0")], &envs);
    let out = project.run(&["promote", "--from", "staging", "--to", "prod"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(err.contains("image `api`") && err.contains(&refusal(&host)), "{err}");
    std::fs::copy(reg.ca_cert.as_ref().unwrap(), project.path().join("ca.pem")).unwrap();
    let toml = project.path().join("images.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(&format!("\n[registries.\"{host}\"]\nca_file = \"ca.pem\"\n"));
    std::fs::write(&toml, text).unwrap();
    let out = project.run(&["promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut ferry = Ferry::new();
    ferry.certs_dir = Some(reg.certs_dir());
    let pulled = ferry.ok(&["--json", "pull", &format!("{host}/acme-prod/acme/api:1.0.0")]);
    assert!(pulled.contains(&api), "prod's 1.0.0 is staging's digest: {pulled}");
}
