//! COPY and ADD against docker's rules, each result read back by independent tools
//! (`umoci unpack` for the tree, modes and owners; `skopeo inspect --config`): source
//! selection, destinations, owners and modes, what an existing image directory keeps,
//! `--from`, `--link`, `--exclude`, ignore files, archives, downloads and errors.

mod fixture;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fixture::{
    build_json, digests, ferry, layer_digests, layer_listings, project, skopeo_config, stat,
    umoci_unpack, BUSYBOX_BASE,
};

/// A busybox image whose filesystem has what COPY must not disturb: a 0700 /root, a
/// /home/app owned by `app`, a 0711 /opt, /var/run as a symlink to /run, users and groups.
const BB: &str = "RUN mkdir -p /etc /root /home/app /run /var /opt \
    && chmod 700 /root && chmod 711 /opt \
    && echo 'root:x:0:0::/root:/bin/sh' > /etc/passwd \
    && echo 'app:x:10001:10002::/home/app:/bin/sh' >> /etc/passwd \
    && printf 'root:x:0:\\nstaff:x:50:\\napp:x:10002:\\n' > /etc/group \
    && echo rc > /home/app/.rc && chmod 644 /home/app/.rc \
    && chown -R 10001:10002 /home/app && chmod 750 /home/app \
    && ln -s /run /var/run\n";

fn manifest(images: &[&str]) -> String {
    let mut m = String::from("[project]\nname = \"t\"\n");
    for i in images {
        m.push_str(&format!("\n[images.{i}]\ncontext = \"{i}\"\n"));
    }
    m
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `ferry build` that must fail; returns its stderr.
fn build_error(dir: &Path) -> String {
    let store = tempfile::tempdir().unwrap();
    let out = ferry(dir).arg("--store").arg(store.path()).arg("build").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "the build must fail:\n{stderr}");
    stderr
}

