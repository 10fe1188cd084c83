//! Cases ported from moby's patternmatcher and ignorefile test suites (the facts docker's
//! behaviour is pinned by), plus the loading rules of the Dockerfile-specific ignore file.

use super::*;

fn excluded(patterns: &[&str], path: &str) -> bool {
    IgnoreMatcher::new(patterns)
        .unwrap_or_else(|(i, e)| panic!("pattern {:?}: {e}", patterns[i]))
        .matches(path)
}

fn kind(pattern: &str) -> &'static str {
    match compile(pattern).unwrap().clone() {
        MatchKind::Exact(_) => "exact",
        MatchKind::Prefix(_) => "prefix",
        MatchKind::Suffix(_) => "suffix",
        MatchKind::Regex(_) => "regex",
    }
}

#[test]
fn single_pattern_table() {
    let cases: &[(&str, &str, bool)] = &[
        ("**", "file", true),
        ("**", "file/", true),
        ("**/", "file", true),
        ("**/", "file/", true),
        ("**", "/", true),
        ("**/", "/", true),
        ("**", "dir/file", true),
        ("**/", "dir/file", true),
        ("**", "dir/file/", true),
        ("**/", "dir/file/", true),
        ("**/**", "dir/file", true),
        ("**/**", "dir/file/", true),
        ("dir/**", "dir/file", true),
        ("dir/**", "dir/file/", true),
        ("dir/**", "dir/dir2/file", true),
        ("dir/**", "dir/dir2/file/", true),
        ("**/dir", "dir", true),
        ("**/dir", "dir/file", true),
        ("**/dir2/*", "dir/dir2/file", true),
        ("**/dir2/*", "dir/dir2/file/", true),
        ("**/dir2/**", "dir/dir2/dir3/file", true),
        ("**/dir2/**", "dir/dir2/dir3/file/", true),
        ("**file", "file", true),
        ("**file", "dir/file", true),
        ("**/file", "dir/file", true),
        ("**file", "dir/dir/file", true),
        ("**/file", "dir/dir/file", true),
        ("**/file*", "dir/dir/file", true),
        ("**/file*", "dir/dir/file.txt", true),
        ("**/file*txt", "dir/dir/file.txt", true),
        ("**/file*.txt", "dir/dir/file.txt", true),
        ("**/file*.txt*", "dir/dir/file.txt", true),
        ("**/**/*.txt", "dir/dir/file.txt", true),
        ("**/**/*.txt2", "dir/dir/file.txt", false),
        ("**/*.txt", "file.txt", true),
        ("**/**/*.txt", "file.txt", true),
        ("a**/*.txt", "a/file.txt", true),
        ("a**/*.txt", "a/dir/file.txt", true),
        ("a**/*.txt", "a/dir/dir/file.txt", true),
        ("a/*.txt", "a/dir/file.txt", false),
        ("a/*.txt", "a/file.txt", true),
        ("a/*.txt**", "a/file.txt", true),
        ("a[b-d]e", "ae", false),
        ("a[b-d]e", "ace", true),
        ("a[b-d]e", "aae", false),
        ("a[^b-d]e", "aze", true),
        (".*", ".foo", true),
        (".*", "foo", false),
        ("abc.def", "abcdef", false),
        ("abc.def", "abc.def", true),
        ("abc.def", "abcZdef", false),
        ("abc?def", "abcZdef", true),
        ("abc?def", "abcdef", false),
        ("a\\\\", "a\\", true),
        ("**/foo/bar", "foo/bar", true),
        ("**/foo/bar", "dir/foo/bar", true),
        ("**/foo/bar", "dir/dir2/foo/bar", true),
        ("abc/**", "abc", false),
        ("abc/**", "abc/def", true),
        ("abc/**", "abc/def/ghi", true),
        ("**/.foo", ".foo", true),
        ("**/.foo", "bar.foo", false),
        ("a(b)c/def", "a(b)c/def", true),
        ("a(b)c/def", "a(b)c/xyz", false),
        ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
        (
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            true,
        ),
        ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", true),
        ("a\\*b", "a*b", true),
    ];
    for (pattern, path, want) in cases {
        assert_eq!(excluded(&[pattern], path), *want, "pattern {pattern:?} on {path:?}");
    }
}

