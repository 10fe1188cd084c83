//! Secrets never leave where they were given: a `--secret` value (from a file or the
//! environment), a registry password or token in docker's config.json, a password given to
//! `ferry login`. Each command runs at the highest verbosity (`-vvv`, `FERRY_LOG=trace`,
//! `RUST_LOG=trace`) with `--json`, against real parts (busybox RUN steps, the CNCF
//! registry with htpasswd), and then stdout, stderr, the JSON report and every file under
//! the store (layers decompressed) are searched for the secret: raw, base64 (as it travels
//! in `Authorization: Basic`), and as a sha256 hex digest (a cache key derived from the
//! value would leak it to a dictionary attack). Failing runs (a RUN step that fails, a wrong
//! password) are searched the same way.
//!
//! tests/build_run.rs `cache_mounts_persist_and_secrets_never_land_anywhere` checks a
//! secret file against the store's blobs at `-vv`; this file widens that to every channel
//! and every kind of secret.

mod common;

use common::fixture;

use std::io::Read;
use std::path::Path;

use base64::Engine;
use common::{Action, FaultProxy, RegistryOptions, RequestInfo, TestRegistry};
use fixture::{ferry, project, BUSYBOX_BASE};

const FILE_SECRET: &str = "file-secret-5b0d9e1c-do-not-leak";
const ENV_SECRET: &str = "env-secret-93a7f2-do-not-leak";
const ENV_VAR: &str = "FERRY_AUDIT_SECRET_VALUE";
const PASSWORD: &str = "registry-password-c4e1-do-not-leak";
const WRONG_PASSWORD: &str = "wrong-password-77aa-do-not-leak";
const USER: &str = "pusher";

/// The forms one secret may take on its way out.
struct Needles(Vec<(String, Vec<u8>)>);

impl Needles {
    fn new() -> Needles {
        Needles(Vec::new())
    }

    fn add(mut self, label: &str, value: &str) -> Needles {
        let b64 = base64::engine::general_purpose::STANDARD;
        self.0.push((label.to_string(), value.as_bytes().to_vec()));
        self.0.push((format!("{label} (base64)"), b64.encode(value).into_bytes()));
        self.0.push((format!("{label} (sha256)"), common::sha256(value.as_bytes())[7..].into()));
        self
    }

    /// A password, also as the `user:password` pair that Basic auth and config.json encode.
    fn add_password(self, label: &str, user: &str, password: &str) -> Needles {
        let pair = format!("{user}:{password}");
        self.add(label, password).add(&format!("{label} pair"), &pair)
    }

    fn found_in(&self, bytes: &[u8]) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, n)| bytes.windows(n.len()).any(|w| w == n.as_slice()))
            .map(|(l, _)| l.as_str())
            .collect()
    }

    fn check(&self, what: &str, bytes: &[u8]) {
        let found = self.found_in(bytes);
        assert!(found.is_empty(), "{what} holds {found:?}:\n{}", String::from_utf8_lossy(bytes));
    }

    /// Every file (and every name) under `root`; compressed files are searched
    /// decompressed too.
    fn check_tree(&self, root: &Path) -> usize {
        let mut files = 0;
        for e in walkdir::WalkDir::new(root) {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy();
            let found = self.found_in(name.as_bytes());
            assert!(found.is_empty(), "the name {} holds {found:?}", e.path().display());
            if !e.file_type().is_file() {
                continue;
            }
            files += 1;
            let bytes = std::fs::read(e.path()).unwrap();
            let found = self.found_in(&bytes);
            assert!(found.is_empty(), "{} holds {found:?}", e.path().display());
            if let Some(plain) = decompressed(&bytes) {
                let found = self.found_in(&plain);
                assert!(found.is_empty(), "{} (decompressed) holds {found:?}", e.path().display());
            }
        }
        files
    }
}

fn decompressed(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(bytes).ok()?.read_to_end(&mut out).ok()?;
    } else if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).ok()?;
    } else {
        return None;
    }
    Some(out)
}

