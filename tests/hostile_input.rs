//! Hostile input end to end, through the `ferry` binary: build contexts whose symlinks or
//! operands lead out, archives in the context that `ADD` unpacks, base images (pushed to a
//! real registry) whose layer tars try to write outside the rootfs or are garbage, and
//! archives given to `ferry load` whose descriptors lie. Each must be a clear error naming
//! what is wrong and where, and nothing may appear outside the store and the rootfs: a
//! sentinel directory next to everything, whose absolute path the hostile inputs aim at,
//! stays as it was.
//!
//! Covered elsewhere and not repeated here: the archive-level cases of `extract_layer`
//! (tests/layer_extract.rs: `..`, absolute names, symlink and hard-link escapes, PAX and GNU
//! long names, corrupt headers) and direct symlink operands and `COPY ../x`
//! (tests/build_copy.rs, `bad_sources_and_destinations_name_the_file_and_line`).

mod common;

use common::fixture;
mod layer_support;

use std::io::Write;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{RegistryOptions, TestRegistry};
use fixture::{ferry, project, store_contains};
use layer_support::{fix_checksum, raw_header, raw_tar};

/// A directory outside every tree ferry may write to, holding one file. Hostile inputs name
/// its absolute path; it must end the test exactly as it began.
struct Sentinel {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

const VICTIM: &[u8] = b"sentinel content 7c1e";
/// The name escapes try to create; looked for in the sentinel, the store and `/`.
const ESCAPED: &str = "ferry-hostile-escaped";

impl Sentinel {
    fn new() -> Sentinel {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sentinel");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("victim"), VICTIM).unwrap();
        Sentinel { _tmp: tmp, dir }
    }

    fn path_bytes(&self) -> Vec<u8> {
        self.dir.as_os_str().as_encoded_bytes().to_vec()
    }

    fn victim_bytes(&self) -> Vec<u8> {
        let mut v = self.path_bytes();
        v.extend_from_slice(b"/victim");
        v
    }

    /// Nothing was created, changed or removed in the sentinel (nor beside it), and no
    /// escape landed at the root of the filesystem or anywhere in `trees`.
    fn assert_untouched(&self, case: &str, trees: &[&Path]) {
        let names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["victim"], "{case}: something was created in the sentinel");
        let meta = std::fs::symlink_metadata(self.dir.join("victim")).unwrap();
        assert!(meta.is_file(), "{case}: the victim was replaced");
        assert_eq!(meta.nlink(), 1, "{case}: the victim was hard-linked from somewhere");
        assert_eq!(std::fs::read(self.dir.join("victim")).unwrap(), VICTIM, "{case}");
        let beside: Vec<String> = std::fs::read_dir(self.dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(beside, ["sentinel"], "{case}: something was created beside the sentinel");
        assert!(!Path::new("/").join(ESCAPED).exists(), "{case}: /{ESCAPED} exists");
        for tree in trees {
            for e in walkdir::WalkDir::new(tree) {
                let e = e.unwrap();
                assert_ne!(
                    e.file_name().to_string_lossy(),
                    ESCAPED,
                    "{case}: {} exists",
                    e.path().display()
                );
            }
        }
    }
}

/// Run `ferry --store STORE ARGS` in `dir`; returns (exit code, stdout, stderr).
fn run(dir: &Path, store: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = ferry(dir).arg("--store").arg(store).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_contains(case: &str, text: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(text.contains(w), "{case}: expected {w:?} in:\n{text}");
    }
}

const ONE_IMAGE: &str = "[project]\nname = \"t\"\n\n[images.app]\ncontext = \"app\"\n";

// ---- build contexts -----------------------------------------------------------------

#[test]
fn context_symlinks_and_operands_never_read_outside_the_context() {
    let sentinel = Sentinel::new();
    let s = sentinel.dir.display().to_string();
    // (Dockerfile, symlinks in the context, what the error says)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        // A symlinked directory in the middle of the operand, relative and absolute.
        (
            "FROM scratch\nCOPY up/sentinel/victim /x\n",
            &[("up", "..")],
            &["Dockerfile:2:", "\"up/sentinel/victim\" is outside", "symlink on its path"],
        ),
        ("FROM scratch\nCOPY abs/victim /x\n", &[("abs", &s)], &["Dockerfile:2:", "is outside"]),
        // A chain of links, the last one leading out.
        (
            "FROM scratch\nCOPY a/victim /x\n",
            &[("a", "b"), ("b", &s)],
            &["Dockerfile:2:", "\"a/victim\" is outside"],
        ),
        // A glob whose match is a link out.
        ("FROM scratch\nCOPY l* /x/\n", &[("lout", &s)], &["Dockerfile:2:", "\"l*\" is outside"]),
        // `..` spelled in every way the operand can carry it.
        ("FROM scratch\nCOPY a/../../x /x\n", &[], &["Dockerfile:2:", "is outside"]),
        ("FROM scratch\nCOPY /../x /x\n", &[], &["Dockerfile:2:", "is outside"]),
        (
            "FROM scratch\nARG UP=..\nCOPY ${UP}/sentinel/victim /x\n",
            &[],
            &["Dockerfile:3:", "\"../sentinel/victim\" is outside"],
        ),
        ("FROM scratch\nCOPY --exclude=x .. /x\n", &[], &["Dockerfile:2:", "is outside"]),
        // A loop of links is an error, not a hang.
        (
            "FROM scratch\nCOPY loop/x /x\n",
            &[("loop", "loop2"), ("loop2", "loop")],
            &["Dockerfile:2:", "too many levels of symbolic links"],
        ),
    ];
    for (dockerfile, links, wanted) in cases {
        let dir = project(&[("images.toml", ONE_IMAGE), ("app/Dockerfile", dockerfile)]);
        for (name, target) in *links {
            symlink(target, dir.path().join("app").join(name)).unwrap();
        }
        // `up -> ..` from app/ is the project directory; give it a way to the sentinel.
        symlink(&sentinel.dir, dir.path().join("sentinel")).unwrap();
        let store = tempfile::tempdir().unwrap();
        let (code, _, err) = run(dir.path(), store.path(), &["build"]);
        assert_eq!(code, Some(1), "{dockerfile:?} must fail:\n{err}");
        assert_contains(dockerfile, &err, wanted);
        assert!(
            store_contains(store.path(), VICTIM).is_empty(),
            "{dockerfile:?}: the sentinel's content is in the store"
        );
        sentinel.assert_untouched(dockerfile, &[store.path()]);
    }
}