#[test]
fn multi_pattern_table() {
    let cases: &[(&[&str], &str, bool)] = &[
        (&["**", "!util/docker/web"], "util/docker/web/foo", false),
        (&["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", true),
        (
            &["**", "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"],
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            false,
        ),
        (&["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", false),
    ];
    for (patterns, path, want) in cases {
        assert_eq!(excluded(patterns, path), *want, "patterns {patterns:?} on {path:?}");
    }
}

#[test]
fn exceptions_in_order_last_match_wins() {
    assert!(excluded(&["*"], "fileutils.go"));
    assert!(excluded(&["*.go"], "fileutils.go"));
    // An exception before the pattern it would override does nothing.
    assert!(excluded(&["!fileutils.go", "*.go"], "fileutils.go"));
    assert!(!excluded(&["*.go", "!fileutils.go"], "fileutils.go"));
    // A folder pattern followed by an exception for a file inside it.
    assert!(!excluded(&["docs", "!docs/README.md"], "docs/README.md"));
    assert!(!excluded(&["docs/", "!docs/README.md"], "docs/README.md"));
    assert!(!excluded(&["docs/*", "!docs/README.md"], "docs/README.md"));
    assert!(excluded(&["docs", "!docs/README.md"], "docs/other.md"));
    // Excluding a directory excludes everything below it, at any depth.
    assert!(excluded(&["node_modules"], "node_modules/a/b/c.js"));
    assert!(!excluded(&["node_modules"], "src/node_modules_x"));
    // The root is never excluded.
    assert!(!excluded(&["*.go"], "."));
    assert!(!excluded(&[], "any/path/there"));
}

#[test]
fn bad_patterns_are_errors() {
    for bad in [
        "!",
        "[",
        "[^",
        "[^bc",
        "a[",
        "[]a]",
        "[-]",
        "[x-]",
        "[-x]",
        "\\",
        "[a-b-c]",
        "[z-a]",
        "[Local-Only]/",
    ] {
        assert!(IgnoreMatcher::new(&[bad]).is_err(), "{bad:?} must be rejected");
    }
    // Whitespace is trimmed before the `!` is looked at, and empty patterns are skipped.
    let m = IgnoreMatcher::new(&["docs", "  !docs/README.md  ", ""]).unwrap();
    assert_eq!(m.patterns().len(), 2);
    assert!(m.has_exceptions());
    assert_eq!(m.patterns()[1].text(), "docs/README.md");
}

#[test]
fn match_kinds_follow_moby() {
    for (pattern, want) in [
        ("*", "regex"),
        ("file*", "regex"),
        ("a*/b", "regex"),
        ("**", "suffix"),
        ("**/**", "regex"),
        ("dir/**", "prefix"),
        ("**/dir", "suffix"),
        ("**/dir2/*", "regex"),
        ("**file", "suffix"),
        ("**/file*txt", "regex"),
        ("a[b-d]e", "regex"),
        (".*", "regex"),
        ("abc.def", "exact"),
        ("abc?def", "regex"),
        ("**/foo/bar", "suffix"),
        ("a(b)c/def", "exact"),
        ("a.|)$(}+{bc", "exact"),
    ] {
        assert_eq!(kind(pattern), want, "{pattern:?}");
    }
    // The kinds matter: a suffix pattern matches inside a name, the regex form would not.
    assert!(excluded(&["**file"], "dir/myfile"));
    assert!(!excluded(&["**/file*txt"], "dir/myfiletxt"));
}

#[test]
fn classes_mean_what_go_says() {
    // Characters that are operators inside a regular-expression class stay literal.
    assert!(excluded(&["[[]x"], "[x"));
    assert!(excluded(&["a[&-&]b*"], "a&bc"));
    assert!(!excluded(&["a[&-&]b*"], "a-bc"));
    assert!(excluded(&["[\\]a]"], "]"));
    // A literal `^` outside a class is just a character.
    assert!(excluded(&["a^b*"], "a^bc"));
}

#[test]
fn reader_rules() {
    let text =
        "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! ";
    // `!` alone is kept by the reader and rejected by the matcher, as docker does.
    let err = IgnoreFile::parse(text, Some(Path::new("ctx/.dockerignore"))).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("ctx/.dockerignore"), "{message}");
    assert!(message.contains(".dockerignore:8:"), "{message}");

    let text = "\u{feff}test1\r\n/test2\n/a/file/here\n\n  lastfile  \n# this is a comment\n! /inverted/abs/path\n  # not a comment\n./x/../y/\n/\n";
    let file = IgnoreFile::parse(text, None).unwrap();
    assert_eq!(
        file.patterns,
        [
            "test1",
            "test2",
            "a/file/here",
            "lastfile",
            "!inverted/abs/path",
            "# not a comment",
            "y",
            "/"
        ]
    );
    assert_eq!(file.lines, [1, 2, 3, 5, 7, 8, 9, 10]);
    assert!(file.excludes("test2"));
    assert!(file.excludes("a/file/here/below"));
    assert!(!file.excludes("inverted/abs/path"));
}

#[test]
fn reinclusion_below_a_directory_is_detected() {
    let m = IgnoreMatcher::new(&["docs", "!docs/README.md"]).unwrap();
    assert!(m.may_reinclude_below("docs"));
    assert!(!m.may_reinclude_below("src"));
    let m = IgnoreMatcher::new(&["docs", "!**/*.md"]).unwrap();
    assert!(m.may_reinclude_below("anything"));
    let m = IgnoreMatcher::new(&["docs"]).unwrap();
    assert!(!m.may_reinclude_below("docs"));
}

#[test]
fn dockerfile_specific_ignore_file_takes_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path();
    std::fs::create_dir_all(ctx.join("build")).unwrap();
    std::fs::write(ctx.join(".dockerignore"), "generic\n").unwrap();
    std::fs::write(ctx.join("build/app.Dockerfile.dockerignore"), "specific\n").unwrap();

    let specific = IgnoreFile::load(ctx, Some(&ctx.join("build/app.Dockerfile"))).unwrap();
    assert_eq!(specific.patterns, ["specific"]);
    assert_eq!(
        specific.path.as_deref(),
        Some(ctx.join("build/app.Dockerfile.dockerignore").as_path())
    );
    // A relative Dockerfile path is taken relative to the context.
    let relative = IgnoreFile::load(ctx, Some(Path::new("build/app.Dockerfile"))).unwrap();
    assert_eq!(relative.patterns, ["specific"]);

    let generic = IgnoreFile::load(ctx, Some(&ctx.join("Dockerfile"))).unwrap();
    assert_eq!(generic.patterns, ["generic"]);
    let generic = IgnoreFile::load(ctx, None).unwrap();
    assert_eq!(generic.patterns, ["generic"]);

    std::fs::remove_file(ctx.join(".dockerignore")).unwrap();
    let none = IgnoreFile::load(ctx, None).unwrap();
    assert!(none.patterns.is_empty() && none.path.is_none());
    assert!(!none.excludes("anything"));
}
