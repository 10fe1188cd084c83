//! One test per images.toml validation error: the message, and the line and column reported.

use std::path::Path;

use ferry::diagnostic::SourceFile;
use ferry::graph::{Graph, GraphError};
use ferry::manifest::Manifest;

/// A project directory with a Dockerfile per listed context.
fn project(contexts: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (ctx, dockerfile) in contexts {
        std::fs::create_dir_all(dir.path().join(ctx)).unwrap();
        std::fs::write(dir.path().join(ctx).join("Dockerfile"), dockerfile).unwrap();
    }
    dir
}

/// (line, column, message) of every problem, in file order.
fn problems(root: &Path, toml: &str) -> Vec<(usize, usize, String)> {
    let err = Manifest::from_source(SourceFile::new("images.toml", toml), root).unwrap_err();
    err.problems().iter().map(|p| (p.line, p.column, p.message.clone())).collect()
}

fn one_problem(root: &Path, toml: &str) -> (usize, usize, String, Option<String>) {
    let err = Manifest::from_source(SourceFile::new("images.toml", toml), root).unwrap_err();
    let ps = err.problems();
    assert_eq!(ps.len(), 1, "expected one problem, got {ps:#?}");
    (ps[0].line, ps[0].column, ps[0].message.clone(), ps[0].help.clone())
}

const HEAD: &str = "[project]\nname = \"acme\"\n";