fn steps(report: &serde_json::Value, image: &str) -> Vec<(u64, String)> {
    report["images"].as_array().unwrap().iter().find(|i| i["name"] == image).unwrap()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["line"].as_u64().unwrap(), s["status"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn sources_globs_and_destinations_follow_docker() {
    let dir = project(&[
        ("images.toml", &manifest(&["app"])),
        (
            "app/Dockerfile",
            "FROM scratch\n\
             COPY *.txt /globbed/\n\
             COPY dir/*/x /d/\n\
             COPY one.txt two.txt /multi/\n\
             COPY tree /copied\n\
             COPY one.txt /into/\n\
             COPY one.txt /renamed\n\
             COPY tool /bin/\n\
             WORKDIR /work\n\
             COPY one.txt rel/\n\
             COPY two.txt .\n\
             COPY <<EOF /etc/hello.txt\n\
             hello\n\
             EOF\n",
        ),
        ("app/one.txt", "1"),
        ("app/two.txt", "2"),
        ("app/notes.md", "md"),
        ("app/dir/a/x", "ax"),
        ("app/dir/b/x", "bx"),
        ("app/dir/b/y", "by"),
        ("app/tree/f", "f"),
        ("app/tree/sub/g", "g"),
        ("app/tool", "#!/bin/sh\n"),
    ]);
    let app = dir.path().join("app");
    chmod(&app.join("tree/f"), 0o600);
    chmod(&app.join("tool"), 0o755);
    // Whoever owns a context file on this machine, the image has it as 0:0.
    std::os::unix::fs::chown(app.join("tool"), Some(1234), Some(5678)).unwrap();

    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "app", work.path());

    assert_eq!(read(&root.join("globbed/one.txt")), "1");
    assert_eq!(read(&root.join("globbed/two.txt")), "2");
    assert!(!root.join("globbed/notes.md").exists());
    assert_eq!(stat(&root.join("globbed")), (0o755, 0, 0));
    // Both dir/a/x and dir/b/x land on /d/x: the later match wins.
    assert_eq!(read(&root.join("d/x")), "bx");
    assert!(!root.join("d/y").exists());
    assert_eq!(read(&root.join("multi/one.txt")), "1");
    assert_eq!(read(&root.join("multi/two.txt")), "2");
    // A directory source copies its contents, not itself.
    assert_eq!(read(&root.join("copied/f")), "f");
    assert_eq!(stat(&root.join("copied/f")), (0o600, 0, 0));
    assert_eq!(read(&root.join("copied/sub/g")), "g");
    assert!(!root.join("copied/tree").exists());
    // A file into `dir/` keeps its name; otherwise the destination is its new name.
    assert_eq!(read(&root.join("into/one.txt")), "1");
    assert!(std::fs::symlink_metadata(root.join("renamed")).unwrap().is_file());
    assert_eq!(read(&root.join("renamed")), "1");
    assert_eq!(stat(&root.join("bin/tool")), (0o755, 0, 0));
    // Relative destinations are resolved against WORKDIR.
    assert_eq!(read(&root.join("work/rel/one.txt")), "1");
    assert_eq!(read(&root.join("work/two.txt")), "2");
    assert_eq!(read(&root.join("etc/hello.txt")), "hello\n");
    assert_eq!(stat(&root.join("etc/hello.txt")), (0o644, 0, 0));

    let cfg = skopeo_config(store.path(), "app");
    assert_eq!(cfg["config"]["WorkingDir"], "/work");
    let copies = cfg["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["created_by"].as_str().unwrap_or_default().starts_with("COPY"))
        .count();
    assert_eq!(copies, 10, "{cfg}");
    // Ten COPY layers and the one WORKDIR /work creates (docker's too: /work is new).
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 11);
}

#[test]
fn bad_sources_and_destinations_name_the_file_and_line() {
    // (Dockerfile, symlinks to make in the context, what the error must say)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        // Several sources without a trailing `/` go onto /dst in turn, as BuildKit copies
        // them: a directory cannot then go onto the file the first one wrote.
        (
            "FROM scratch\nCOPY one.txt sub /dst\n",
            &[],
            &["Dockerfile:2:", "cannot copy a directory onto the file an earlier source wrote"],
        ),
        ("FROM scratch\n\nCOPY ../outside.txt /x\n", &[], &["Dockerfile:3:", "outside"]),
        (
            "ARG ARCH=arm64\nFROM scratch AS one\nCOPY one.txt /\nFROM --platform=linux/$ARCH scratch\n",
            &[],
            &["Dockerfile:4:", "FROM --platform=linux/arm64", "cannot build"],
        ),
        (
            "FROM scratch\nCOPY escape /x\n",
            &[("escape", "../outside.txt")],
            &["Dockerfile:2:", "\"escape\" is outside"],
        ),
        (
            "FROM scratch\nCOPY abs /x\n",
            &[("abs", "/etc/passwd")],
            &["Dockerfile:2:", "\"abs\" is outside"],
        ),
        (
            "FROM scratch\nCOPY one.txt /a/\nCOPY nothere.txt /x\n",
            &[],
            &["Dockerfile:3:", "\"nothere.txt\": not found"],
        ),
        (
            "FROM scratch\nCOPY sub/secret.txt /x\n",
            &[],
            &["Dockerfile:2:", "\"sub/secret.txt\": not found"],
        ),
        (
            "FROM scratch\nADD --checksum=sha256:0000000000000000000000000000000000000000000000000000000000000000 one.txt /x\n",
            &[],
            &["Dockerfile:2:", "--checksum needs exactly one http"],
        ),
        ("FROM scratch\nCOPY --chmod=u+s one.txt /x\n", &[], &["Dockerfile:2:", "--chmod=u+s"]),
    ];
    for (dockerfile, links, expected) in cases {
        let dir = project(&[
            ("images.toml", &manifest(&["app"])),
            ("app/Dockerfile", dockerfile),
            ("app/one.txt", "1"),
            ("app/two.txt", "2"),
            ("app/sub/secret.txt", "s"),
            ("app/.dockerignore", "**/secret*\n"),
            ("outside.txt", "not in the context"),
        ]);
        for (name, target) in *links {
            std::os::unix::fs::symlink(target, dir.path().join("app").join(name)).unwrap();
        }
        let err = build_error(dir.path());
        for want in *expected {
            assert!(err.contains(want), "{dockerfile:?}: expected {want:?} in:\n{err}");
        }
    }
}