#[test]
fn symlinks_inside_a_copied_directory_are_copied_as_links_never_followed() {
    let sentinel = Sentinel::new();
    let dir = project(&[
        ("images.toml", ONE_IMAGE),
        ("app/Dockerfile", "FROM scratch\nCOPY tree /tree\n"),
        ("app/tree/plain", "plain"),
    ]);
    let victim = sentinel.dir.join("victim");
    symlink(&victim, dir.path().join("app/tree/abs")).unwrap();
    symlink("../../../sentinel/victim", dir.path().join("app/tree/rel")).unwrap();
    symlink(&sentinel.dir, dir.path().join("app/tree/dir")).unwrap();
    let store = tempfile::tempdir().unwrap();
    let report = fixture::build_json(dir.path(), store.path(), &[]);
    assert_eq!(report["images"][0]["status"], "built", "{report}");
    let listing = fixture::layer_listings(store.path(), "app").concat();
    for name in ["tree/abs", "tree/rel", "tree/dir", "tree/plain"] {
        assert!(listing.iter().any(|n| n == name), "{name} missing from {listing:?}");
    }
    assert!(!listing.iter().any(|n| n.starts_with("tree/dir/")), "the link was followed");
    assert!(store_contains(store.path(), VICTIM).is_empty(), "the link target was read");
    sentinel.assert_untouched("copied links", &[store.path()]);
}

