//! Helpers of the crash and concurrency tests: start ferry in its own process group and
//! SIGKILL the whole group after a delay, check that nothing of the group (nor a RUN
//! process in its sandbox) outlives it, and independent checks of a store and a registry:
//! every name points at a complete, hash-correct image, nothing a later run trusts is
//! wrong, and no temporary file of a dead process is left behind.
//!
//! Needs `mod push_support;` next to it in the test crate (for the registry and fleet).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn sha256_reader(mut r: impl Read) -> String {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

// ---------------------------------------------------------------------------------------
// Fleets

/// A fleet whose base image carries a few MiB of incompressible data, so that blob writes,
/// compression and uploads last long enough for kills to land inside them.
pub fn heavy_fleet(host: &str, extra: &str) -> tempfile::TempDir {
    let dir = crate::push_support::fleet(host, extra);
    let data = dir.path().join("examples/static/images/base/rootfs/opt/data.bin");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    std::fs::write(&data, crate::push_support::common::noise(6 << 20, 7)).unwrap();
    crate::push_support::fixture::git_commit(dir.path(), "data");
    dir
}

/// A fleet of RUN steps in the real sandbox: a busybox base and two children whose RUN
/// steps write data and take a moment, so that kills land inside the sandbox.
pub fn run_fleet(marker: &str) -> tempfile::TempDir {
    let slow = format!(
        "FROM bb\nRUN echo {marker}-a > /m && yes abcdefgh | head -c 3000000 > /data && sleep 0.3 && mkdir -p /out && cp /data /out/copy\n"
    );
    let other = format!(
        "FROM bb\nRUN echo {marker}-b > /m && yes 01234567 | head -c 2000000 > /data && sleep 0.2 && rm -f /bin/wget\n"
    );
    crate::push_support::fixture::project(&[
        (
            "images.toml",
            "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n\n[images.slow]\ncontext = \"slow\"\n\n[images.other]\ncontext = \"other\"\n",
        ),
        ("bb/Dockerfile", &format!("{}RUN mkdir -p /etc && echo ok > /etc/ok\n", crate::push_support::fixture::BUSYBOX_BASE)),
        ("slow/Dockerfile", &slow),
        ("other/Dockerfile", &other),
    ])
}

// ---------------------------------------------------------------------------------------
// Killing ferry

/// How a process started by `kill_after` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The SIGKILL arrived while it ran.
    Killed,
    /// It had exited (with this code) before the kill was due.
    Exited(i32),
}

/// Reparent orphans of the test process to it (not to the machine's PID 1, which may never
/// reap them), so that "no process of the group is left" can be checked exactly.
fn become_subreaper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a plain prctl on the calling process.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
    });
}

/// Start `cmd` as the leader of a new process group, wait `after`, then SIGKILL the whole
/// group (ferry and any sandbox it started) and reap it. Panics if a member of the group
/// survives.
pub fn kill_after(cmd: &mut Command, after: Duration) -> Ended {
    become_subreaper();
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pgid = child.id() as libc::pid_t;
    std::thread::sleep(after);
    let ended = match child.try_wait().unwrap() {
        Some(status) => Ended::Exited(status.code().unwrap_or(-1)),
        None => Ended::Killed,
    };
    // SAFETY: signalling our own child's process group.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let status = child.wait().unwrap();
    let ended = match (ended, status.code()) {
        (Ended::Killed, Some(code)) => Ended::Exited(code),
        (e, _) => e,
    };
    reap_group(pgid);
    ended
}