#[test]
fn existing_directories_keep_their_mode_and_owner_and_symlinks_are_followed() {
    let dir = project(&[
        ("images.toml", &manifest(&["bb", "child"])),
        ("bb/Dockerfile", &format!("{BUSYBOX_BASE}{BB}")),
        (
            "child/Dockerfile",
            "FROM bb\n\
             COPY f.conf /etc\n\
             COPY f.conf /root/.profile\n\
             COPY --chown=app f.conf /home/app/sub/app.conf\n\
             COPY f.conf /var/run/x.conf\n\
             COPY --chown=app:staff tree/ /home/app/\n\
             COPY --chown=1234:5678 f.conf /num/\n\
             COPY --chmod=640 tree /opt/\n\
             COPY --chmod=750 f.conf /made/by/chmod/\n\
             ADD implied.tar /\n",
        ),
        ("child/f.conf", "conf"),
        ("child/tree/f", "f"),
        ("child/tree/sub/g", "g"),
    ]);
    // An archive listing only a file below /home/app: the directories it implies exist.
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o600);
    h.set_uid(10001);
    h.set_gid(10002);
    h.set_size(2);
    tar.append_data(&mut h, "home/app/from-tar", &b"t\n"[..]).unwrap();
    std::fs::write(dir.path().join("child/implied.tar"), tar.into_inner().unwrap()).unwrap();
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "child", work.path());

    // `COPY f /etc` copies into the image's /etc.
    assert_eq!(read(&root.join("etc/f.conf")), "conf");
    assert_eq!(stat(&root.join("etc")).0, 0o755);
    assert!(root.join("etc/passwd").is_file());
    // /root keeps 0700; /home/app keeps its owner and 0750, also under --chown.
    assert_eq!(stat(&root.join("root")), (0o700, 0, 0));
    assert_eq!(stat(&root.join("root/.profile")), (0o644, 0, 0));
    assert_eq!(stat(&root.join("home/app")), (0o750, 10001, 10002));
    assert_eq!(stat(&root.join("home/app/.rc")), (0o644, 10001, 10002));
    // A directory the copy creates is 0755, owned by the --chown owner (layer 3 below);
    // a directory *inside* a later copied directory takes that one's metadata (app:staff).
    assert_eq!(stat(&root.join("home/app/sub")), (0o755, 10001, 50));
    assert_eq!(stat(&root.join("home/app/sub/app.conf")), (0o644, 10001, 10002));
    // Names through the image's /etc/passwd and /etc/group; numbers as they are.
    assert_eq!(stat(&root.join("home/app/f")), (0o644, 10001, 50));
    assert_eq!(stat(&root.join("home/app/sub/g")), (0o644, 10001, 50));
    assert_eq!(stat(&root.join("num")), (0o755, 1234, 5678));
    assert_eq!(stat(&root.join("num/f.conf")), (0o644, 1234, 5678));
    // The destination's symlink is followed, not replaced.
    assert_eq!(std::fs::read_link(root.join("var/run")).unwrap(), Path::new("/run"));
    assert_eq!(read(&root.join("run/x.conf")), "conf");
    // --chmod applies to files and directories; the existing /opt keeps 0711.
    assert_eq!(stat(&root.join("opt")), (0o711, 0, 0));
    assert_eq!(stat(&root.join("opt/f")), (0o640, 0, 0));
    assert_eq!(stat(&root.join("opt/sub")), (0o640, 0, 0));
    assert_eq!(stat(&root.join("opt/sub/g")), (0o640, 0, 0));
    // Directories a --chmod copy creates stay 0755, as docker creates them.
    assert_eq!(stat(&root.join("made")), (0o755, 0, 0));
    assert_eq!(stat(&root.join("made/by/chmod")), (0o755, 0, 0));
    assert_eq!(stat(&root.join("made/by/chmod/f.conf")), (0o750, 0, 0));

    assert_eq!(stat(&root.join("home/app/from-tar")), (0o600, 10001, 10002));

    // The layers themselves: the directories the image already has above what is copied
    // are listed as the image has them (docker's layers list them too), which the stat
    // checks above see unchanged.
    let layers = layer_listings(store.path(), "child");
    let copies = &layers[layers.len() - 9..];
    let names =
        |l: &Vec<String>| l.iter().map(|n| n.trim_end_matches('/').to_string()).collect::<Vec<_>>();
    assert_eq!(names(&copies[0]), ["etc", "etc/f.conf"]);
    assert_eq!(names(&copies[1]), ["root", "root/.profile"]);
    assert_eq!(names(&copies[2]), ["home", "home/app", "home/app/sub", "home/app/sub/app.conf"]);
    assert_eq!(names(&copies[3]), ["run", "run/x.conf"]);
    assert_eq!(
        names(&copies[4]),
        ["home", "home/app", "home/app/f", "home/app/sub", "home/app/sub/g"]
    );
    assert_eq!(names(&copies[6]), ["opt", "opt/f", "opt/sub", "opt/sub/g"]);
    assert_eq!(names(&copies[8]), ["home", "home/app", "home/app/from-tar"]);
}