/// A tar in the build context, unpacked by `ADD` into the image.
#[test]
fn add_of_a_hostile_archive_from_the_context_is_refused() {
    let sentinel = Sentinel::new();
    let escaped_up = format!("../../../../../../../../../../{ESCAPED}");
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "dotdot",
            raw_tar(&[(raw_header(escaped_up.as_bytes(), b'0', 1, b""), b"x")]),
            vec!["`..`"],
        ),
        (
            "write through an absolute symlink",
            raw_tar(&[
                (raw_header(b"l", b'2', 0, &sentinel.path_bytes()), b""),
                (raw_header(format!("l/{ESCAPED}").as_bytes(), b'0', 1, b""), b"x"),
            ]),
            vec!["symlink created by the same archive"],
        ),
        (
            "hard link to the sentinel",
            raw_tar(&[(raw_header(b"hl", b'1', 0, b"../../../../../sentinel/victim"), b"")]),
            vec!["hard link target", "`..`"],
        ),
    ];
    for (case, tar, wanted) in cases {
        let dir = project(&[
            ("images.toml", ONE_IMAGE),
            ("app/Dockerfile", "FROM scratch\n\nADD evil.tar /\n"),
        ]);
        std::fs::write(dir.path().join("app/evil.tar"), &tar).unwrap();
        let store = tempfile::tempdir().unwrap();
        let (code, _, err) = run(dir.path(), store.path(), &["build"]);
        assert_eq!(code, Some(1), "{case} must fail:\n{err}");
        assert_contains(case, &err, &["Dockerfile:3:", "ADD", "evil.tar", "refusing tar entry"]);
        assert_contains(case, &err, &wanted);
        sentinel.assert_untouched(case, &[store.path(), dir.path()]);
    }
}

// ---- hostile base images ------------------------------------------------------------

/// A layer holding the static busybox, so that RUN has something to exec.
fn busybox_layer() -> Vec<u8> {
    common::layer_tar(&[
        common::dir("bin"),
        common::file("bin/busybox", &std::fs::read(fixture::busybox()).unwrap(), 0o755),
    ])
}

/// Publish an image made of `layers` (uncompressed tars, bottom first, any bytes) in
/// `registry` as `repo:1`; returns the layer digests.
fn publish_raw(registry: &TestRegistry, repo: &str, layers: &[Vec<u8>]) -> Vec<String> {
    let layout = tempfile::tempdir().unwrap();
    let blobs = layout.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = common::sha256(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let digests: Vec<String> = layers.iter().map(|l| put(l)).collect();
    let config = serde_json::json!({
        "architecture": if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" },
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": digests},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(&config),
            "size": config.len(),
        },
        "layers": layers.iter().zip(&digests).map(|(l, d)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d,
            "size": l.len(),
        })).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(&manifest),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "t"},
        }],
    });
    std::fs::write(layout.path().join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.path().join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    registry.push(layout.path(), "t", &format!("{repo}:1"));
    digests
}

/// The hostile layers: (name, tar, words the error must contain).
fn hostile_layers(sentinel: &Sentinel) -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let up = format!("../../../../../../../../../../../../{ESCAPED}");
    let mut huge = raw_header(b"huge", b'0', 0, b"");
    // 8 GiB - 1 claimed, a few bytes present.
    huge[124..136].copy_from_slice(b"77777777777\0");
    fix_checksum(&mut huge);
    let mut bad_sum = raw_header(b"file", b'0', 1, b"");
    bad_sum[148] = b'7';
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 13) as u8).collect();
    let pax_bomb = {
        let mut v = raw_header(b"PaxHeaders/x", b'x', (1 << 33) - 1, b"").to_vec();
        v.extend_from_slice(&[b'9'; 2048]);
        v
    };
    vec![
        (
            "dotdot entry",
            raw_tar(&[(raw_header(up.as_bytes(), b'0', 1, b""), b"x")]),
            vec!["refusing tar entry", "`..`"],
        ),
        (
            "write through an absolute symlink",
            raw_tar(&[
                (raw_header(b"etc", b'2', 0, &sentinel.path_bytes()), b""),
                (raw_header(format!("etc/{ESCAPED}").as_bytes(), b'0', 1, b""), b"x"),
            ]),
            vec!["refusing tar entry", "symlink created by the same archive"],
        ),
        (
            "write through a relative symlink",
            raw_tar(&[
                (raw_header(b"up", b'2', 0, b"../../../../../../../../../../.."), b""),
                (raw_header(format!("up/{ESCAPED}").as_bytes(), b'0', 1, b""), b"x"),
            ]),
            vec!["refusing tar entry", "symlink created by the same archive"],
        ),
        (
            "hard link leaving the rootfs",
            raw_tar(&[(raw_header(b"hl", b'1', 0, b"../../../../../../../sentinel/victim"), b"")]),
            vec!["refusing tar entry `hl`", "`..`"],
        ),
        (
            "hard link through an absolute symlink",
            raw_tar(&[
                (raw_header(b"l", b'2', 0, &sentinel.path_bytes()), b""),
                (raw_header(b"hl", b'1', 0, b"l/victim"), b""),
            ]),
            vec!["refusing tar entry `hl`", "symlink"],
        ),
        (
            "hard link to an absolute host path",
            raw_tar(&[(raw_header(b"hl", b'1', 0, &sentinel.victim_bytes()), b"")]),
            vec!["refusing tar entry `hl`", "does not exist"],
        ),
        (
            "huge size field",
            {
                let mut v = huge.to_vec();
                v.extend_from_slice(&[b'x'; 1000]);
                v
            },
            vec!["corrupt tar", "truncated", "`huge`"],
        ),
        ("bad checksum", raw_tar(&[(bad_sum, b"x")]), vec!["corrupt tar", "checksum"]),
        (
            "truncated in a header",
            {
                let mut v = raw_tar(&[(raw_header(b"a", b'0', 1, b""), b"x")]);
                v.truncate(1024 + 100);
                v[1024..1124].copy_from_slice(&raw_header(b"b", b'0', 1, b"")[..100]);
                v
            },
            vec!["corrupt tar", "truncated"],
        ),
        ("garbage", garbage, vec!["corrupt tar"]),
        ("PAX header bomb", pax_bomb, vec!["corrupt tar", "exceeds"]),
    ]
}

