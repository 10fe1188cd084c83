use std::os::unix::fs::symlink;

use super::*;

/// A context directory built from `(path, content)` pairs; a path ending in `/` is a directory.
fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let full = dir.path().join(path);
        if path.ends_with('/') {
            std::fs::create_dir_all(&full).unwrap();
        } else {
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, content).unwrap();
        }
    }
    dir
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn select(tree: &SourceTree, sources: &[&str], excludes: &[&str]) -> Result<Selection> {
    tree.select(&strings(sources), &strings(excludes))
}

/// Every selected path (physical, relative to the root), item by item.
fn selected(selection: &Selection) -> Vec<String> {
    selection.entries().map(|e| e.rel.clone()).collect()
}

fn tree(dir: &tempfile::TempDir) -> SourceTree {
    SourceTree::build_context(dir.path(), None).unwrap()
}

#[test]
fn literal_file_and_directory() {
    let dir = context(&[("a.txt", "a"), ("src/main.rs", "fn main(){}"), ("src/lib/mod.rs", "")]);
    let t = tree(&dir);
    let s = select(&t, &["a.txt", "/src"], &[]).unwrap();
    assert_eq!(selected(&s), ["a.txt", "src", "src/lib", "src/lib/mod.rs", "src/main.rs"]);
    assert_eq!(s.items[0].entry.kind, EntryKind::File);
    assert_eq!(s.items[0].entry.size, 1);
    assert_eq!(s.items[1].entry.kind, EntryKind::Dir);
    // `.` and `/` are the root itself.
    let s = select(&t, &["."], &[]).unwrap();
    assert_eq!(s.items[0].rel, "");
    assert_eq!(s.items[0].entry.children.len(), 2);
}

#[test]
fn globs_match_per_component_in_sorted_order() {
    let dir = context(&[
        ("b.txt", ""),
        ("a.txt", ""),
        (".hidden.txt", ""),
        ("c.md", ""),
        ("pkg/one/Cargo.toml", ""),
        ("pkg/two/Cargo.toml", ""),
        ("pkg/three/README", ""),
        ("x[1]", ""),
    ]);
    let t = tree(&dir);
    let s = select(&t, &["*.txt"], &[]).unwrap();
    // Go's filepath.Match lets `*` match a leading dot.
    assert_eq!(selected(&s), [".hidden.txt", "a.txt", "b.txt"]);
    let s = select(&t, &["pkg/*/Cargo.toml"], &[]).unwrap();
    assert_eq!(selected(&s), ["pkg/one/Cargo.toml", "pkg/two/Cargo.toml"]);
    let s = select(&t, &["?.md", "[ab].txt"], &[]).unwrap();
    assert_eq!(selected(&s), ["c.md", "a.txt", "b.txt"]);
    // `*` does not cross directories.
    let s = select(&t, &["*/Cargo.toml"], &[]).unwrap();
    assert!(s.is_empty());
    // A bracket is matched by a class holding it; with no wildcard a name is taken as written
    // (BuildKit does not unescape literal sources).
    let s = select(&t, &["x[[]1]"], &[]).unwrap();
    assert_eq!(selected(&s), ["x[1]"]);
    assert!(matches!(select(&t, &["x\\[1]"], &[]), Err(ContextError::NotFound { .. })));
    // A malformed pattern is an error naming it.
    let err = select(&t, &["[a"], &[]).unwrap_err();
    assert!(
        matches!(err, ContextError::BadSourcePattern { ref operand, .. } if operand == "[a"),
        "{err}"
    );
}

#[test]
fn missing_sources() {
    let dir = context(&[("a.txt", "")]);
    let t = tree(&dir);
    let err = select(&t, &["a.txt", "/nope"], &[]).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ContextError::NotFound { ref operand, .. } if operand == "/nope"));
    assert!(message.contains("\"/nope\": not found"), "{message}");
    assert!(message.contains(&dir.path().display().to_string()), "{message}");
    // A path below a file does not exist either.
    assert!(matches!(select(&t, &["a.txt/x"], &[]), Err(ContextError::NotFound { .. })));
    // A glob matching nothing copies nothing (BuildKit), but its directory must exist.
    assert!(select(&t, &["requirements.*"], &[]).unwrap().is_empty());
    let err = select(&t, &["nodir/*.txt"], &[]).unwrap_err();
    assert!(matches!(err, ContextError::NotFound { ref operand, .. } if operand == "nodir/*.txt"));
}