#[test]
fn copy_onto_a_file_or_symlink_of_the_image_is_refused_as_docker_does() {
    for (line, expected) in [
        ("COPY tree/ /etc/passwd/", "cannot create directory /etc/passwd"),
        ("COPY rootfs/ /", "cannot copy to non-directory: /var/run"),
        ("COPY app /home/", "cannot replace directory /home/app"),
    ] {
        let dir = project(&[
            ("images.toml", &manifest(&["bb", "child"])),
            ("bb/Dockerfile", &format!("{BUSYBOX_BASE}{BB}")),
            ("child/Dockerfile", &format!("FROM bb\n{line}\n")),
            ("child/tree/f", "f"),
            ("child/rootfs/var/run/pid", "1"),
            // A file named like a directory of the image.
            ("child/app", "a file"),
        ]);
        let err = build_error(dir.path());
        assert!(err.contains("child/Dockerfile:2:"), "{line}: {err}");
        assert!(err.contains(expected), "{line}: expected {expected:?} in {err}");
    }
}

#[test]
fn from_stages_and_siblings_keep_owners_exclude_and_link() {
    let dir = project(&[
        ("images.toml", &manifest(&["bb", "from", "linka", "linkb"])),
        ("bb/Dockerfile", &format!("{BUSYBOX_BASE}{BB}")),
        (
            "from/Dockerfile",
            "FROM bb AS build\n\
             RUN mkdir -p /out/sub && echo data > /out/sub/file && chown -R 10001:10002 /out \
                 && chmod 640 /out/sub/file && chmod 750 /out/sub\n\
             FROM scratch\n\
             COPY --from=build /out/ /app/\n\
             COPY --from=build --chown=0:0 /out/sub/file /rooted\n\
             COPY --from=bb /home/app/.rc /sib/rc\n\
             COPY --exclude=*.md --exclude=sub/skip tree /ex/\n\
             COPY --exclude=**/*.md tree /ex2/\n",
        ),
        ("from/tree/f", "f"),
        ("from/tree/readme.md", "md"),
        ("from/tree/sub/g", "g"),
        ("from/tree/sub/skip", "s"),
        ("from/tree/sub/deep.md", "md"),
        ("linka/Dockerfile", "FROM bb\nCOPY --link tree /opt/linked/\n"),
        ("linka/tree/f", "f"),
        ("linkb/Dockerfile", "FROM scratch\nCOPY one /one\nCOPY --link tree /opt/linked/\n"),
        ("linkb/one", "1"),
        ("linkb/tree/f", "f"),
    ]);
    let store = tempfile::tempdir().unwrap();
    // No cache: the two --link layers must come out equal by being built equal.
    build_json(dir.path(), store.path(), &["--no-cache"]);

    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "from", work.path());
    // The destination directory is created 0755 root (docker never copies the source
    // directory's own metadata); what is inside keeps owner and mode.
    assert_eq!(stat(&root.join("app")), (0o755, 0, 0));
    assert_eq!(stat(&root.join("app/sub")), (0o750, 10001, 10002));
    assert_eq!(stat(&root.join("app/sub/file")), (0o640, 10001, 10002));
    assert_eq!(read(&root.join("app/sub/file")), "data\n");
    assert_eq!(stat(&root.join("rooted")), (0o640, 0, 0));
    assert_eq!(stat(&root.join("sib/rc")), (0o644, 10001, 10002));
    assert_eq!(read(&root.join("ex/f")), "f");
    assert_eq!(read(&root.join("ex/sub/g")), "g");
    assert!(!root.join("ex/readme.md").exists());
    assert!(!root.join("ex/sub/skip").exists());
    // `*` never crosses a `/` (Go's filepath.Match, as BuildKit): `**` does.
    assert_eq!(read(&root.join("ex/sub/deep.md")), "md");
    assert!(!root.join("ex2/readme.md").exists());
    assert!(!root.join("ex2/sub/deep.md").exists());
    assert_eq!(read(&root.join("ex2/sub/skip")), "s");

    // --link: the same layer blob whatever the base.
    let a = layer_digests(store.path(), "linka");
    let b = layer_digests(store.path(), "linkb");
    assert_ne!(a[..a.len() - 1], b[..b.len() - 1]);
    assert_eq!(a.last(), b.last());
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "linka", work.path());
    assert_eq!(read(&root.join("opt/linked/f")), "f");
    assert!(root.join("etc/passwd").is_file());
}