/// Every hostile layer on top of busybox, used two ways: as the base of a RUN (extracted as
/// an overlay lower dir) and as the source of `COPY --from` (flattened into a rootfs).
#[test]
fn hostile_base_image_layers_are_refused_naming_image_step_and_layer() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let sentinel = Sentinel::new();
    let bb = busybox_layer();
    for (i, (case, layer, wanted)) in hostile_layers(&sentinel).into_iter().enumerate() {
        let repo = format!("evil/case{i}");
        let digests = publish_raw(&registry, &repo, &[bb.clone(), layer]);
        let image = format!("{}/{repo}:1", registry.host);
        let short = &digests[1]["sha256:".len().."sha256:".len() + 12];
        for dockerfile in [
            format!("FROM {image}\n\nRUN [\"/bin/busybox\", \"true\"]\n"),
            format!("FROM scratch\n\nCOPY --from={image} /bin/busybox /bb\n"),
        ] {
            let dir = project(&[("images.toml", ONE_IMAGE), ("app/Dockerfile", &dockerfile)]);
            let store = tempfile::tempdir().unwrap();
            let (code, _, err) = run(dir.path(), store.path(), &["build"]);
            let what = format!("{case} / {}", dockerfile.lines().nth(2).unwrap());
            assert_eq!(code, Some(1), "{what}: the build must fail:\n{err}");
            assert_contains(&what, &err, &["app", "Dockerfile:3:"]);
            assert!(err.contains(short), "{what}: the layer {} is not named:\n{err}", digests[1]);
            assert_contains(&what, &err, &wanted);
            sentinel.assert_untouched(&what, &[store.path()]);
            // Nothing half-extracted is left: no snapshot of the hostile layer, no temp dir.
            let snapshot = store.path().join("snapshots").join(short);
            assert!(!snapshot.exists(), "{what}: a snapshot of the hostile layer exists");
            let leftovers: Vec<_> = std::fs::read_dir(store.path().join("tmp"))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(leftovers.is_empty(), "{what}: left in the store's tmp: {leftovers:?}");
        }
    }
}