#[test]
fn dockerignored_files_are_absent() {
    let dir = context(&[
        (".dockerignore", "*.log\nsecrets\ndocs\n!docs/README.md\nDockerfile\n"),
        ("Dockerfile", "FROM scratch"),
        ("app.log", ""),
        ("app.rs", ""),
        ("secrets/key", ""),
        ("docs/README.md", ""),
        ("docs/internal.md", ""),
        ("sub/deep.log", ""),
    ]);
    let t = tree(&dir);
    for missing in ["app.log", "secrets", "secrets/key", "docs/internal.md", "Dockerfile"] {
        let err = select(&t, &[missing], &[]).unwrap_err();
        assert!(matches!(err, ContextError::NotFound { .. }), "{missing}: {err}");
    }
    // `*.log` only matches at the top level; `sub/deep.log` stays.
    let s = select(&t, &["."], &[]).unwrap();
    assert_eq!(
        selected(&s),
        ["", ".dockerignore", "app.rs", "docs", "docs/README.md", "sub", "sub/deep.log"]
    );
    // The excluded directory exists only as the parent of the re-included file.
    let s = select(&t, &["docs"], &[]).unwrap();
    assert_eq!(selected(&s), ["docs", "docs/README.md"]);
    let s = select(&t, &["*"], &[]).unwrap();
    assert_eq!(
        selected(&s),
        [".dockerignore", "app.rs", "docs", "docs/README.md", "sub", "sub/deep.log"]
    );
    // .dockerignore is an ordinary file.
    let s = select(&t, &[".dockerignore"], &[]).unwrap();
    assert_eq!(selected(&s), [".dockerignore"]);
}

#[test]
fn excludes_filter_the_selection() {
    let dir = context(&[
        ("home.txt", ""),
        ("home.md", ""),
        ("homework.rs", ""),
        ("docs/a.md", ""),
        ("docs/b.rs", ""),
        ("docs/keep.md", ""),
        ("node_modules/x/index.js", ""),
        ("src/main.rs", ""),
    ]);
    let t = tree(&dir);
    // The example of docker's COPY reference.
    let s = select(&t, &["hom*"], &["*.txt"]).unwrap();
    assert_eq!(selected(&s), ["home.md", "homework.rs"]);
    let s = select(&t, &["hom*"], &["*.txt", "*.md"]).unwrap();
    assert_eq!(selected(&s), ["homework.rs"]);
    // Inside a copied directory, patterns also apply from that directory.
    let s = select(&t, &["docs"], &["*.md", "!keep.md"]).unwrap();
    assert_eq!(selected(&s), ["docs", "docs/b.rs", "docs/keep.md"]);
    let s = select(&t, &["."], &["node_modules", "docs/*.md"]).unwrap();
    assert_eq!(
        selected(&s),
        ["", "docs", "docs/b.rs", "home.md", "home.txt", "homework.rs", "src", "src/main.rs"]
    );
    let s = select(&t, &["*"], &["node_modules"]).unwrap();
    assert!(!selected(&s).iter().any(|p| p.starts_with("node_modules")));
    let err = select(&t, &["."], &["["]).unwrap_err();
    assert!(matches!(err, ContextError::BadExcludePattern { ref pattern, .. } if pattern == "["));
}

#[test]
fn dotdot_may_not_leave_the_root() {
    let dir = context(&[("a/b.txt", ""), ("c.txt", "")]);
    let t = tree(&dir);
    for operand in ["..", "../x", "a/../../c.txt", "/../c.txt"] {
        let err = select(&t, &[operand], &[]).unwrap_err();
        assert!(
            matches!(err, ContextError::OutsideRoot { operand: ref o, .. } if o == operand),
            "{operand}: {err}"
        );
    }
    // Staying inside is fine, and a leading slash changes nothing.
    let s = select(&t, &["a/../c.txt", "/a/b.txt"], &[]).unwrap();
    assert_eq!(selected(&s), ["c.txt", "a/b.txt"]);
}