/// Wait until no process of group `pgid` exists, reaping those reparented to us.
pub fn reap_group(pgid: libc::pid_t) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // SAFETY: waitpid on our own (adopted) children of that group, without blocking.
        while unsafe { libc::waitpid(-pgid, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        // SAFETY: signal 0 only checks whether the group exists.
        let alive = unsafe { libc::kill(-pgid, 0) } == 0;
        if !alive {
            return;
        }
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        assert!(Instant::now() < deadline, "process group {pgid} outlived its SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Processes whose command line contains `marker` (a RUN step's own text): a RUN process
/// runs in its own session inside the sandbox, so only this finds one that leaked.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
            if cmdline.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

/// Wait until no process carries `marker`; panics if one is still there after a while.
pub fn assert_no_process_with(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        for pid in &left {
            // SAFETY: reaping (without blocking) only a marked RUN process, should it have been
            // adopted by this process; never a child another test waits for.
            unsafe { libc::waitpid(*pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
        }
        assert!(Instant::now() < deadline, "RUN processes outlived ferry: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mounts of this mount namespace under `dir` (a killed sandbox must leave none).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir)))
        .map(str::to_string)
        .collect()
}

/// Run `cmd` to completion; its output and how long it took.
pub fn timed(cmd: &mut Command) -> (std::process::Output, Duration) {
    let start = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (out, start.elapsed())
}

/// `n` kill delays from about 5 ms to twice `reference` (an un-killed run of the same
/// operation on this machine), denser at the start (quadratic spacing), where a run does
/// the most different things in the least time.
pub fn spread(reference: Duration, n: usize) -> Vec<Duration> {
    let first = 5.0_f64;
    let last = (reference.as_secs_f64() * 1000.0 * 2.0).max(first * 4.0);
    (0..n)
        .map(|i| {
            let t = i as f64 / (n - 1) as f64;
            Duration::from_micros(((first + (last - first) * t * t) * 1000.0) as u64)
        })
        .collect()
}

/// A line for the test log: which kills landed mid-run.
pub fn outcomes_line(op: &str, points: &[(Duration, Ended)]) -> String {
    let parts: Vec<String> = points
        .iter()
        .map(|(d, e)| match e {
            Ended::Killed => format!("{}ms:killed", d.as_millis()),
            Ended::Exited(c) => format!("{}ms:exit{c}", d.as_millis()),
        })
        .collect();
    format!("{op}: {}", parts.join(" "))
}

// ---------------------------------------------------------------------------------------
// The store, read independently of ferry

fn blob(store: &Path, digest: &str) -> PathBuf {
    store.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

/// Read a blob and check that it is there, hashes to its name and has the expected size.
fn checked_blob(store: &Path, digest: &str, size: Option<u64>, why: &str) -> Vec<u8> {
    let bytes = std::fs::read(blob(store, digest))
        .unwrap_or_else(|e| panic!("{why}: blob {digest} is not readable: {e}"));
    assert_eq!(sha256(&bytes), digest, "{why}: blob {digest} does not hash to its name");
    if let Some(size) = size {
        assert_eq!(bytes.len() as u64, size, "{why}: blob {digest} has the wrong size");
    }
    bytes
}

fn decompressed_digest(bytes: &[u8]) -> String {
    if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        sha256_reader(zstd::Decoder::new(bytes).unwrap())
    } else if bytes.starts_with(&[0x1f, 0x8b]) {
        sha256_reader(flate2::read::GzDecoder::new(bytes))
    } else {
        sha256(bytes)
    }
}

/// Check one manifest or index (recursively): every blob present, hash-correct and of the
/// size its descriptor says; every layer decompresses to the diffID its config names.
fn check_manifest(store: &Path, desc: &serde_json::Value, why: &str, seen: &mut HashSet<String>) {
    let digest = desc["digest"].as_str().unwrap().to_string();
    if !seen.insert(digest.clone()) {
        return;
    }
    let bytes = checked_blob(store, &digest, desc["size"].as_u64(), why);
    let m: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{why}: manifest {digest} is not JSON: {e}"));
    if let Some(children) = m["manifests"].as_array() {
        for c in children {
            check_manifest(store, c, why, seen);
        }
        return;
    }
    let config_desc = &m["config"];
    let config_digest = config_desc["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("{why}: manifest {digest} has no config"));
    let config: serde_json::Value = serde_json::from_slice(&checked_blob(
        store,
        config_digest,
        config_desc["size"].as_u64(),
        why,
    ))
    .unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().cloned().unwrap_or_default();
    let layers = m["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(diff_ids.len(), layers.len(), "{why}: manifest {digest} and its config disagree");
    for (layer, diff_id) in layers.iter().zip(&diff_ids) {
        let ld = layer["digest"].as_str().unwrap();
        let bytes = checked_blob(store, ld, layer["size"].as_u64(), why);
        if seen.insert(format!("diffid:{ld}")) {
            assert_eq!(
                decompressed_digest(&bytes),
                diff_id.as_str().unwrap(),
                "{why}: layer {ld} does not decompress to its diffID"
            );
        }
    }
}

/// What an independent walk of a store found.
#[derive(Debug, Default)]
pub struct StoreState {
    /// Store name → manifest digest.
    pub refs: BTreeMap<String, String>,
}

/// Walk `index.json` of `store` and check every entry's image completely; then check what a
/// later run would trust: cache entries (their layer blob and diffID), compression variants
/// and extracted snapshots. `why` names the situation in failure messages.
pub fn check_store(store: &Path, why: &str) -> StoreState {
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0", "{why}");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("index.json"))
            .unwrap_or_else(|e| panic!("{why}: index.json: {e}")),
    )
    .unwrap_or_else(|e| panic!("{why}: index.json is not JSON: {e}"));
    let mut state = StoreState::default();
    let mut seen = HashSet::new();
    for m in index["manifests"].as_array().unwrap() {
        check_manifest(store, m, why, &mut seen);
        if let Some(name) = m["annotations"]["org.opencontainers.image.ref.name"].as_str() {
            state.refs.insert(name.to_string(), m["digest"].as_str().unwrap().to_string());
        }
    }
    check_cache_entries(store, why);
    check_variants(store, why);
    check_snapshots(store, why);
    state
}

/// Every file of `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let ty = e.file_type().unwrap();
        if ty.is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A file that is a real entry (`<hex>.json`, `<hex>.<comp>.json`), not a temporary one.
fn is_entry_name(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_string_lossy();
    !name.starts_with('.') && name.ends_with(".json")
}

/// Build-cache entries: each parses; when its blob is present (the cache treats a missing
/// blob as a miss), the blob decompresses to the entry's diffID.
fn check_cache_entries(store: &Path, why: &str) {
    for f in files_under(&store.join("cache")).into_iter().filter(|p| is_entry_name(p)) {
        let entry: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap())
            .unwrap_or_else(|e| panic!("{why}: cache entry {} is not JSON: {e}", f.display()));
        let digest = entry["blob"]["digest"].as_str().unwrap();
        if blob(store, digest).exists() {
            let bytes = checked_blob(store, digest, entry["blob"]["size"].as_u64(), why);
            assert_eq!(
                decompressed_digest(&bytes),
                entry["diff_id"].as_str().unwrap(),
                "{why}: cache entry {} names a layer of another diffID",
                f.display()
            );
        }
    }
}

/// Compression variants: each entry parses and, when its blob is present, is hash-correct.
fn check_variants(store: &Path, why: &str) {
    for f in files_under(&store.join("compressed")).into_iter().filter(|p| is_entry_name(p)) {
        let entry: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap())
            .unwrap_or_else(|e| panic!("{why}: variant {} is not JSON: {e}", f.display()));
        let d = &entry["descriptor"];
        let digest = d["digest"].as_str().unwrap();
        if blob(store, digest).exists() {
            let bytes = checked_blob(store, digest, d["size"].as_u64(), why);
            if f.parent().unwrap().ends_with("layers") {
                let diff_id = f.file_name().unwrap().to_string_lossy();
                let diff_id = diff_id.split('.').next().unwrap();
                assert_eq!(decompressed_digest(&bytes), format!("sha256:{diff_id}"), "{why}");
            }
        }
    }
}

/// Extracted snapshots are trusted as complete once they exist: each must hold every file of
/// its layer with the layer's size.
fn check_snapshots(store: &Path, why: &str) {
    let Ok(entries) = std::fs::read_dir(store.join("snapshots")) else { return };
    // diffID → a blob holding that layer, from every image config and cache entry.
    let mut layers: BTreeMap<String, String> = BTreeMap::new();
    for f in files_under(&store.join("cache")).into_iter().filter(|p| is_entry_name(p)) {
        if let Ok(e) = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&f).unwrap()) {
            let (id, b) = (e["diff_id"].as_str().unwrap(), e["blob"]["digest"].as_str().unwrap());
            if blob(store, b).exists() {
                layers.insert(id.trim_start_matches("sha256:").to_string(), b.to_string());
            }
        }
    }
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().to_string();
        let Some((_, layer)) = layers.iter().find(|(d, _)| d.starts_with(&id)) else {
            continue;
        };
        let bytes = std::fs::read(blob(store, layer)).unwrap();
        let raw = if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            zstd::decode_all(bytes.as_slice()).unwrap()
        } else {
            bytes
        };
        for entry in tar::Archive::new(raw.as_slice()).entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().to_path_buf();
            let name = path.file_name().map(|n| n.to_string_lossy().to_string());
            if name.as_deref().is_some_and(|n| n.starts_with(".wh.")) {
                continue;
            }
            let on_disk = e.path().join(&path);
            let meta = std::fs::symlink_metadata(&on_disk).unwrap_or_else(|err| {
                panic!("{why}: snapshot {id} lacks {} of its layer: {err}", path.display())
            });
            if entry.header().entry_type().is_file() {
                assert_eq!(
                    meta.len(),
                    entry.header().size().unwrap(),
                    "{why}: snapshot {id}: {} is incomplete",
                    path.display()
                );
            }
        }
    }
}