/// Device nodes and fifos in a base layer. As containerd and docker do (and umoci when
/// privileged): created when the process may create them (root, outside a user
/// namespace), skipped with a warning when it may not; fifos are always created. They
/// only ever exist inside the store, whose snapshot and temp directories no other user
/// can enter.
#[test]
fn device_nodes_in_a_base_layer_are_created_only_when_privileged_and_stay_private() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let sentinel = Sentinel::new();
    let mut char_dev = raw_header(b"devs/null", b'3', 0, b"");
    let mut block_dev = raw_header(b"devs/disk", b'4', 0, b"");
    for (h, major, minor) in [(&mut char_dev, 1, 3), (&mut block_dev, 7, 0)] {
        h[100..108].copy_from_slice(b"0000666\0");
        h[329..337].copy_from_slice(format!("{major:07o}\0").as_bytes());
        h[337..345].copy_from_slice(format!("{minor:07o}\0").as_bytes());
        fix_checksum(h);
    }
    let devices = raw_tar(&[
        (raw_header(b"devs/", b'5', 0, b""), b""),
        (char_dev, b""),
        (block_dev, b""),
        (raw_header(b"devs/fifo", b'6', 0, b""), b""),
    ]);
    publish_raw(&registry, "evil/devices", &[busybox_layer(), devices]);
    let image = format!("{}/evil/devices:1", registry.host);
    let dir = project(&[
        ("images.toml", ONE_IMAGE),
        (
            "app/Dockerfile",
            &format!(
                "FROM {image}\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"cd /devs; for f in null disk fifo; do \
                 if [ -c $f ]; then echo $f char; elif [ -b $f ]; then echo $f block; \
                 elif [ -p $f ]; then echo $f fifo; else echo $f absent; fi; done > /seen\"]\n"
            ),
        ),
    ]);
    let store = tempfile::tempdir().unwrap();
    let (code, _, err) = run(dir.path(), store.path(), &["build"]);
    assert_eq!(code, Some(0), "{err}");
    let work = tempfile::tempdir().unwrap();
    let rootfs = fixture::umoci_unpack(store.path(), "app", work.path());
    let seen = std::fs::read_to_string(rootfs.join("seen")).unwrap();
    let privileged = nix::unistd::geteuid().is_root();
    let want = if privileged {
        "null char\ndisk block\nfifo fifo\n"
    } else {
        "null absent\ndisk absent\nfifo fifo\n"
    };
    assert_eq!(seen, want);
    if !privileged {
        assert_contains("unprivileged", &err, &["not creating device node"]);
    }
    // Where they exist on the host, nobody but the store's owner can reach them.
    let mut found = 0;
    for e in walkdir::WalkDir::new(store.path()) {
        let e = e.unwrap();
        let t = e.file_type();
        if t.is_char_device() || t.is_block_device() {
            found += 1;
            let snapshots = store.path().join("snapshots");
            assert!(e.path().starts_with(&snapshots), "device node {}", e.path().display());
            let mode = std::fs::metadata(&snapshots).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "snapshots/ is {mode:o}: other users reach its devices");
        }
    }
    assert_eq!(found > 0, privileged, "device nodes in the store");
    sentinel.assert_untouched("devices", &[store.path()]);
}

// ---- ferry load ---------------------------------------------------------------------

/// An OCI layout's files, edited by a case and then written as an archive.
struct Layout {
    files: Vec<(String, Vec<u8>)>,
    manifest: serde_json::Value,
    manifest_digest: String,
}

fn good_layout() -> Layout {
    layout_of(b"hello\n")
}

fn layout_of(content: &[u8]) -> Layout {
    let layer = common::layer_tar(&[common::file("hello", content, 0o644)]);
    let layer_digest = common::sha256(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .unwrap();
    let config_digest = common::sha256(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    let mut l = Layout { files: Vec::new(), manifest, manifest_digest: String::new() };
    l.put_blob(&layer);
    l.put_blob(&config);
    l
}

impl Layout {
    fn put_blob(&mut self, bytes: &[u8]) -> String {
        let d = common::sha256(bytes);
        self.files.push((format!("blobs/sha256/{}", &d[7..]), bytes.to_vec()));
        d
    }

    /// Store the manifest and write index.json pointing at it with `size` (None: the true
    /// size).
    fn finish(&mut self, size: Option<usize>) {
        let bytes = serde_json::to_vec(&self.manifest).unwrap();
        self.manifest_digest = self.put_blob(&bytes);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.manifest_digest,
                "size": size.unwrap_or(bytes.len()),
                "annotations": {"org.opencontainers.image.ref.name": "loaded:1"},
            }],
        });
        self.files.push(("index.json".into(), index.to_string().into_bytes()));
        self.files.push(("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()));
    }

    /// The archive, with raw headers so that any name (`..`, absolute) can be written.
    fn archive(&self, extra: &[([u8; 512], &[u8])]) -> Vec<u8> {
        let mut parts: Vec<([u8; 512], &[u8])> = self
            .files
            .iter()
            .map(|(name, data)| {
                (raw_header(name.as_bytes(), b'0', data.len() as u64, b""), &data[..])
            })
            .collect();
        parts.extend_from_slice(extra);
        raw_tar(&parts)
    }
}

