use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;
use crate::context::SourceTree;

fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, content).unwrap();
    }
    dir
}

fn selection(dir: &tempfile::TempDir, sources: &[&str]) -> Selection {
    let tree = SourceTree::build_context(dir.path(), None).unwrap();
    let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
    tree.select(&sources, &[]).unwrap()
}

/// `(target, kind)` of every item, in order.
fn plan(items: &[CopyItem]) -> Vec<(String, CopyKind)> {
    items.iter().map(|i| (i.target.clone(), i.kind)).collect()
}

fn t(target: &str, kind: CopyKind) -> (String, CopyKind) {
    (target.to_string(), kind)
}

use CopyKind::{Dir, File, ParentDir, Symlink};

#[test]
fn several_sources_into_a_directory() {
    let dir = context(&[("a", "1"), ("b", "22")]);
    let items = map_to_destination(&selection(&dir, &["a", "b"]), "/dir/", "/").unwrap();
    assert_eq!(plan(&items), [t("/dir", ParentDir), t("/dir/a", File), t("/dir/b", File)]);
    assert_eq!(
        items[2].source.as_deref(),
        Some(dir.path().canonicalize().unwrap().join("b").as_path())
    );
    assert_eq!(items[2].size, 2);
    // Without the trailing slash each source is copied onto /dir in turn: the last wins.
    let items = map_to_destination(&selection(&dir, &["a", "b"]), "/dir", "/").unwrap();
    assert_eq!(plan(&items), [t("/dir", File)]);
    assert_eq!(items[0].size, 2);
    // A glob matching one file names the destination like a single source.
    let items = map_to_destination(&selection(&dir, &["[a]"]), "/renamed", "/").unwrap();
    assert_eq!(plan(&items), [t("/renamed", File)]);
}

#[test]
fn several_sources_without_a_slash_follow_buildkit() {
    let dir = context(&[("a", "1"), ("d/f", "2")]);
    // A directory source makes the destination a directory; a later file goes into it.
    let items = map_to_destination(&selection(&dir, &["d", "a"]), "/dest", "/").unwrap();
    assert_eq!(plan(&items), [t("/dest", Dir), t("/dest/a", File), t("/dest/f", File)]);
    // A directory onto the file an earlier source wrote is refused, as BuildKit's copier does.
    let err = map_to_destination(&selection(&dir, &["a", "d"]), "/dest", "/").unwrap_err();
    assert!(matches!(err, ContextError::DestinationNotDirectory { ref dest } if dest == "/dest"));
    assert!(err.to_string().contains("cannot copy a directory onto the file"), "{err}");
}

#[test]
fn a_directory_copies_its_contents() {
    let dir = context(&[("dir/f", ""), ("dir/sub/g", "")]);
    let items = map_to_destination(&selection(&dir, &["dir"]), "/x", "/").unwrap();
    assert_eq!(
        plan(&items),
        [t("/x", Dir), t("/x/f", File), t("/x/sub", Dir), t("/x/sub/g", File)]
    );
    // The destination directory takes the source directory's metadata only if it is new.
    assert!(items[0].keep_existing);
    assert!(!items[1].keep_existing);
    let same = map_to_destination(&selection(&dir, &["dir"]), "/x/", "/").unwrap();
    assert_eq!(plan(&same), plan(&items));
    // The whole context into the image root: no entry for `/` itself.
    let items = map_to_destination(&selection(&dir, &["."]), "/", "/").unwrap();
    assert_eq!(
        plan(&items),
        [t("/dir", Dir), t("/dir/f", File), t("/dir/sub", Dir), t("/dir/sub/g", File)]
    );
}

#[test]
fn a_file_keeps_its_name_only_in_a_directory() {
    let dir = context(&[("conf/app.conf", "x")]);
    let s = selection(&dir, &["conf/app.conf"]);
    let items = map_to_destination(&s, "/x/", "/").unwrap();
    assert_eq!(plan(&items), [t("/x", ParentDir), t("/x/app.conf", File)]);
    let items = map_to_destination(&s, "/x", "/").unwrap();
    assert_eq!(plan(&items), [t("/x", File)]);
    // An existing directory in the image counts as a directory destination.
    let items = map_to_destination_with(&s, "/etc", "/", &|p| p == "/etc").unwrap();
    assert_eq!(plan(&items), [t("/etc", ParentDir), t("/etc/app.conf", File)]);
}

#[test]
fn relative_destinations_use_the_workdir() {
    let dir = context(&[("f", "")]);
    let s = selection(&dir, &["f"]);
    let items = map_to_destination(&s, "rel/", "/app").unwrap();
    assert_eq!(
        plan(&items),
        [t("/app", ParentDir), t("/app/rel", ParentDir), t("/app/rel/f", File)]
    );
    let items = map_to_destination(&s, ".", "/app").unwrap();
    assert_eq!(plan(&items), [t("/app", ParentDir), t("/app/f", File)]);
    let items = map_to_destination(&s, "out", "/app/").unwrap();
    assert_eq!(plan(&items), [t("/app", ParentDir), t("/app/out", File)]);
    let items = map_to_destination(&s, "../up/", "/app/sub").unwrap();
    assert_eq!(plan(&items), [t("/app", ParentDir), t("/app/up", ParentDir), t("/app/up/f", File)]);
    // No WORKDIR means `/`.
    let items = map_to_destination(&s, "f2", "").unwrap();
    assert_eq!(plan(&items), [t("/f2", File)]);
}

#[test]
fn parents_are_listed_with_docker_defaults() {
    let dir = context(&[("f", "")]);
    let items = map_to_destination(&selection(&dir, &["f"]), "/a/b/c/f2", "/").unwrap();
    assert_eq!(
        plan(&items),
        [t("/a", ParentDir), t("/a/b", ParentDir), t("/a/b/c", ParentDir), t("/a/b/c/f2", File)]
    );
    for parent in &items[..3] {
        assert_eq!((parent.mode, parent.uid, parent.gid), (0o755, 0, 0));
        assert!(parent.source.is_none() && parent.keep_existing);
    }
}

#[test]
fn symlinks_are_copied_as_links_but_an_operand_is_followed() {
    let dir = context(&[("d/real.txt", "content")]);
    symlink("real.txt", dir.path().join("d/link.txt")).unwrap();
    let items = map_to_destination(&selection(&dir, &["d"]), "/x/", "/").unwrap();
    assert_eq!(plan(&items), [t("/x", Dir), t("/x/link.txt", Symlink), t("/x/real.txt", File)]);
    assert_eq!(items[1].link_target.as_deref(), Some(Path::new("real.txt")));
    let items = map_to_destination(&selection(&dir, &["d/link.txt"]), "/x/", "/").unwrap();
    assert_eq!(plan(&items), [t("/x", ParentDir), t("/x/link.txt", File)]);
    assert_eq!(items[1].size, 7);
}

#[test]
fn later_sources_win() {
    let dir = context(&[("one/f/inner", "dir in one"), ("two/f", "file in two")]);
    let items = map_to_destination(&selection(&dir, &["one", "two"]), "/x/", "/").unwrap();
    assert_eq!(plan(&items), [t("/x", Dir), t("/x/f", File)]);
    assert_eq!(items[1].size, 11);
}