/// Temporary files and directories in `store` (under `tmp/`, and `.tmp…` files beside the
/// files they replace): after a complete run nothing of a dead process may be left.
pub fn leftovers(store: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(store.join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let ty = e.file_type().unwrap();
            if name.starts_with(".tmp") {
                out.push(e.path());
            } else if ty.is_dir() && !matches!(name.as_str(), "blobs" | "snapshots" | "tmp") {
                walk(&e.path(), out);
            }
        }
    }
    walk(store, &mut out);
    // Beside the snapshots (not inside them: those are image contents).
    for e in std::fs::read_dir(store.join("snapshots")).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp") {
            out.push(e.path());
        }
    }
    out
}

/// `ferry cache verify` in `store` must pass.
pub fn assert_verify(ferry: &mut Command, why: &str) {
    let out = ferry.args(["cache", "verify"]).output().unwrap();
    assert!(
        out.status.success(),
        "{why}: `ferry cache verify` failed ({:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copy a store directory (blobs keep their read-only mode).
pub fn copy_store(from: &Path, to: &Path) {
    let out = Command::new("cp").arg("-a").arg(from).arg(to).output().unwrap();
    assert!(out.status.success(), "cp -a: {}", String::from_utf8_lossy(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// A registry, read over the distribution API

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

fn http() -> reqwest::blocking::Client {
    ferry::registry::http_client_builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// Every `repository:tag` of the registry at `host` under `prefix`, with the digest of the
/// manifest it names; panics when a tagged manifest (or a child of a tagged index) lacks a
/// blob or a blob has another size than its descriptor says.
pub fn registry_tags(host: &str, prefix: &str, why: &str) -> BTreeMap<String, String> {
    wait_until_registry_idle(host, why);
    let c = http();
    let resp = c.get(format!("http://{host}/v2/_catalog?n=1000")).send().unwrap();
    assert!(resp.status().is_success(), "{why}: catalog: {}", resp.status());
    let catalog: serde_json::Value = resp.json().unwrap();
    let mut out = BTreeMap::new();
    for repo in catalog["repositories"].as_array().into_iter().flatten() {
        let repo = repo.as_str().unwrap();
        if !repo.starts_with(prefix) {
            continue;
        }
        let tags: serde_json::Value =
            c.get(format!("http://{host}/v2/{repo}/tags/list")).send().unwrap().json().unwrap();
        for tag in tags["tags"].as_array().into_iter().flatten() {
            let tag = tag.as_str().unwrap();
            let digest = check_remote_manifest(&c, host, repo, tag, why);
            out.insert(format!("{repo}:{tag}"), digest);
        }
    }
    out
}

/// Waits until the registry at `host` has finished every request a killed client sent.
///
/// The registry goes on serving a request after its client dies: a tag PUT may be between
/// the tag's index link (which `tags/list` already shows) and its current link, each written
/// with an fsync that can take seconds on a busy disk. Go's server closes a connection only
/// when its handler has returned and the next read finds the client gone, so once no
/// connection to the registry's port is open (ESTABLISHED or CLOSE_WAIT on its side), what
/// the registry holds is final: a tag that then names no manifest is a real fault.
fn wait_until_registry_idle(host: &str, why: &str) {
    let port: u16 = host.rsplit(':').next().and_then(|p| p.parse().ok()).expect("host:port");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let busy = open_server_connections(port);
        if busy == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{why}: the registry still serves {busy} connection(s) after 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connections whose local end is `port` and that the server has not closed yet.
fn open_server_connections(port: u16) -> usize {
    const ESTABLISHED: &str = "01";
    const SYN_RECV: &str = "03";
    const CLOSE_WAIT: &str = "08";
    let mut open = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else { continue };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && [ESTABLISHED, SYN_RECV, CLOSE_WAIT].contains(state) {
                open += 1;
            }
        }
    }
    open
}

fn check_remote_manifest(
    c: &reqwest::blocking::Client,
    host: &str,
    repo: &str,
    reference: &str,
    why: &str,
) -> String {
    let resp = c
        .get(format!("http://{host}/v2/{repo}/manifests/{reference}"))
        .header("Accept", ACCEPT)
        .send()
        .unwrap();
    assert!(resp.status().is_success(), "{why}: {repo}:{reference} names no manifest");
    let bytes = resp.bytes().unwrap();
    let digest = sha256(&bytes);
    let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    if let Some(children) = m["manifests"].as_array() {
        for child in children {
            check_remote_manifest(c, host, repo, child["digest"].as_str().unwrap(), why);
        }
        return digest;
    }
    let blobs = std::iter::once(&m["config"]).chain(m["layers"].as_array().into_iter().flatten());
    for b in blobs {
        let d = b["digest"].as_str().unwrap();
        let resp = c.head(format!("http://{host}/v2/{repo}/blobs/{d}")).send().unwrap();
        assert!(
            resp.status().is_success(),
            "{why}: {repo}:{reference} ({digest}) names blob {d}, which the registry lacks ({})",
            resp.status()
        );
        let len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        assert_eq!(len, b["size"].as_u64(), "{why}: blob {d} in {repo} has the wrong size");
    }
    digest
}

/// Tag → digest with the first `prefix` of every repository name removed, so the tags of
/// two environments can be compared.
pub fn strip_prefix(tags: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    tags.iter().map(|(k, v)| (k.trim_start_matches(prefix).to_string(), v.clone())).collect()
}

/// Names of `a` and `b` that differ (for messages).
pub fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> BTreeSet<String> {
    a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}