/// (case, archive, words of the error; None: the load must succeed)
type LoadCase = (&'static str, Vec<u8>, Option<Vec<String>>);

#[test]
fn load_refuses_archives_whose_descriptors_lie_and_writes_nothing_outside() {
    let sentinel = Sentinel::new();
    let up = format!("../../../../../../../../{ESCAPED}");
    let abs = {
        let mut v = sentinel.path_bytes();
        v.extend_from_slice(format!("/{ESCAPED}").as_bytes());
        v
    };
    let abs_link = {
        let mut v = sentinel.path_bytes();
        v.extend_from_slice(b"/victim");
        v
    };
    let ok = {
        let mut l = good_layout();
        l.finish(None);
        l
    };
    let other = {
        let mut l = layout_of(b"already in the store\n");
        l.finish(None);
        l
    };
    let mut cases: Vec<LoadCase> = Vec::new();
    {
        let mut l = good_layout();
        l.finish(Some(7));
        let want = vec![l.manifest_digest.clone(), "size".into()];
        cases.push(("index.json claims a wrong manifest size", l.archive(&[]), Some(want)));
    }
    {
        let mut l = good_layout();
        let real = l.manifest["layers"][0]["size"].as_u64().unwrap();
        l.manifest["layers"][0]["size"] = serde_json::json!(real + 1);
        let layer = l.manifest["layers"][0]["digest"].as_str().unwrap().to_string();
        l.finish(None);
        cases.push((
            "the manifest claims a wrong layer size",
            l.archive(&[]),
            Some(vec![layer, "size".into()]),
        ));
    }
    {
        let mut l = good_layout();
        l.manifest["config"]["size"] = serde_json::json!(3);
        let config = l.manifest["config"]["digest"].as_str().unwrap().to_string();
        l.finish(None);
        cases.push((
            "the manifest claims a wrong config size",
            l.archive(&[]),
            Some(vec![config, "size".into()]),
        ));
    }
    {
        let mut l = good_layout();
        let other = "sha256:".to_string() + &"ab".repeat(32);
        l.manifest["layers"][0]["digest"] = serde_json::json!(other);
        l.finish(None);
        cases.push((
            "the manifest names a layer the archive lacks",
            l.archive(&[]),
            Some(vec!["lacks".into(), other]),
        ));
    }
    {
        // A blob whose file name is not the digest of its content.
        let mut l = good_layout();
        l.finish(None);
        let name = l.files[0].0.clone();
        l.files[0].1.push(b'!');
        cases.push((
            "a blob that is not its digest",
            l.archive(&[]),
            Some(vec![name, "digest".into()]),
        ));
    }
    {
        // The config's diffID is not the layer's content.
        let mut l = good_layout();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:".to_string() + &"cd".repeat(32)]},
        }))
        .unwrap();
        let d = l.put_blob(&config);
        l.manifest["config"]["digest"] = serde_json::json!(d);
        l.manifest["config"]["size"] = serde_json::json!(config.len());
        l.finish(None);
        let layer = l.manifest["layers"][0]["digest"].as_str().unwrap().to_string();
        cases.push((
            "a diffID that is not the layer",
            l.archive(&[]),
            Some(vec![layer, "diffID".into()]),
        ));
    }
    // A docker archive whose manifest.json points out of the archive, at host files.
    let docker_manifest = serde_json::json!([{
        "Config": "../../../../../etc/passwd",
        "RepoTags": ["escape:1"],
        "Layers": [format!("{}/victim", sentinel.dir.display())],
    }])
    .to_string();
    cases.push((
        "a docker manifest.json naming host paths",
        raw_tar(&[(
            raw_header(b"manifest.json", b'0', docker_manifest.len() as u64, b""),
            docker_manifest.as_bytes(),
        )]),
        Some(vec!["../../../../../etc/passwd".into(), "does not contain".into()]),
    ));
    // Entries aimed outside are never written anywhere: load reads blobs, not paths.
    cases.push((
        "entries named with .. and absolute paths",
        ok.archive(&[
            (raw_header(up.as_bytes(), b'0', 1, b""), b"x"),
            (raw_header(&abs, b'0', 1, b""), b"x"),
            (raw_header(b"blobs/sha256/../../../escape", b'0', 1, b""), b"x"),
            (raw_header(b"link", b'2', 0, &abs_link), b""),
            (raw_header(b"hard", b'1', 0, &abs_link), b""),
        ]),
        None,
    ));
    for (case, archive, want) in cases {
        let work = tempfile::tempdir().unwrap();
        let store = work.path().join("store");
        // A store holding another image already: a failed load must not disturb it.
        let file = work.path().join("image.tar");
        std::fs::write(&file, other.archive(&[])).unwrap();
        let (code, _, err) = run(work.path(), &store, &["load", "-i", file.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{err}");
        std::fs::write(&file, &archive).unwrap();
        let index_before = std::fs::read(store.join("index.json")).unwrap();
        let (code, out, err) =
            run(work.path(), &store, &["--json", "load", "-i", file.to_str().unwrap()]);
        match want {
            Some(words) => {
                assert_eq!(code, Some(2), "{case}: load must fail:\nstdout: {out}\nstderr: {err}");
                assert!(err.contains("image.tar"), "{case}: the archive is not named:\n{err}");
                for w in &words {
                    assert!(err.contains(w.as_str()), "{case}: expected {w:?} in:\n{err}");
                }
                assert_eq!(
                    std::fs::read(store.join("index.json")).unwrap(),
                    index_before,
                    "{case}: the failed load changed the store's names"
                );
            }
            None => assert_eq!(code, Some(0), "{case}: {err}"),
        }
        let (code, _, err) = run(work.path(), &store, &["cache", "verify"]);
        assert_eq!(code, Some(0), "{case}: the store does not verify: {err}");
        sentinel.assert_untouched(case, &[&store, work.path()]);
    }
}

/// A compressed layer whose gzip stream is cut short is an error at extraction, never a
/// partial rootfs passed off as the layer.
#[test]
fn a_truncated_compressed_base_layer_is_an_error() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&busybox_layer()).unwrap();
    let mut blob = gz.finish().unwrap();
    blob.truncate(blob.len() / 2);
    let layout = tempfile::tempdir().unwrap();
    let img = common::make_oci_image(layout.path(), "t", &[vec![]], common::Comp::Gzip);
    // Swap the one layer for the truncated one, keeping the manifest consistent with it.
    let manifest_path = layout.path().join("blobs/sha256").join(&img.manifest_digest[7..]);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let d = common::sha256(&blob);
    std::fs::write(layout.path().join("blobs/sha256").join(&d[7..]), &blob).unwrap();
    manifest["layers"][0]["digest"] = serde_json::json!(d);
    manifest["layers"][0]["size"] = serde_json::json!(blob.len());
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let md = common::sha256(&bytes);
    std::fs::write(layout.path().join("blobs/sha256").join(&md[7..]), &bytes).unwrap();
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"] = serde_json::json!(md);
    index["manifests"][0]["size"] = serde_json::json!(bytes.len());
    std::fs::write(layout.path().join("index.json"), index.to_string()).unwrap();
    registry.push(layout.path(), "t", "evil/truncated:1");
    let dir = project(&[
        ("images.toml", ONE_IMAGE),
        (
            "app/Dockerfile",
            &format!("FROM {}/evil/truncated:1\nRUN [\"/bin/busybox\", \"true\"]\n", registry.host),
        ),
    ]);
    let store = tempfile::tempdir().unwrap();
    let (code, _, err) = run(dir.path(), store.path(), &["build"]);
    assert_eq!(code, Some(1), "{err}");
    assert_contains("truncated gzip", &err, &["app", "Dockerfile:2:", &d[7..19]]);
}

// ---- hostile registries -------------------------------------------------------------

/// A token service is input too: one that answers with a token lifetime no clock can
/// hold must not crash ferry.
#[test]
fn a_token_lifetime_beyond_any_clock_is_not_a_crash() {
    let registry = TestRegistry::start(RegistryOptions::default());
    publish_raw(&registry, "lib/bb", &[busybox_layer()]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let me = listener.local_addr().unwrap().to_string();
    let gate = common::FaultProxy::start_with(listener, &registry.host, move |r| {
        if r.path.starts_with("/token") {
            let body = format!(r#"{{"token": "t0k", "expires_in": {}}}"#, u64::MAX);
            return common::Action::Body(body.into_bytes(), vec![]);
        }
        if r.header("authorization") == Some("Bearer t0k") {
            return common::Action::Forward;
        }
        let challenge = format!("Bearer realm=\"http://{me}/token\",service=\"gate\"");
        common::Action::Respond(401, vec![("WWW-Authenticate".into(), challenge)])
    });
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let image = format!("{}/lib/bb:1", gate.host);
    let (code, _, err) = run(work.path(), store.path(), &["pull", &image]);
    assert_eq!(code, Some(0), "{err}");
}