#[test]
fn ignore_files_with_globstar_and_exceptions() {
    let dir = project(&[
        (
            "images.toml",
            "[project]\nname = \"t\"\n\n[images.ign]\ncontext = \"ign\"\n\n\
             [images.alt]\ncontext = \"ign\"\ndockerfile = \"Dockerfile.alt\"\n",
        ),
        ("ign/Dockerfile", "FROM scratch\nCOPY . /ctx/\n"),
        ("ign/Dockerfile.alt", "FROM scratch\nCOPY . /ctx/\n"),
        ("ign/.dockerignore", "**/*.log\n!keep.log\nsecret*\n"),
        ("ign/Dockerfile.alt.dockerignore", "*\n!only.txt\n"),
        ("ign/a.log", "a"),
        ("ign/sub/deeper/b.log", "b"),
        ("ign/keep.log", "k"),
        ("ign/secret.txt", "s"),
        ("ign/only.txt", "o"),
        ("ign/sub/c.txt", "c"),
    ]);
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);

    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "ign", work.path());
    let ctx = root.join("ctx");
    for present in ["keep.log", "only.txt", "sub/c.txt", "Dockerfile"] {
        assert!(ctx.join(present).is_file(), "{present}");
    }
    for absent in ["a.log", "sub/deeper/b.log", "secret.txt"] {
        assert!(!ctx.join(absent).exists(), "{absent}");
    }
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "alt", work.path());
    let mut names: Vec<String> = std::fs::read_dir(root.join("ctx"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["only.txt"], "Dockerfile.alt.dockerignore replaces .dockerignore");
}

/// A tar with a directory, a file in an implied directory, a symlink and a private file, all
/// with owners and modes of their own.
fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, owner: (u64, u64), data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("bin/tool").unwrap();
        }
        b.append_data(&mut h, path, data).unwrap();
    };
    add("pkg/", tar::EntryType::Directory, 0o750, (1000, 1000), b"");
    add("pkg/bin/tool", tar::EntryType::Regular, 0o755, (1000, 1001), b"#!tool\n");
    add("pkg/current", tar::EntryType::Symlink, 0o777, (1000, 1000), b"");
    add("top.txt", tar::EntryType::Regular, 0o600, (0, 0), b"top\n");
    b.into_inner().unwrap()
}

fn compressed(tar: &[u8]) -> [(&'static str, Vec<u8>); 5] {
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(tar).unwrap();
        e.finish().unwrap()
    };
    let bz = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(tar).unwrap();
        e.finish().unwrap()
    };
    let xz = {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(tar).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(tar, 3).unwrap();
    [
        ("a.tar", tar.to_vec()),
        ("a.tar.gz", gz),
        ("a.tar.bz2", bz),
        ("a.tar.xz", xz),
        ("a.tar.zst", zst),
    ]
}

