//! The suite's real bases, made once per test run: in docker's image store under the names
//! the cases use (`debian:bookworm`, `busybox:latest`, `bare:latest`), and in a test
//! registry that ferry pulls them from as Docker Hub's mirror, as a user's ferry would.
//!
//! - `debian:bookworm`: a `debootstrap --variant=minbase bookworm` tree (scripts/test makes
//!   and caches the tarball) imported with `docker import`: an empty config, no PATH, empty
//!   WorkingDir and User, as many published images.
//! - `busybox:latest`: built by docker itself from `bases/busybox` (static busybox, its
//!   applets, the official image's account files).
//! - `bare:latest`: a busybox tree imported with only `ENV LANG=C.UTF-8`: an Env without PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::common::{self, TestRegistry};

pub struct Bases {
    pub registry: TestRegistry,
    pub docker: PathBuf,
}

/// The docker CLI: `FERRY_TEST_DOCKER`, else Debian's docker.io client. Not the first
/// `docker` on PATH: a docker CLI 23+ without the buildx plugin refuses DOCKER_BUILDKIT=1.
pub fn docker_cli() -> PathBuf {
    std::env::var_os("FERRY_TEST_DOCKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/docker".into())
}

/// The debootstrapped tarball: `FERRY_TEST_DEBIAN_TAR`, else scripts/test's cache file.
fn debian_tar() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_TEST_DEBIAN_TAR") {
        return p.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
    });
    cache.join("ferry-tests/debian-bookworm-minbase.tar")
}

pub fn docker(docker: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(docker)
        .args(args)
        .env("DOCKER_BUILDKIT", "1")
        .output()
        .map_err(|e| format!("{}: {e}", docker.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Bases {
    pub fn prepare() -> Bases {
        let cli = docker_cli();
        docker(&cli, &["info", "--format", "{{.ServerVersion}}"]).unwrap_or_else(|e| {
            panic!("the conformance suite needs a docker daemon (scripts/test installs docker.io and starts dockerd): {e}")
        });
        let tar = debian_tar();
        assert!(
            tar.is_file(),
            "{} is missing: scripts/test makes it with debootstrap --variant=minbase bookworm",
            tar.display()
        );
        // docker 20.10 reuses a WORKDIR's mkdir from its build cache even with --no-cache
        // and another base, with the mtimes of the run that made it, which the mtime rule
        // would take for the context's: every run starts from an empty build cache (only
        // the cache; images stay).
        docker(&cli, &["builder", "prune", "--all", "--force"]).expect("docker builder prune");
        let work = tempfile::tempdir().unwrap();

        // debian: docker import of the debootstrapped tree, config left empty.
        let debian = docker(&cli, &["import", &tar.to_string_lossy()]).expect("docker import");
        tag_own(&cli, &debian, "debian:bookworm");

        // busybox: built by docker from bases/busybox with busybox-static's binary.
        let ctx = work.path().join("busybox");
        common::fixture::copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/bases/busybox"),
            &ctx,
        );
        std::fs::copy(common::fixture::busybox(), ctx.join("busybox")).unwrap();
        let built = docker(&cli, &["build", "-q", "--network", "host", &ctx.to_string_lossy()])
            .expect("docker build of the busybox base");
        tag_own(&cli, &built, "busybox:latest");

        // bare: a busybox tree imported with an Env that has no PATH.
        let bare_tar = work.path().join("bare.tar");
        write_bare_tar(&bare_tar);
        let bare =
            docker(&cli, &["import", "--change", "ENV LANG=C.UTF-8", &bare_tar.to_string_lossy()])
                .expect("docker import of the bare base");
        tag_own(&cli, &bare, "bare:latest");

        let registry = TestRegistry::start(Default::default());
        for (name, repo) in [
            ("debian:bookworm", "library/debian:bookworm"),
            ("busybox:latest", "library/busybox:latest"),
            ("bare:latest", "library/bare:latest"),
        ] {
            let out = Command::new("skopeo")
                .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
                .arg(format!("docker-daemon:{name}"))
                .arg(format!("docker://{}/{repo}", registry.host))
                .output()
                .unwrap();
            assert!(out.status.success(), "skopeo copy of {name}: {}", common::stderr(&out));
        }
        Bases { registry, docker: cli }
    }
}

/// Tag `id` as `name`, unless `name` is an image this suite did not tag (imports carry no
/// label, so a marker file beside the cached tarball records what the suite tagged).
fn tag_own(cli: &Path, id: &str, name: &str) {
    if let Ok(existing) = docker(cli, &["image", "inspect", "--format", "{{.Id}}", name]) {
        let ours = std::fs::read_to_string(own_marker(name)).is_ok_and(|s| s.trim() == existing);
        assert!(
            ours || existing == id,
            "docker already has an image {name} that the conformance suite did not make; \
             run the suite against a docker daemon of its own (DOCKER_HOST), or remove it"
        );
    }
    docker(cli, &["tag", id, name]).expect("docker tag");
    let marker = own_marker(name);
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(marker, id).unwrap();
}

/// Where the suite records which image id it tagged under a name (imports carry no label).
fn own_marker(name: &str) -> PathBuf {
    debian_tar().with_file_name(format!("docker-tag-{}", name.replace([':', '/'], "_")))
}

/// The bare base's tree: busybox, a dozen applets as symlinks, the account files.
fn write_bare_tar(path: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    // The closure borrows the builder until the block ends.
    {
        let mut add =
            |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(mode);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(1_600_000_000);
                h.set_size(data.len() as u64);
                if let Some(l) = link {
                    h.set_link_name(l).unwrap();
                }
                b.append_data(&mut h, path, data).unwrap();
            };
        for dir in ["bin", "etc", "tmp", "root"] {
            add(
                dir,
                tar::EntryType::Directory,
                if dir == "tmp" { 0o1777 } else { 0o755 },
                b"",
                None,
            );
        }
        add(
            "bin/busybox",
            tar::EntryType::Regular,
            0o755,
            &std::fs::read(common::fixture::busybox()).unwrap(),
            None,
        );
        for applet in [
            "sh", "ls", "cat", "echo", "mkdir", "gzip", "id", "pwd", "env", "touch", "chmod",
            "chown",
        ] {
            add(&format!("bin/{applet}"), tar::EntryType::Symlink, 0o777, b"", Some("busybox"));
        }
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/bases/busybox/etc");
        for f in ["passwd", "group"] {
            add(
                &format!("etc/{f}"),
                tar::EntryType::Regular,
                0o644,
                &std::fs::read(etc.join(f)).unwrap(),
                None,
            );
        }
    }
    b.finish().unwrap();
}