#[test]
fn symlinks_leading_out_are_errors() {
    let outside = context(&[("secret", "s"), ("dir/file", "f")]);
    let dir = context(&[("real/file.txt", "x"), ("top.txt", "t")]);
    let root = dir.path();
    symlink(outside.path().join("secret"), root.join("abs-out")).unwrap();
    symlink("../../outside", root.join("real/rel-out")).unwrap();
    symlink(outside.path().join("dir"), root.join("dir-out")).unwrap();
    let t = tree(&dir);
    for operand in ["abs-out", "real/rel-out", "dir-out/file", "dir-out/*"] {
        let err = select(&t, &[operand], &[]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ContextError::OutsideRoot { .. }), "{operand}: {message}");
        assert!(message.contains(operand), "{message}");
    }
}

#[test]
fn symlinks_inside_are_followed_as_operands_and_kept_inside_directories() {
    let dir = context(&[("real/file.txt", "content"), ("real/sub/x", "")]);
    let root = dir.path();
    symlink("real", root.join("alias")).unwrap();
    symlink("file.txt", root.join("real/link.txt")).unwrap();
    symlink(root.join("real/file.txt"), root.join("abs-in")).unwrap();
    symlink("loop", root.join("loop")).unwrap();
    let t = tree(&dir);

    // The operand is followed: a link to a file selects the file.
    let s = select(&t, &["real/link.txt"], &[]).unwrap();
    assert_eq!(s.items[0].rel, "real/link.txt");
    assert_eq!(s.items[0].entry.kind, EntryKind::File);
    assert_eq!(s.items[0].entry.rel, "real/file.txt");
    // An absolute link into the context itself is inside.
    let s = select(&t, &["abs-in"], &[]).unwrap();
    assert_eq!(s.items[0].entry.rel, "real/file.txt");
    // A link to a directory selects the directory, through which paths resolve too.
    let s = select(&t, &["alias"], &[]).unwrap();
    assert_eq!(s.items[0].entry.kind, EntryKind::Dir);
    let s = select(&t, &["alias/file.txt"], &[]).unwrap();
    assert_eq!(s.items[0].entry.size, 7);
    // Inside a copied directory a symlink stays a symlink.
    let s = select(&t, &["real"], &[]).unwrap();
    let link = s.entries().find(|e| e.name == "link.txt").unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(link.link_target.as_deref(), Some(Path::new("file.txt")));
    // A loop is an error, not a hang.
    assert!(matches!(select(&t, &["loop"], &[]), Err(ContextError::SymlinkLoop { .. })));
}

#[test]
fn ignored_symlinks_and_targets_are_absent() {
    let dir = context(&[(".dockerignore", "hidden\nlink\n"), ("hidden/f", ""), ("shown/f", "")]);
    symlink("hidden", dir.path().join("to-hidden")).unwrap();
    symlink("shown", dir.path().join("link")).unwrap();
    let t = tree(&dir);
    assert!(matches!(select(&t, &["to-hidden/f"], &[]), Err(ContextError::NotFound { .. })));
    assert!(matches!(select(&t, &["link/f"], &[]), Err(ContextError::NotFound { .. })));
}

#[test]
fn rootfs_reads_absolute_links_from_its_own_root() {
    let dir = context(&[("usr/lib/libc.so.6", "elf"), ("etc/", "")]);
    symlink("/usr/lib", dir.path().join("lib")).unwrap();
    symlink("../../../usr/lib/libc.so.6", dir.path().join("etc/libc")).unwrap();
    let t = SourceTree::rootfs(dir.path(), "stage builder").unwrap();
    let s = t.select(&strings(&["/lib/libc.so.6", "/etc/libc"]), &[]).unwrap();
    assert_eq!(selected(&s), ["usr/lib/libc.so.6", "usr/lib/libc.so.6"]);
    let err = t.select(&strings(&["/nope"]), &[]).unwrap_err();
    assert!(err.to_string().contains("stage builder"), "{err}");
}

#[test]
fn metadata_is_recorded() {
    use std::os::unix::fs::PermissionsExt;
    let dir = context(&[("tool", "#!/bin/sh\n")]);
    std::fs::set_permissions(dir.path().join("tool"), std::fs::Permissions::from_mode(0o4755))
        .unwrap();
    let t = tree(&dir);
    let s = select(&t, &["tool"], &[]).unwrap();
    let e = &s.items[0].entry;
    assert_eq!(e.mode, 0o4755);
    assert_eq!(e.size, 10);
    assert_eq!(e.uid, nix::unistd::getuid().as_raw());
    assert_eq!(e.gid, nix::unistd::getgid().as_raw());
}