#[test]
fn add_extracts_local_archives_in_every_compression_and_copies_other_files() {
    let dir = project(&[
        ("images.toml", &manifest(&["add"])),
        (
            "add/Dockerfile",
            "FROM scratch\n\
             ADD a.tar /plain/\n\
             ADD a.tar.gz /gz\n\
             ADD a.tar.bz2 /bz/\n\
             ADD a.tar.xz /deep/xz/\n\
             ADD a.tar.zst /zst/\n\
             ADD --chown=7:8 a.tar /owned/\n\
             ADD notar.gz plain.txt /files/\n",
        ),
        ("add/plain.txt", "plain"),
    ]);
    let add = dir.path().join("add");
    for (name, bytes) in compressed(&sample_tar()) {
        std::fs::write(add.join(name), bytes).unwrap();
    }
    let notar = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b"just text, compressed").unwrap();
        e.finish().unwrap()
    };
    std::fs::write(add.join("notar.gz"), &notar).unwrap();

    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "add", work.path());
    for d in ["plain", "gz", "bz", "deep/xz", "zst"] {
        let d = root.join(d);
        assert_eq!(stat(&d.join("pkg")), (0o750, 1000, 1000), "{}", d.display());
        assert_eq!(stat(&d.join("pkg/bin/tool")), (0o755, 1000, 1001));
        assert_eq!(read(&d.join("pkg/bin/tool")), "#!tool\n");
        assert_eq!(std::fs::read_link(d.join("pkg/current")).unwrap(), Path::new("bin/tool"));
        assert_eq!(stat(&d.join("top.txt")), (0o600, 0, 0));
        let names: Vec<_> =
            std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "only the archive's content in {}: {names:?}", d.display());
    }
    assert_eq!(stat(&root.join("deep")), (0o755, 0, 0));
    // --chown owns the directory ADD creates; the archive's entries keep their owners, as
    // docker's untar leaves them.
    assert_eq!(stat(&root.join("owned/pkg/bin/tool")), (0o755, 1000, 1001));
    assert_eq!(stat(&root.join("owned/pkg")), (0o750, 1000, 1000));
    assert_eq!(stat(&root.join("owned")), (0o755, 7, 8));
    assert_eq!(std::fs::read(root.join("files/notar.gz")).unwrap(), notar);
    assert_eq!(read(&root.join("files/plain.txt")), "plain");
    // Nothing of the staging left in the store's temporary space.
    let tmp_left: Vec<_> =
        walk_names(store.path()).into_iter().filter(|n| n.contains("add-")).collect();
    assert!(tmp_left.is_empty(), "{tmp_left:?}");
}

fn walk_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            out.push(e.path().to_string_lossy().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// A minimal HTTP/1.1 server on loopback serving `body` at `/files/data.txt` (query strings
/// ignored) and 404 elsewhere, until the test process ends.
fn serve(body: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            let line = String::from_utf8_lossy(&request).lines().next().unwrap_or("").to_string();
            let path = line.split(' ').nth(1).unwrap_or("").split('?').next().unwrap_or("");
            let response = if path == "/files/data.txt" {
                let body = body.lock().unwrap().clone();
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend(body);
                r
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            };
            let _ = stream.write_all(&response);
        }
    });
    port
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn add_downloads_with_and_without_checksum() {
    let body = std::sync::Arc::new(std::sync::Mutex::new(b"remote data\n".to_vec()));
    let port = serve(body.clone());
    let url = format!("http://127.0.0.1:{port}/files/data.txt");
    let good = sha256_hex(b"remote data\n");
    let dir = project(&[
        ("images.toml", &manifest(&["dl"])),
        (
            "dl/Dockerfile",
            &format!(
                "FROM scratch\n\
                 ADD --checksum=sha256:{good} {url} /dl/\n\
                 ADD {url} /dl/renamed.txt\n\
                 ADD --chown=5:6 {url}?x=1 /dl/q/\n"
            ),
        ),
    ]);
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "dl", work.path());
    assert_eq!(read(&root.join("dl/data.txt")), "remote data\n");
    assert_eq!(stat(&root.join("dl/data.txt")), (0o600, 0, 0));
    assert_eq!(read(&root.join("dl/renamed.txt")), "remote data\n");
    assert_eq!(stat(&root.join("dl/q/data.txt")), (0o600, 5, 6));
    assert_eq!(stat(&root.join("dl/q")), (0o755, 5, 6));

    // The remote file changes: the checksummed step stays cached (its checksum stands for
    // its content), the others are fetched again and rebuilt.
    *body.lock().unwrap() = b"changed\n".to_vec();
    let again = build_json(dir.path(), store.path(), &[]);
    assert_eq!(
        steps(&again, "dl"),
        [(2, "cached".to_string()), (3, "built".to_string()), (4, "built".to_string())]
    );
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "dl", work.path());
    assert_eq!(read(&root.join("dl/renamed.txt")), "changed\n");

    for (line, expected) in [
        (format!("ADD --checksum=sha256:{good} {url} /x\n"), "checksum mismatch"),
        (format!("ADD http://127.0.0.1:{port}/missing /x\n"), "404"),
        (format!("ADD --checksum=md5:00 {url} /x\n"), "--checksum=md5:00"),
    ] {
        let bad = project(&[
            ("images.toml", &manifest(&["dl"])),
            ("dl/Dockerfile", &format!("FROM scratch\n{line}")),
        ]);
        let err = build_error(bad.path());
        assert!(err.contains("dl/Dockerfile:2:"), "{err}");
        assert!(err.contains(expected), "expected {expected:?} in {err}");
    }
}

