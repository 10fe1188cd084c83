//! Test harness shared by the integration tests: a real registry (`docker-registry serve`)
//! on a free loopback port with optional htpasswd auth and TLS, a fault-injecting HTTP
//! proxy to put in front of it (it also records and counts what crosses it), helpers to
//! make OCI images and push them with skopeo, independent readers of a registry (plain
//! HTTP, skopeo), and `Ferry`, the binary on a private store in the clean environment of
//! `fixture::ferry_command` (the fixtures come along as `common::fixture`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

#[path = "../fixture/mod.rs"]
pub mod fixture;

/// How to start a registry.
#[derive(Default, Clone)]
pub struct RegistryOptions {
    /// Require Basic auth with this user and password (htpasswd, bcrypt).
    pub htpasswd: Option<(String, String)>,
    /// Serve HTTPS with a certificate from a fresh test CA.
    pub tls: bool,
}

/// A running `docker-registry`, killed when dropped.
pub struct TestRegistry {
    /// `127.0.0.1:PORT`
    pub host: String,
    pub tls: bool,
    pub credentials: Option<(String, String)>,
    /// The test CA's certificate (TLS only).
    pub ca_cert: Option<PathBuf>,
    dir: tempfile::TempDir,
    child: Child,
}

impl TestRegistry {
    pub fn start(opts: RegistryOptions) -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        let mut ca_cert = None;
        if opts.tls {
            let certs = make_certs(dir.path());
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                certs.server_cert.display(),
                certs.server_key.display()
            ));
            ca_cert = Some(certs.ca_cert);
        }
        if let Some((user, pass)) = &opts.htpasswd {
            let hash = bcrypt::hash(pass, 5).unwrap();
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry must be installed (Debian package docker-registry)");
        let mut reg =
            TestRegistry { host, tls: opts.tls, credentials: opts.htpasswd, ca_cert, dir, child };
        reg.wait_ready();
        reg
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", self.log());
            }
            if TcpStream::connect(&self.host).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "docker-registry did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// A docker-style certs directory (`<dir>/<host>/ca.crt`) trusting the test CA, for
    /// `FERRY_CERTS_DIR`.
    pub fn certs_dir(&self) -> PathBuf {
        let d = self.dir.path().join("certs.d");
        let host_dir = d.join(&self.host);
        std::fs::create_dir_all(&host_dir).unwrap();
        if let Some(ca) = &self.ca_cert {
            std::fs::copy(ca, host_dir.join("ca.crt")).unwrap();
        }
        d
    }

    /// Push an OCI layout's image (tag `src_tag`) to `repo:tag` with skopeo, keeping digests.
    pub fn push(&self, layout: &Path, src_tag: &str, dest: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--preserve-digests", "-q"]);
        if self.tls {
            let certs = self.dir.path().join("skopeo-certs");
            std::fs::create_dir_all(&certs).unwrap();
            std::fs::copy(self.ca_cert.as_ref().unwrap(), certs.join("ca.crt")).unwrap();
            cmd.arg("--dest-cert-dir").arg(certs);
        } else {
            cmd.arg("--dest-tls-verify=false");
        }
        if let Some((u, p)) = &self.credentials {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        cmd.arg(format!("oci:{}:{src_tag}", layout.display()));
        cmd.arg(format!("docker://{}/{dest}", self.host));
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}\nregistry log: {}",
            stderr(&out),
            self.log()
        );
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Certs {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// A test CA and a server certificate for 127.0.0.1 / localhost, made with openssl.
pub fn make_certs(dir: &Path) -> Certs {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=ferry test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    Certs {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// stderr with miette's wrapping undone: one line per diagnostic, single spaces.
pub fn error_text(o: &Output) -> String {
    let raw = String::from_utf8_lossy(&o.stderr);
    let mut out = String::new();
    for line in raw.lines() {
        let t = line.trim_start().trim_start_matches(['│', '×', '╰', '─', '▶']).trim();
        if !t.is_empty() {
            out.push_str(t);
            out.push(' ');
        }
    }
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

// ---------------------------------------------------------------------------------------
// Images

/// A file of a test layer.
#[derive(Clone)]
pub enum Entry {
    File {
        path: String,
        content: Vec<u8>,
        mode: u32,
    },
    Dir {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// An OCI whiteout: deletes `path` from the layers below.
    Whiteout {
        path: String,
    },
}

pub fn file(path: &str, content: &[u8], mode: u32) -> Entry {
    Entry::File { path: path.into(), content: content.to_vec(), mode }
}
pub fn dir(path: &str) -> Entry {
    Entry::Dir { path: path.into(), mode: 0o755 }
}
pub fn symlink(path: &str, target: &str) -> Entry {
    Entry::Symlink { path: path.into(), target: target.into() }
}
pub fn whiteout(path: &str) -> Entry {
    Entry::Whiteout { path: path.into() }
}

/// Incompressible bytes, deterministic per seed (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::File { path, content, mode } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(content.len() as u64);
                b.append_data(&mut h, path, &content[..]).unwrap();
            }
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty()).unwrap();
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
            Entry::Whiteout { path } => {
                let (parent, name) = match path.rsplit_once('/') {
                    Some((p, n)) => (format!("{p}/"), n.to_string()),
                    None => (String::new(), path.clone()),
                };
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_data(&mut h, format!("{parent}.wh.{name}"), std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Comp {
    Gzip,
    Zstd,
    None,
}

/// A test image written as an OCI layout.
pub struct TestImage {
    pub layout: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
}

/// Write an OCI layout at `layout` holding one image made of `layers` (tag `tag`), with a
/// history entry per layer plus one empty step.
pub fn make_oci_image(layout: &Path, tag: &str, layers: &[Vec<Entry>], comp: Comp) -> TestImage {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let d = sha256(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut history = Vec::new();
    let mut layer_digests = Vec::new();
    for (i, entries) in layers.iter().enumerate() {
        let tar = layer_tar(entries);
        diff_ids.push(sha256(&tar));
        let (blob, mt) = match comp {
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&tar).unwrap();
                (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
            }
            Comp::Zstd => (
                zstd::encode_all(&tar[..], 1).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            Comp::None => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
        };
        let d = put(&blob);
        layer_digests.push(d.clone());
        layer_descs.push(serde_json::json!({"mediaType": mt, "digest": d, "size": blob.len()}));
        history.push(serde_json::json!({
            "created": "2024-01-01T00:00:00Z",
            "created_by": format!("COPY layer{i} / # buildkit"),
        }));
    }
    history.push(serde_json::json!({
        "created": "2024-01-01T00:00:00Z",
        "created_by": "CMD [\"/bin/sh\"]",
        "empty_layer": true,
    }));
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/", "Labels": {"test": "yes"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = put(&config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": layer_descs,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put(&manifest_bytes);
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    TestImage {
        layout: layout.to_path_buf(),
        tag: tag.into(),
        manifest_digest,
        config_digest,
        layer_digests,
    }
}

/// What a tree holds: relative path → kind, mode and content (or link target).
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().to_string();
        let meta = e.path().symlink_metadata().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        let v = if meta.file_type().is_symlink() {
            format!("link -> {}", std::fs::read_link(e.path()).unwrap().display())
        } else if meta.is_dir() {
            format!("dir {mode:o}")
        } else {
            format!("file {mode:o} {}", sha256(&std::fs::read(e.path()).unwrap()))
        };
        out.insert(rel, v);
    }
    out
}

/// Apply layers to a directory the way a runtime would (whiteouts delete): the tree the
/// image should unpack to.
pub fn expected_tree(layers: &[Vec<Entry>]) -> BTreeMap<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for entries in layers {
        for e in entries {
            match e {
                Entry::File { path, content, mode } => {
                    let p = root.join(path);
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::fs::write(&p, content).unwrap();
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
                }
                Entry::Dir { path, mode } => {
                    let p = root.join(path);
                    std::fs::create_dir_all(&p).unwrap();
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
                }
                Entry::Symlink { path, target } => {
                    let p = root.join(path);
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::os::unix::fs::symlink(target, &p).unwrap();
                }
                Entry::Whiteout { path } => {
                    let p = root.join(path);
                    if p.is_dir() {
                        std::fs::remove_dir_all(&p).unwrap();
                    } else {
                        std::fs::remove_file(&p).unwrap();
                    }
                }
            }
        }
    }
    tree(root)
}

// ---------------------------------------------------------------------------------------
// ferry

/// The ferry binary with a private store and docker config.
pub struct Ferry {
    pub store: PathBuf,
    pub docker_config: PathBuf,
    pub certs_dir: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Ferry {
    pub fn new() -> Ferry {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let docker_config = dir.path().join("docker");
        std::fs::create_dir_all(&docker_config).unwrap();
        Ferry { store, docker_config, certs_dir: None, _dir: dir }
    }

    /// `fixture::ferry_command()` on this store and docker config, trusting `certs_dir`'s
    /// CAs when set (no extra CA otherwise).
    pub fn command(&self) -> Command {
        let mut c = fixture::ferry_command();
        c.arg("--store").arg(&self.store);
        c.env("DOCKER_CONFIG", &self.docker_config);
        if let Some(d) = &self.certs_dir {
            c.env("FERRY_CERTS_DIR", d);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Run and require success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "ferry {args:?} failed ({}): {}", out.status, stderr(&out));
        stdout(&out)
    }

    pub fn index(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.store.join("index.json")).unwrap()).unwrap()
    }

    /// After a failed pull: no ref, no temp file, and `cache verify` finds every blob whole.
    pub fn assert_clean_after_failure(&self) {
        assert!(self.index()["manifests"].as_array().unwrap().is_empty(), "a ref was recorded");
        let tmp = self.store.join("tmp");
        if tmp.exists() {
            assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0, "a temp file was left");
        }
        self.ok(&["cache", "verify"]);
    }

    /// Write docker's config.json with Basic credentials for `host`.
    pub fn docker_login_file(&self, host: &str, user: &str, pass: &str) {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        let cfg = serde_json::json!({"auths": {host: {"auth": auth}}});
        std::fs::write(self.docker_config.join("config.json"), cfg.to_string()).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Fault-injecting proxy

/// What the proxy does with one request.
pub enum Action {
    Forward,
    /// Answer with this status (and headers) without asking the registry.
    Respond(u16, Vec<(String, String)>),
    /// Answer 200 with this body (and headers) instead of the registry's.
    Body(Vec<u8>, Vec<(String, String)>),
    /// Forward, but after this many body bytes of the response, signal the test and hang
    /// until the proxy is dropped.
    Stall(usize),
    /// Wait this long, then forward (whether or not the client is still there, as a slow
    /// network would).
    Delay(Duration),
    /// Forward, but close the connection after this many body bytes of the response.
    CutResponse(usize),
    /// Read this many bytes of the request body, then close the connection unanswered;
    /// the registry never sees the request.
    CutRequest(usize),
    /// Forward, then hand the registry's whole answer to this function and send what it
    /// returns (Content-Length is set to the new body's length).
    Rewrite(Box<dyn FnOnce(Answer) -> Answer + Send>),
}

/// A registry's answer, for `Action::Rewrite`.
pub struct Answer {
    pub status: u16,
    /// As received, names in their original case (minus Content-Length and
    /// Transfer-Encoding, which the proxy sets).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn set_header(&mut self, name: &str, value: &str) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value.to_string()));
    }
}

/// A request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// The registry's status, or the one the rule injected (0: the request was cut off).
    pub status: u16,
    /// Bytes of the request body the proxy received.
    pub body: usize,
}

/// Body bytes sent in blob uploads (POST/PATCH/PUT under `/blobs/uploads/`).
pub fn upload_bytes(requests: &[SeenRequest]) -> usize {
    requests.iter().filter(|r| r.path.contains("/blobs/uploads/")).map(|r| r.body).sum()
}

/// Requests that write anything (POST, PUT, PATCH, DELETE).
pub fn writes(requests: &[SeenRequest]) -> Vec<&SeenRequest> {
    requests.iter().filter(|r| !matches!(r.method.as_str(), "GET" | "HEAD")).collect()
}

/// A request as a rule sees it.
pub struct RequestInfo {
    pub method: String,
    pub path: String,
    /// 1-based number of the request.
    pub n: usize,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
}

impl RequestInfo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

type Rule = dyn Fn(&RequestInfo) -> Action + Send + Sync;

/// An HTTP/1.1 proxy on a free loopback port in front of `upstream`, recording every
/// request and deciding per request (method, path, 1-based request number, headers) what
/// to do.
pub struct FaultProxy {
    pub host: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    /// The rule in force; `set_rule` swaps it between commands.
    rule: Arc<Mutex<Arc<Rule>>>,
    /// Receives the path of a stalled response once it stalls.
    pub stalled: mpsc::Receiver<String>,
    release: Arc<(Mutex<bool>, Condvar)>,
}

impl FaultProxy {
    pub fn start(
        upstream: &str,
        rule: impl Fn(&str, &str, usize) -> Action + Send + Sync + 'static,
    ) -> FaultProxy {
        FaultProxy::start_with(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            upstream,
            move |r: &RequestInfo| rule(&r.method, &r.path, r.n),
        )
    }

    /// A proxy that forwards everything (until `set_rule`), to count what goes through.
    pub fn forwarding(upstream: &str) -> FaultProxy {
        FaultProxy::start(upstream, |_, _, _| Action::Forward)
    }

    /// In front of `reg` on a free port, with a rule that sees headers.
    pub fn in_front_of(
        reg: &TestRegistry,
        rule: impl Fn(&RequestInfo) -> Action + Send + Sync + 'static,
    ) -> FaultProxy {
        FaultProxy::start_with(TcpListener::bind("127.0.0.1:0").unwrap(), &reg.host, rule)
    }

    /// Like `start`, on a listener the caller bound (to know the address first), with a
    /// rule that sees headers.
    pub fn start_with(
        listener: TcpListener,
        upstream: &str,
        rule: impl Fn(&RequestInfo) -> Action + Send + Sync + 'static,
    ) -> FaultProxy {
        let host = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let rule: Arc<Mutex<Arc<Rule>>> = Arc::new(Mutex::new(Arc::new(rule)));
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let upstream = upstream.to_string();
        {
            let (seen, rule, release) = (seen.clone(), rule.clone(), release.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (seen, count, rule, release, tx, upstream) = (
                        seen.clone(),
                        count.clone(),
                        rule.clone(),
                        release.clone(),
                        tx.clone(),
                        upstream.clone(),
                    );
                    std::thread::spawn(move || {
                        let _ = serve(conn, &upstream, &rule, &count, &seen, &release, &tx);
                    });
                }
            });
        }
        FaultProxy { host, seen, rule, stalled: rx, release }
    }

    /// Replace the rule for the requests that follow (request numbers keep counting).
    pub fn set_rule(&self, rule: impl Fn(&RequestInfo) -> Action + Send + Sync + 'static) {
        *self.rule.lock().unwrap() = Arc::new(rule);
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Every request seen since the last `take`; clears the record.
    pub fn take(&self) -> Vec<SeenRequest> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let (m, c) = &*self.release;
        *m.lock().unwrap() = true;
        c.notify_all();
    }
}