#[test]
fn unknown_key_with_suggestion() {
    let dir = project(&[("a", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontxt = \"a\"\ncontext = \"a\"\n");
    let (line, col, msg, help) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (5, 1));
    assert_eq!(msg, "unknown key `contxt` in [images.a]");
    assert_eq!(help.as_deref(), Some("did you mean `context`?"));
}

#[test]
fn unknown_top_level_and_nested_keys_are_all_reported() {
    let dir = project(&[("a", "FROM scratch\n")]);
    let toml = format!(
        "{HEAD}flavour = 1\n\n[images.a]\ncontext = \"a\"\n\n[environments.dev]\nregistry = \"localhost:5000\"\nimutable = true\n\n[registries.\"localhost:5000\"]\ninsecure = true\nmirror = []\n"
    );
    let ps = problems(dir.path(), &toml);
    assert_eq!(
        ps,
        vec![
            (3, 1, "unknown key `flavour` in [project]".to_string()),
            (10, 1, "unknown key `imutable` in [environments.dev]".to_string()),
            (14, 1, "unknown key `mirror` in [registries.\"localhost:5000\"]".to_string()),
        ]
    );
}

#[test]
fn unknown_top_level_key() {
    let dir = project(&[]);
    let (line, col, msg, help) = one_problem(dir.path(), &format!("imgs = 1\n{HEAD}"));
    assert_eq!((line, col), (1, 1));
    assert_eq!(msg, "unknown key `imgs` at the top level");
    assert_eq!(help.as_deref(), Some("did you mean `images`?"));
}

#[test]
fn invalid_semver() {
    let dir = project(&[("a", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\nversion = \"1.2\"\n");
    let (line, col, msg, help) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (6, 11));
    assert!(msg.starts_with("image `a`: `1.2` is not a semantic version"), "{msg}");
    assert!(help.unwrap().contains("MAJOR.MINOR.PATCH"));
}

#[test]
fn missing_context_directory() {
    let dir = project(&[]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"nowhere\"\n");
    let (line, col, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (5, 11));
    assert_eq!(msg, "image `a`: context directory `nowhere` does not exist");
}

#[test]
fn missing_dockerfile() {
    let dir = project(&[("a", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\ndockerfile = \"Dockerfile.prod\"\n");
    let (line, col, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (6, 14));
    assert_eq!(msg, "image `a`: Dockerfile `a/Dockerfile.prod` does not exist");
}

#[test]
fn unknown_image_in_depends_on() {
    let dir = project(&[("a", "FROM scratch\n"), ("b", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.api]\ncontext = \"a\"\n\n[images.migrations]\ncontext = \"b\"\ndepends_on = [\"api\", \"migration\"]\n");
    let (line, col, msg, help) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (9, 22));
    assert_eq!(
        msg,
        "image `migrations` depends on `migration`, which is not an image of this manifest"
    );
    assert_eq!(help.as_deref(), Some("did you mean `migrations`?"));
}

#[test]
fn unknown_environment_in_promote_from() {
    let dir = project(&[]);
    let toml = format!("{HEAD}\n[environments.staging]\nregistry = \"r.example.com/s\"\n\n[environments.prod]\nregistry = \"r.example.com/p\"\npromote_from = \"stagin\"\n");
    let (line, col, msg, help) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (9, 16));
    assert_eq!(
        msg,
        "environment `prod` promotes from `stagin`, which is not an environment of this manifest"
    );
    assert_eq!(help.as_deref(), Some("did you mean `staging`?"));
}

#[test]
fn two_images_with_one_repository() {
    let dir = project(&[("a", "FROM scratch\n"), ("b", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\nrepository = \"acme/shared\"\n\n[images.b]\ncontext = \"b\"\nrepository = \"acme/shared\"\n");
    let (line, col, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (10, 14));
    assert_eq!(msg, "images `a` and `b` have the same repository `acme/shared`");
}

#[test]
fn default_repository_clash_is_caught_too() {
    let dir = project(&[("a", "FROM scratch\n"), ("b", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.api]\ncontext = \"a\"\n\n[images.b]\ncontext = \"b\"\nrepository = \"acme/api\"\n");
    let (line, col, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (9, 14));
    assert_eq!(msg, "images `api` and `b` have the same repository `acme/api`");
}

#[test]
fn invalid_repository_name() {
    let dir = project(&[("a", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\nrepository = \"Acme/API\"\n");
    let (line, col, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (6, 14));
    assert!(msg.starts_with("image `a`: invalid repository `Acme/API`"), "{msg}");
}

#[test]
fn invalid_registry_name() {
    let dir = project(&[]);
    let toml = format!("{HEAD}\n[environments.dev]\nregistry = \"https://r.example.com\"\n");
    let (line, col, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (5, 12));
    assert!(
        msg.starts_with("environment `dev`: invalid registry `https://r.example.com`"),
        "{msg}"
    );

    let toml = format!("{HEAD}\n[registries.\"bad host!\"]\ninsecure = true\n");
    let (line, col, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (4, 13));
    assert!(msg.starts_with("invalid registry host `bad host!`"), "{msg}");
}

#[test]
fn invalid_tag_template() {
    let dir = project(&[]);
    let toml = format!("{HEAD}\n[environments.dev]\nregistry = \"localhost:5000\"\ntags = [\"dev\", \"{{verison}}\"]\n");
    let (line, col, msg, help) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (6, 16));
    assert_eq!(msg, "tag template `{verison}` uses unknown placeholder `{verison}`");
    assert_eq!(help.as_deref(), Some("did you mean `{version}`?"));
}

#[test]
fn toml_syntax_error() {
    let dir = project(&[]);
    let toml = format!("{HEAD}\n[images.a\ncontext = \"a\"\n");
    let (line, _, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!(line, 4);
    assert!(msg.starts_with("TOML syntax"), "{msg}");
}

#[test]
fn wrong_type_is_reported_with_its_place() {
    let dir = project(&[("a", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\nversion = 2\n");
    let (line, col, msg, _) = one_problem(dir.path(), &toml);
    assert_eq!((line, col), (6, 11));
    assert!(msg.contains("string"), "{msg}");
}

#[test]
fn many_problems_are_reported_together() {
    let dir = project(&[("a", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\nversion = \"x\"\ndepends_on = [\"zzz\"]\n\n[images.b]\ncontext = \"missing\"\n");
    let ps = problems(dir.path(), &toml);
    assert_eq!(ps.iter().map(|p| p.0).collect::<Vec<_>>(), vec![6, 7, 10]);
}

fn graph_problems(dir: &Path, toml: &str) -> Vec<(usize, usize, String)> {
    let m = Manifest::from_source(SourceFile::new("images.toml", toml), dir).unwrap();
    match Graph::build(&m, &Default::default()) {
        Err(GraphError::Manifest(ps)) => {
            ps.iter().map(|p| (p.line, p.column, p.message.clone())).collect()
        }
        other => panic!("expected manifest problems, got {other:?}"),
    }
}

#[test]
fn dependency_cycle_is_spelled_out() {
    let dir = project(&[("a", "FROM b\n"), ("b", "FROM scratch\nCOPY --from=a / /\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\n\n[images.b]\ncontext = \"b\"\n");
    assert_eq!(
        graph_problems(dir.path(), &toml),
        vec![(4, 9, "dependency cycle: a → b → a".to_string())]
    );
}

#[test]
fn longer_cycle_through_depends_on_and_repository() {
    let dir = project(&[("a", "FROM acme/c:1.0\n"), ("b", "FROM a\n"), ("c", "FROM scratch\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\n\n[images.b]\ncontext = \"b\"\n\n[images.c]\ncontext = \"c\"\ndepends_on = [\"b\"]\n");
    assert_eq!(
        graph_problems(dir.path(), &toml),
        vec![(4, 9, "dependency cycle: a → b → c → a".to_string())]
    );
}

#[test]
fn unknown_target_stage() {
    let dir = project(&[("a", "FROM scratch AS build\nFROM scratch AS final\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\ntarget = \"fina\"\n");
    assert_eq!(
        graph_problems(dir.path(), &toml),
        vec![(4, 9, "image `a`: target stage `fina` is not in a/Dockerfile".to_string())]
    );
}

#[test]
fn dockerfile_syntax_error_names_file_and_line() {
    let dir = project(&[("a", "FROM scratch\nCOPY onlyone\n")]);
    let toml = format!("{HEAD}\n[images.a]\ncontext = \"a\"\n");
    let m = Manifest::from_source(SourceFile::new("images.toml", toml), dir.path()).unwrap();
    let err = Graph::build(&m, &Default::default()).unwrap_err();
    assert!(err.to_string().starts_with("a/Dockerfile:2:"), "{err}");
}

#[test]
fn source_date_epoch_takes_seconds_git_or_none() {
    use ferry::manifest::EpochSetting;
    let dir = project(&[]);
    let setting = |value: &str| {
        let toml = format!("[project]\nname = \"acme\"\n{value}\n");
        let m = Manifest::from_source(SourceFile::new("images.toml", toml), dir.path()).unwrap();
        m.project.source_date_epoch
    };
    assert_eq!(setting(""), EpochSetting::Auto);
    assert_eq!(setting("source_date_epoch = 0"), EpochSetting::Seconds(0));
    assert_eq!(setting("source_date_epoch = 1700000000"), EpochSetting::Seconds(1_700_000_000));
    assert_eq!(setting("source_date_epoch = \"git\""), EpochSetting::Git);
    assert_eq!(setting("source_date_epoch = \"none\""), EpochSetting::Unset);
    for bad in ["\"today\"", "-1"] {
        let toml = format!("{HEAD}source_date_epoch = {bad}\n");
        let (line, col, msg, _) = one_problem(dir.path(), &toml);
        assert_eq!(
            (line, col, msg.as_str()),
            (3, 21, "source_date_epoch must be \"git\", \"none\" or a non-negative integer"),
            "{bad}"
        );
    }
}