#[test]
fn add_archive_and_heredoc_layers_are_reproducible() {
    let dir = project(&[
        ("images.toml", &manifest(&["repro"])),
        (
            "repro/Dockerfile",
            "FROM scratch\nADD a.tar.gz /x/\nCOPY <<EOF /h.txt\nhi $HOME\nEOF\nADD a.tar.zst /y\n",
        ),
    ]);
    for (name, bytes) in compressed(&sample_tar()) {
        std::fs::write(dir.path().join("repro").join(name), bytes).unwrap();
    }
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let first = digests(&build_json(dir.path(), a.path(), &[]));
    let second = digests(&build_json(dir.path(), b.path(), &["--no-cache"]));
    assert_eq!(first, second);
    assert_eq!(layer_digests(a.path(), "repro"), layer_digests(b.path(), "repro"));
    let layers = layer_listings(a.path(), "repro");
    assert_eq!(layers.len(), 3);
    assert!(layers[0].iter().any(|n| n == "x/pkg/bin/tool"), "{:?}", layers[0]);
    assert!(layers[2].iter().any(|n| n == "y/top.txt"), "{:?}", layers[2]);
}

#[test]
fn a_copy_or_workdir_below_a_directory_keeps_that_directory_s_owner_for_later_runs() {
    // The idiom: an account's home made by a RUN, then USER, WORKDIR and COPY inside it,
    // then a RUN there. The COPY and WORKDIR layers list the home as the image has it;
    // otherwise their snapshots would show it to the next RUN as 0755 root.
    let dir = project(&[
        ("images.toml", &manifest(&["bb", "child"])),
        ("bb/Dockerfile", &format!("{BUSYBOX_BASE}{BB}")),
        (
            "child/Dockerfile",
            "FROM bb\n\
             RUN mkdir -p /home/svc && chmod 700 /home/svc && chown 1500:1500 /home/svc\n\
             USER 1500:1500\n\
             WORKDIR /home/svc/work\n\
             COPY --chown=1500:1500 f.conf /home/svc/conf/\n\
             RUN touch /home/svc/work/here /home/svc/conf/more\n",
        ),
        ("child/f.conf", "conf"),
    ]);
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "child", work.path());
    assert_eq!(stat(&root.join("home/svc")), (0o700, 1500, 1500));
    assert_eq!(stat(&root.join("home/svc/work")), (0o755, 1500, 1500));
    assert_eq!(stat(&root.join("home/svc/work/here")), (0o644, 1500, 1500));
    assert_eq!(stat(&root.join("home/svc/conf/more")), (0o644, 1500, 1500));
    assert_eq!(stat(&root.join("home")), (0o755, 0, 0));
    // The WORKDIR layer lists the parents too.
    let listings = layer_listings(store.path(), "child");
    let workdir_layer = &listings[listings.len() - 3];
    assert_eq!(workdir_layer, &["home/", "home/svc/", "home/svc/work/"]);
}
