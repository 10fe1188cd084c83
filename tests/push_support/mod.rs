//! Test harness for push and check: a real registry (`docker-registry serve`) on a free
//! loopback port, a counting and fault-injecting HTTP proxy in front of it, the example
//! fleet pointed at it, and skopeo as an independent reader.
//!
//! The registry comes from the shared harness (tests/common); the proxy here also counts
//! request bodies and can change its rule between commands, which upload counting needs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[path = "../fixture/mod.rs"]
pub mod fixture;

#[path = "../common/mod.rs"]
pub mod common;

/// A real registry on a free loopback port (plain HTTP, no auth), killed when dropped.
pub fn start_registry() -> common::TestRegistry {
    common::TestRegistry::start(common::RegistryOptions::default())
}

// ---------------------------------------------------------------------------------------
// Counting, fault-injecting proxy

/// What the proxy does with one request.
pub enum Action {
    Forward,
    /// Answer with this status without asking the registry.
    Respond(u16),
}

/// A request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Bytes of the request body.
    pub body: usize,
}

type Rule = dyn Fn(&str, &str) -> Action + Send + Sync;

/// An HTTP/1.1 proxy on a free loopback port in front of `upstream`, recording every
/// request and deciding per request (method, path) what to do.
pub struct Proxy {
    pub host: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    rule: Arc<Mutex<Arc<Rule>>>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rule: Arc<Mutex<Arc<Rule>>> =
            Arc::new(Mutex::new(Arc::new(|_: &str, _: &str| Action::Forward)));
        let count = Arc::new(AtomicUsize::new(0));
        {
            let (seen, rule, upstream) = (seen.clone(), rule.clone(), upstream.to_string());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (seen, rule, upstream, count) =
                        (seen.clone(), rule.clone(), upstream.clone(), count.clone());
                    std::thread::spawn(move || {
                        let r = rule.lock().unwrap().clone();
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = serve(conn, &upstream, &*r, &seen);
                    });
                }
            });
        }
        Proxy { host, seen, rule }
    }

    /// Replace the rule for the requests that follow.
    pub fn set_rule(&self, rule: impl Fn(&str, &str) -> Action + Send + Sync + 'static) {
        *self.rule.lock().unwrap() = Arc::new(rule);
    }

    /// Every request seen so far; clears the record.
    pub fn take(&self) -> Vec<SeenRequest> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn serve(
    mut client: TcpStream,
    upstream: &str,
    rule: &Rule,
    seen: &Mutex<Vec<SeenRequest>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
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
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    match rule(&method, &path) {
        Action::Respond(status) => {
            seen.lock().unwrap().push(SeenRequest { method, path, status, body: body.len() });
            let resp = format!(
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            );
            client.write_all(resp.as_bytes())
        }
        Action::Forward => {
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
            seen.lock().unwrap().push(SeenRequest {
                method: method.clone(),
                path,
                status,
                body: body.len(),
            });
            client.write_all(resp_head.as_bytes())?;
            if method != "HEAD" {
                std::io::copy(&mut up_reader, &mut client)?;
            }
            Ok(())
        }
    }
}

/// Body bytes sent in blob uploads (POST/PATCH/PUT under `/blobs/uploads/`).
pub fn upload_bytes(requests: &[SeenRequest]) -> usize {
    requests.iter().filter(|r| r.path.contains("/blobs/uploads/")).map(|r| r.body).sum()
}

/// Requests that write anything (POST, PUT, PATCH, DELETE).
pub fn writes(requests: &[SeenRequest]) -> Vec<&SeenRequest> {
    requests.iter().filter(|r| !matches!(r.method.as_str(), "GET" | "HEAD")).collect()
}

// ---------------------------------------------------------------------------------------
// The fleet and ferry

/// The top-level fleet (images.toml + examples/static) in a fresh git repository, with its
/// environments pointing at `host` and `extra` appended to images.toml.
pub fn fleet(host: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture::repo_root();
    let toml =
        std::fs::read_to_string(root.join("images.toml")).unwrap().replace("127.0.0.1:5000", host);
    std::fs::write(dir.path().join("images.toml"), format!("{toml}\n{extra}")).unwrap();
    fixture::copy_dir(&root.join("examples/static"), &dir.path().join("examples/static"));
    fixture::git_commit(dir.path(), "fleet");
    dir
}

/// `ferry` in `dir` with `store` and a clean, reproducible environment.
pub fn ferry(dir: &Path, store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.current_dir(dir)
        .arg("--store")
        .arg(store)
        .env_remove("FERRY_STORE")
        .env_remove("FERRY_LOG")
        .env_remove("GITHUB_RUN_NUMBER")
        .env_remove("CI_PIPELINE_IID")
        .env_remove("BUILD_NUMBER")
        .env_remove("GITHUB_HEAD_REF")
        .env_remove("GITHUB_REF_NAME")
        .env("FERRY_BUILD", "7")
        .env("SOURCE_DATE_EPOCH", "1767323045")
        .env("NO_COLOR", "1")
        .env("DOCKER_CONFIG", store.join("no-docker-config"))
        .env("FERRY_CERTS_DIR", store.join("no-certs"))
        .stdin(Stdio::null());
    c
}

pub fn run(dir: &Path, store: &Path, args: &[&str]) -> Output {
    ferry(dir, store).args(args).output().unwrap()
}

/// Run `ferry ARGS --json`, requiring exit `code`; the JSON document.
pub fn json(dir: &Path, store: &Path, args: &[&str], code: i32) -> serde_json::Value {
    let out = ferry(dir, store).arg("--json").args(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "ferry {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// stderr with miette's decoration undone: one line, single spaces.
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

/// `skopeo inspect` of `docker://REF` (plain HTTP).
pub fn skopeo_inspect(reference: &str) -> Option<serde_json::Value> {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// The manifest digest a tag points at, according to skopeo.
pub fn skopeo_digest(reference: &str) -> Option<String> {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Every tag of a repository (empty when it does not exist).
pub fn list_tags(repository: &str) -> Vec<String> {
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

/// Copy `docker://REF` into an OCI layout with skopeo, keeping digests; the digest of the
/// manifest the layout holds.
pub fn skopeo_copy_digest(reference: &str, layout: &Path) -> String {
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:img", layout.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy {reference}: {}", stderr(&out));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_string()
}

/// Write a one-layer OCI image (unrelated to the fleet) at `layout`, tag `img`.
pub fn foreign_image(layout: &Path) -> PathBuf {
    use sha2::Digest as _;
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)));
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(blobs.join(&d[7..]), b).unwrap();
        d
    };
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(8);
    h.set_mode(0o644);
    h.set_mtime(0);
    tar.append_data(&mut h, "foreign", &b"foreign\n"[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    let layer = put(&tar);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    }))
    .unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": tar.len()}],
    }))
    .unwrap();
    let md = put(&manifest);
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "img"}}]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    layout.to_path_buf()
}

/// Push an OCI layout's `img` to `docker://DEST` with skopeo, keeping digests.
pub fn skopeo_push(layout: &Path, dest: &str) {
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:img", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy to {dest}: {}", stderr(&out));
}