/// One command's output.
struct Run {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Run {
    fn check(&self, needles: &Needles, what: &str) {
        needles.check(&format!("{what}: stdout"), &self.stdout);
        needles.check(&format!("{what}: stderr"), &self.stderr);
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{}", self.err()))
    }
}

/// `ferry -vvv --json ARGS` at trace level with `docker_config` as DOCKER_CONFIG.
fn loud(dir: &Path, store: &Path, docker_config: &Path, args: &[&str], stdin: &str) -> Run {
    let mut cmd = ferry(dir);
    cmd.arg("--store")
        .arg(store)
        .args(["-vvv", "--json"])
        .args(args)
        .env("FERRY_LOG", "trace")
        .env("RUST_LOG", "trace")
        .env("DOCKER_CONFIG", docker_config)
        .env("FERRY_CERTS_DIR", docker_config.join("no-certs"))
        .env(ENV_VAR, ENV_SECRET);
    let out = assert_cmd::Command::from(cmd).write_stdin(stdin).output().unwrap();
    Run { code: out.status.code(), stdout: out.stdout, stderr: out.stderr }
}

fn write_docker_config(dir: &Path, host: &str, entry: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({"auths": {host: entry}});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

fn basic_entry(user: &str, password: &str) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    serde_json::json!({"auth": b64.encode(format!("{user}:{password}"))})
}

/// A fleet of a busybox base and an image whose RUN reads two secrets (one from a file, one
/// from the environment) without printing them, or (`secrets` false) runs without any:
/// `ferry push` takes no `--secret`, and rebuilds a step whose secret is missing without it;
/// with a `dev` environment in `registry`.
fn fleet(registry: &str, secrets: bool) -> tempfile::TempDir {
    let toml = format!(
        "[project]\nname = \"acme\"\n\n[images.bb]\ncontext = \"bb\"\nversion = \"1.0.0\"\n\n\
         [images.app]\ncontext = \"app\"\nversion = \"1.0.0\"\n\n\
         [environments.dev]\nregistry = \"{registry}/acme-dev\"\ntags = [\"{{version}}\", \"dev\"]\n"
    );
    let dir = project(&[
        ("images.toml", &toml),
        ("bb/Dockerfile", BUSYBOX_BASE),
        (
            "app/Dockerfile",
            if secrets {
                "FROM bb\n\
                 RUN --mount=type=secret,id=filetok --mount=type=secret,id=envtok,target=/tmp/e \
                 wc -c < /run/secrets/filetok > /len-file && wc -c < /tmp/e > /len-env \
                 && env > /env-dump && ls -la /run/secrets > /listing\n"
            } else {
                "FROM bb\nRUN env > /env-dump\n"
            },
        ),
    ]);
    std::fs::write(dir.path().join("secret.txt"), FILE_SECRET).unwrap();
    fixture::git_commit(dir.path(), "fleet");
    dir
}

fn secret_args(dir: &Path) -> Vec<String> {
    vec![
        "--secret".into(),
        format!("id=filetok,src={}", dir.join("secret.txt").display()),
        "--secret".into(),
        format!("id=envtok,env={ENV_VAR}"),
    ]
}

fn build_secrets() -> Needles {
    Needles::new().add("file secret", FILE_SECRET).add("env secret", ENV_SECRET)
}

#[test]
fn build_secrets_reach_the_step_and_nothing_else() {
    let dir = fleet("127.0.0.1:1", true);
    let store = tempfile::tempdir().unwrap();
    let docker = tempfile::tempdir().unwrap();
    let needles = build_secrets();
    let args = secret_args(dir.path());
    let mut build: Vec<&str> = vec!["build"];
    build.extend(args.iter().map(String::as_str));

    let first = loud(dir.path(), store.path(), docker.path(), &build, "");
    assert_eq!(first.code, Some(0), "{}", first.err());
    first.check(&needles, "build");
    assert!(first.err().contains("TRACE"), "trace logging was not on:\n{}", first.err());
    let report = first.json();
    needles.check("the build report", report.to_string().as_bytes());

    // The step read both secrets (their lengths are in the image), the RUN's environment
    // did not get the variable the secret came from, and nothing stayed behind.
    let work = tempfile::tempdir().unwrap();
    let rootfs = fixture::umoci_unpack(store.path(), "app", work.path());
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("len-file").trim(), FILE_SECRET.len().to_string());
    assert_eq!(read("len-env").trim(), ENV_SECRET.len().to_string());
    assert!(read("listing").contains("filetok"));
    assert!(!read("env-dump").contains(ENV_VAR), "the RUN inherited ferry's environment");
    assert!(!rootfs.join("run/secrets/filetok").exists() && !rootfs.join("tmp/e").exists());
    needles.check_tree(&rootfs);
    let files = needles.check_tree(store.path());
    assert!(files > 10, "the store has only {files} files");