fn serve(
    mut client: TcpStream,
    upstream: &str,
    rule: &Mutex<Arc<Rule>>,
    count: &AtomicUsize,
    seen: &Mutex<Vec<SeenRequest>>,
    release: &(Mutex<bool>, Condvar),
    stalled: &mpsc::Sender<String>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    // One request per connection: every answer closes it.
    // A TLS ClientHello (ferry probing HTTPS on a loopback host): not HTTP, hang up.
    let first = reader.fill_buf()?;
    if first.is_empty() || first[0] == 0x16 {
        return Ok(());
    }
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut content_length = 0usize;
    let mut headers = Vec::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_string();
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if k.eq_ignore_ascii_case("connection") {
                continue;
            }
            headers.push((k, v.trim().to_string()));
        }
    }
    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
    let info = RequestInfo {
        method: method.clone(),
        path: path.clone(),
        n,
        headers: headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect(),
    };
    let rule = rule.lock().unwrap().clone();
    let action = rule(&info);
    let record = |status: u16, body: usize| {
        let (method, path) = (method.clone(), path.clone());
        seen.lock().unwrap().push(SeenRequest { method, path, status, body });
    };
    if let Action::CutRequest(keep) = action {
        let mut part = vec![0u8; keep.min(content_length)];
        reader.read_exact(&mut part)?;
        record(0, part.len());
        return client.shutdown(std::net::Shutdown::Both);
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let action = match action {
        Action::Delay(d) => {
            std::thread::sleep(d);
            Action::Forward
        }
        other => other,
    };
    match action {
        Action::Respond(status, extra) => {
            record(status, body.len());
            let mut resp =
                format!("HTTP/1.1 {status} Injected\r\nContent-Length: 0\r\nConnection: close\r\n");
            for (k, v) in extra {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str("\r\n");
            client.write_all(resp.as_bytes())?;
            Ok(())
        }
        Action::Body(bytes, extra) => {
            record(200, body.len());
            let mut resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n",
                bytes.len()
            );
            for (k, v) in extra {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str("\r\n");
            client.write_all(resp.as_bytes())?;
            client.write_all(&bytes)?;
            Ok(())
        }
        action => {
            let mut up = TcpStream::connect(upstream)?;
            let mut req = format!("{request_line}\r\n");
            for (k, v) in &headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("Connection: close\r\n\r\n");
            up.write_all(req.as_bytes())?;
            up.write_all(&body)?;
            let mut up_reader = BufReader::new(up);
            let mut resp_head = String::new();
            loop {
                let mut line = String::new();
                if up_reader.read_line(&mut line)? == 0 {
                    break;
                }
                resp_head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let status = resp_head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            record(status, body.len());
            if !matches!(action, Action::Rewrite(_)) {
                client.write_all(resp_head.as_bytes())?;
                if method == "HEAD" {
                    return Ok(());
                }
            }
            match action {
                Action::CutResponse(after) => {
                    let mut part = Vec::new();
                    (&mut up_reader).take(after as u64).read_to_end(&mut part)?;
                    client.write_all(&part)?;
                    client.flush()?;
                    client.shutdown(std::net::Shutdown::Both)
                }
                Action::Rewrite(f) => {
                    let mut body = Vec::new();
                    up_reader.read_to_end(&mut body)?;
                    let mut answer = Answer { status, headers: Vec::new(), body };
                    let mut chunked = false;
                    for l in resp_head.lines().skip(1) {
                        if let Some((k, v)) = l.split_once(':') {
                            let (k, v) = (k.trim(), v.trim());
                            if k.eq_ignore_ascii_case("transfer-encoding") {
                                chunked = v.eq_ignore_ascii_case("chunked");
                            } else if !k.eq_ignore_ascii_case("content-length")
                                && !k.eq_ignore_ascii_case("connection")
                            {
                                answer.headers.push((k.to_string(), v.to_string()));
                            }
                        }
                    }
                    if chunked {
                        answer.body = dechunk(&answer.body);
                    }
                    let answer = f(answer);
                    // The registry's head was held back for this: send the rewritten one.
                    let mut out = format!(
                        "HTTP/1.1 {} Rewritten\r\nContent-Length: {}\r\nConnection: close\r\n",
                        answer.status,
                        answer.body.len()
                    );
                    for (k, v) in &answer.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    client.write_all(out.as_bytes())?;
                    client.write_all(&answer.body)
                }
                Action::Stall(after) => {
                    let mut part = vec![0u8; after];
                    up_reader.read_exact(&mut part)?;
                    client.write_all(&part)?;
                    client.flush()?;
                    let _ = stalled.send(path.clone());
                    let (m, c) = release;
                    let mut released = m.lock().unwrap();
                    while !*released {
                        released = c.wait(released).unwrap();
                    }
                    Ok(())
                }
                _ => {
                    std::io::copy(&mut up_reader, &mut client)?;
                    Ok(())
                }
            }
        }
    }
}

/// The body of a chunked transfer-encoded response.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else { return out };
        let size_text = String::from_utf8_lossy(&raw[..eol]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        raw = &raw[eol + 2..];
        if size == 0 || raw.len() < size {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or_default();
    }
}

// ---------------------------------------------------------------------------------------
// Reading a registry directly (not through a proxy), to judge what ferry left in it

/// One plain-HTTP request to `host` (Connection: close): status, headers (names
/// lowercased) and body.
pub fn http_request(
    host: &str,
    method: &str,
    path: &str,
    accept: Option<&str>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut conn = TcpStream::connect(host).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(a) = accept {
        req.push_str(&format!("Accept: {a}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer") + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(&raw[end..]) } else { raw[end..].to_vec() };
    (status, headers, body)
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Every tag of every repository in the registry at `host` (asked directly, plain HTTP)
/// names a complete image: the manifest's bytes match its digest, every child manifest and
/// every blob it refers to is there with the size it says. Returns the tags checked, as
/// `repository:tag -> digest`.
pub fn assert_every_tag_complete(host: &str) -> BTreeMap<String, String> {
    let (status, _, body) = http_request(host, "GET", "/v2/_catalog?n=1000", None);
    assert_eq!(status, 200, "catalog of {host}");
    let catalog: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut checked = BTreeMap::new();
    for repo in catalog["repositories"].as_array().into_iter().flatten() {
        let repo = repo.as_str().unwrap();
        let (status, _, body) = http_request(host, "GET", &format!("/v2/{repo}/tags/list"), None);
        if status == 404 {
            continue;
        }
        assert_eq!(status, 200, "tags of {repo}");
        let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for tag in list["tags"].as_array().into_iter().flatten() {
            let tag = tag.as_str().unwrap();
            let digest = assert_manifest_complete(host, repo, tag);
            checked.insert(format!("{repo}:{tag}"), digest);
        }
    }
    checked
}

/// The manifest `repo:reference` and everything it refers to are in the registry; its digest.
pub fn assert_manifest_complete(host: &str, repo: &str, reference: &str) -> String {
    let (status, headers, body) = http_request(
        host,
        "GET",
        &format!("/v2/{repo}/manifests/{reference}"),
        Some(MANIFEST_TYPES),
    );
    assert_eq!(status, 200, "{repo}:{reference} is not readable");
    let digest = sha256(&body);
    let header = headers.iter().find(|(k, _)| k == "docker-content-digest").map(|(_, v)| v);
    assert_eq!(header, Some(&digest), "{repo}:{reference}: bytes and digest disagree");
    if reference.starts_with("sha256:") {
        assert_eq!(reference, digest, "{repo}@{reference} holds other bytes");
    }
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    if let Some(children) = m["manifests"].as_array() {
        for child in children {
            assert_manifest_complete(host, repo, child["digest"].as_str().unwrap());
        }
        return digest;
    }
    let blobs = std::iter::once(&m["config"]).chain(m["layers"].as_array().into_iter().flatten());
    for blob in blobs {
        let d = blob["digest"].as_str().unwrap();
        let (status, headers, _) =
            http_request(host, "HEAD", &format!("/v2/{repo}/blobs/{d}"), None);
        assert_eq!(status, 200, "{repo}:{reference} names blob {d}, which is missing");
        let len = headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.as_str());
        assert_eq!(
            len.and_then(|l| l.parse::<u64>().ok()),
            blob["size"].as_u64(),
            "{repo}:{reference}: blob {d} has another size"
        );
    }
    digest
}

// ---------------------------------------------------------------------------------------
// Reading a registry with skopeo, an independent client (plain HTTP)

/// The manifest `docker://REF` names, byte for byte as skopeo reads it; None when skopeo
/// cannot read it.
pub fn skopeo_manifest(reference: &str) -> Option<Vec<u8>> {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

/// `skopeo inspect --raw` of `docker://REF`, parsed.
pub fn skopeo_inspect(reference: &str) -> Option<serde_json::Value> {
    skopeo_manifest(reference).map(|raw| serde_json::from_slice(&raw).unwrap())
}

/// The digest of the manifest a reference names, computed from the bytes skopeo reads.
pub fn skopeo_digest(reference: &str) -> Option<String> {
    skopeo_manifest(reference).map(|raw| sha256(&raw))
}

/// Every tag of `host/path`, sorted (empty when skopeo cannot list it: no such repository).
pub fn skopeo_tags(repository: &str) -> Vec<String> {
    let out = Command::new("skopeo")
        .args(["list-tags", "--tls-verify=false"])
        .arg(format!("docker://{repository}"))
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut tags: Vec<String> = v["Tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    tags.sort();
    tags
}

/// A registry's rate limit, as a rule can apply it: the first request with a given key is
/// answered 429 with `Retry-After: 1`; a request with that key before the second is over
/// is answered 429 again and counted as premature (the client did not honour the header).
#[derive(Default)]
pub struct RateLimit {
    windows: Mutex<BTreeMap<String, (Instant, usize)>>,
}

impl RateLimit {
    /// The action for a request with `key` (None: not limited).
    pub fn check(&self, key: Option<String>) -> Action {
        let Some(key) = key else { return Action::Forward };
        let mut w = self.windows.lock().unwrap();
        let now = Instant::now();
        match w.get_mut(&key) {
            None => {
                w.insert(key, (now + Duration::from_secs(1), 0));
                Action::Respond(429, vec![("Retry-After".into(), "1".into())])
            }
            Some((until, premature)) if now < *until => {
                *premature += 1;
                Action::Respond(429, vec![("Retry-After".into(), "1".into())])
            }
            Some(_) => Action::Forward,
        }
    }

    /// The keys that were limited, with how many requests came too early for each.
    pub fn report(&self) -> BTreeMap<String, usize> {
        self.windows.lock().unwrap().iter().map(|(k, (_, p))| (k.clone(), *p)).collect()
    }
}