    // Other values: the step is cached, so no key depends on the value (nor its hash).
    std::fs::write(dir.path().join("secret.txt"), "another-value").unwrap();
    let second = loud(dir.path(), store.path(), docker.path(), &build, "");
    assert_eq!(second.code, Some(0), "{}", second.err());
    second.check(&needles, "rebuild");
    let app = second.json()["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "app")
        .cloned()
        .unwrap();
    assert!(
        app["steps"].as_array().unwrap().iter().all(|s| s["status"] == "cached"),
        "a changed secret value invalidated the cache: {app}"
    );
    std::fs::write(dir.path().join("secret.txt"), FILE_SECRET).unwrap();

    // A failing step with the secrets mounted: the error names the step, not the values.
    std::fs::write(
        dir.path().join("app/Dockerfile"),
        "FROM bb\nRUN --mount=type=secret,id=filetok --mount=type=secret,id=envtok \
         test -s /run/secrets/filetok && exit 3\n",
    )
    .unwrap();
    let failed = loud(dir.path(), store.path(), docker.path(), &build, "");
    assert_eq!(failed.code, Some(1), "{}", failed.err());
    assert!(failed.err().contains("app/Dockerfile:2"), "{}", failed.err());
    failed.check(&needles, "failed build");
    needles.check("the failed build's report", failed.json().to_string().as_bytes());
    needles.check_tree(store.path());
}

#[test]
fn registry_credentials_never_appear_in_a_push_a_login_or_their_failures() {
    let registry = TestRegistry::start(RegistryOptions {
        htpasswd: Some((USER.into(), PASSWORD.into())),
        tls: false,
    });
    let dir = fleet(&registry.host, false);
    let store = tempfile::tempdir().unwrap();
    let docker = tempfile::tempdir().unwrap();
    let needles = build_secrets().add_password("password", USER, PASSWORD).add_password(
        "wrong password",
        USER,
        WRONG_PASSWORD,
    );
    let args = secret_args(dir.path());
    let mut build: Vec<&str> = vec!["build"];
    build.extend(args.iter().map(String::as_str));
    let built = loud(dir.path(), store.path(), docker.path(), &build, "");
    assert_eq!(built.code, Some(0), "{}", built.err());

    // A wrong password in config.json: refused, and the error says so without it.
    write_docker_config(docker.path(), &registry.host, basic_entry(USER, WRONG_PASSWORD));
    let refused = loud(dir.path(), store.path(), docker.path(), &["push", "--env", "dev"], "");
    assert_eq!(refused.code, Some(2), "{}", refused.err());
    assert!(refused.err().contains(&registry.host), "{}", refused.err());
    refused.check(&needles, "push with a wrong password");
    assert!(refused.err().contains("refused the credentials of user"), "{}", refused.err());

    // `ferry login` with the wrong and then the right password on stdin.
    let login_args = ["login", "--username", USER, "--password-stdin", &registry.host];
    std::fs::remove_file(docker.path().join("config.json")).unwrap();
    let bad_login = loud(dir.path(), store.path(), docker.path(), &login_args, WRONG_PASSWORD);
    assert_eq!(bad_login.code, Some(2), "{}", bad_login.err());
    bad_login.check(&needles, "login with a wrong password");
    assert!(bad_login.err().contains("refused the credentials"), "{}", bad_login.err());
    assert!(!docker.path().join("config.json").exists(), "a refused login was stored");
    let login = loud(dir.path(), store.path(), docker.path(), &login_args, PASSWORD);
    assert_eq!(login.code, Some(0), "{}", login.err());
    login.check(&needles, "login");
    // config.json is where the password belongs (as docker keeps it): the needles find it
    // there, so their absence elsewhere means something.
    let stored = std::fs::read(docker.path().join("config.json")).unwrap();
    assert_eq!(needles.found_in(&stored), ["password pair (base64)"]);

    // The push, with the credentials login stored.
    let pushed = loud(dir.path(), store.path(), docker.path(), &["push", "--env", "dev"], "");
    assert_eq!(pushed.code, Some(0), "{}", pushed.err());
    assert!(pushed.err().contains("TRACE"), "trace logging was not on");
    pushed.check(&needles, "push");
    let report = pushed.json();
    needles.check("the push report", report.to_string().as_bytes());
    assert!(
        report["report"]["images"].as_array().unwrap().iter().all(|i| i["status"] == "published"),
        "{report}"
    );
    needles.check_tree(store.path());
    // And what reached the registry holds no build secret.
    let pulled = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("--src-creds={USER}:{PASSWORD}"))
        .arg(format!("docker://{}/acme-dev/acme/app:dev", registry.host))
        .arg(format!("oci:{}:app", pulled.path().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    build_secrets().check_tree(pulled.path());
}

/// A registry that wants bearer tokens, in front of a real registry: its token endpoint
/// hands out `ACCESS_TOKEN` to any refresh-token grant (a fake: the CNCF registry's token
/// auth needs a token server of its own), or refuses every grant.
fn bearer_gate(upstream: &str, refuse: bool) -> FaultProxy {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let me = listener.local_addr().unwrap().to_string();
    FaultProxy::start_with(listener, upstream, move |r: &RequestInfo| {
        if r.path.starts_with("/token") {
            // The identity token travels in a POST body (OAuth2 refresh grant), never in
            // the URL.
            if refuse || r.method != "POST" {
                return Action::Respond(401, vec![]);
            }
            let body = serde_json::json!({"access_token": ACCESS_TOKEN, "expires_in": 300});
            return Action::Body(
                body.to_string().into_bytes(),
                vec![("Content-Type".into(), "application/json".into())],
            );
        }
        if r.header("authorization") == Some(&format!("Bearer {ACCESS_TOKEN}")) {
            return Action::Forward;
        }
        let challenge = format!("Bearer realm=\"http://{me}/token\",service=\"gate\"");
        Action::Respond(401, vec![("WWW-Authenticate".into(), challenge)])
    })
}

const IDENTITY_TOKEN: &str = "identity-token-1f9e-do-not-leak";
const ACCESS_TOKEN: &str = "access-token-8d2c-do-not-leak";

#[test]
fn identity_and_access_tokens_never_appear() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let needles =
        build_secrets().add("identity token", IDENTITY_TOKEN).add("access token", ACCESS_TOKEN);
    for refuse in [true, false] {
        let gate = bearer_gate(&registry.host, refuse);
        let dir = fleet(&gate.host, false);
        let store = tempfile::tempdir().unwrap();
        let docker = tempfile::tempdir().unwrap();
        write_docker_config(
            docker.path(),
            &gate.host,
            serde_json::json!({"identitytoken": IDENTITY_TOKEN}),
        );
        let args = secret_args(dir.path());
        let mut build: Vec<&str> = vec!["build"];
        build.extend(args.iter().map(String::as_str));
        let built = loud(dir.path(), store.path(), docker.path(), &build, "");
        assert_eq!(built.code, Some(0), "{}", built.err());
        let push = loud(dir.path(), store.path(), docker.path(), &["push", "--env", "dev"], "");
        let what = if refuse { "push with a refused token" } else { "push with tokens" };
        assert_eq!(push.code, Some(if refuse { 2 } else { 0 }), "{what}: {}", push.err());
        push.check(&needles, what);
        if !refuse {
            needles.check(what, push.json().to_string().as_bytes());
        }
        needles.check_tree(store.path());
        if !refuse {
            assert!(
                gate.requests().iter().any(|r| r.method == "POST" && r.path.starts_with("/token")),
                "the identity token was not used: {:?}",
                gate.requests()
            );
        }
    }
}
