//! The differential conformance suite: docker (BuildKit) is the oracle.
//!
//! Each case under `tests/conformance/cases/<name>/` is a Dockerfile and its context (the
//! directory, less `case.toml`), built by docker and by ferry from the same files on the
//! same real bases (see `bases.rs`), then compared: the root filesystem, the config, the
//! layers and history (see `compare.rs`). A case docker rejects must be rejected by ferry,
//! naming the line. `tests/conformance/deviations.toml` lists the cases where ferry differs
//! on purpose, each with its reason; docs/CONFORMANCE.md is the table a reader sees.
//!
//! `FERRY_CONFORMANCE_CASES=substring` runs only the matching cases;
//! `FERRY_CONFORMANCE_JOBS` (default 2) is how many cases build at once.

mod bases;
#[path = "../common/mod.rs"]
mod common;
mod compare;
mod image;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use bases::Bases;

/// `case.toml`: how a case is built. Everything is optional.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct CaseSpec {
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    args: BTreeMap<String, String>,
    target: Option<String>,
    /// A `sh -e` script run in the context copy before both builds, for what git cannot
    /// hold: empty directories, hard links, modes, owners, tarballs.
    setup: Option<String>,
    /// `RUN --mount=type=secret` ids → files of the case directory.
    #[serde(default)]
    secrets: BTreeMap<String, String>,
    /// docker rejects the Dockerfile; ferry must too.
    #[serde(default)]
    reject: bool,
    /// The Dockerfile line the rejection is about.
    reject_line: Option<usize>,
}

struct Case {
    name: String,
    dir: PathBuf,
    spec: CaseSpec,
}

#[derive(Debug)]
enum Outcome {
    Agree,
    Differ(Vec<String>),
    /// ferry failed where docker built, or accepted what docker rejected.
    FerryFailed(String),
    /// docker failed where the case says it builds: the case is broken, not ferry.
    BrokenCase(String),
}

/// The context files' mtime before `setup` runs: an old, fixed time, so that "kept the
/// context's mtime" is tellable from "stamped the build's time".
const CONTEXT_MTIME: i64 = 1_612_325_106; // 2021-02-03T04:05:06Z

struct Env {
    /// When the suite began, before docker built anything (seconds since 1970).
    started: i64,
    bases: Bases,
    ferry: common::Ferry,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let started = now() - 1;
        Env { started, bases: Bases::prepare(), ferry: common::Ferry::new() }
    })
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/cases")
}

fn load_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(cases_dir()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("Dockerfile").is_file() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let spec = match std::fs::read_to_string(dir.join("case.toml")) {
            Ok(text) => toml::from_str(&text).unwrap_or_else(|e| panic!("{name}/case.toml: {e}")),
            Err(_) => CaseSpec::default(),
        };
        cases.push(Case { name, dir, spec });
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

/// Copy the case's context (all but case.toml), stamp the old mtime, run its setup.
fn prepare_context(case: &Case, ctx: &Path) -> Result<(), String> {
    common::fixture::copy_dir(&case.dir, ctx);
    let _ = std::fs::remove_file(ctx.join("case.toml"));
    for entry in walkdir::WalkDir::new(ctx).contents_first(true) {
        let entry = entry.map_err(|e| e.to_string())?;
        let t = filetime::FileTime::from_unix_time(CONTEXT_MTIME, 0);
        filetime::set_symlink_file_times(entry.path(), t, t).map_err(|e| e.to_string())?;
    }
    if let Some(setup) = &case.spec.setup {
        let out = Command::new("sh").args(["-ec", setup]).current_dir(ctx).output().unwrap();
        if !out.status.success() {
            return Err(format!("setup failed: {}", common::stderr(&out)));
        }
        // What setup made or changed gets the context's mtime too (a date it set itself,
        // always older, stays): only docker's own build times are newer than the suite.
        let started = env().started;
        for entry in walkdir::WalkDir::new(ctx).contents_first(true) {
            let entry = entry.map_err(|e| e.to_string())?;
            let meta = entry.path().symlink_metadata().map_err(|e| e.to_string())?;
            if filetime::FileTime::from_last_modification_time(&meta).unix_seconds() >= started {
                let t = filetime::FileTime::from_unix_time(CONTEXT_MTIME, 0);
                filetime::set_symlink_file_times(entry.path(), t, t).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn run_case(case: &Case) -> Outcome {
    let env = env();
    let work = tempfile::tempdir().unwrap();
    let proj = work.path().join("proj");
    let ctx = proj.join("ctx");
    if let Err(e) = prepare_context(case, &ctx) {
        return Outcome::BrokenCase(e);
    }
    // docker 20.10 reuses a WORKDIR's mkdir of an earlier case (even with --no-cache), with
    // that case's time: anything newer than the suite's start is a build time.
    let build_start = env.started;

    let docker_tar = work.path().join("docker.tar");
    let docker_result = docker_build(case, &ctx, &docker_tar);
    let ferry_tar = work.path().join("ferry.tar");
    let ferry_result = ferry_build(case, &proj, &ferry_tar, &env.bases.registry.host);

    if case.spec.reject {
        return match (docker_result, ferry_result) {
            (Ok(()), _) => Outcome::BrokenCase("docker built a case marked reject".into()),
            (Err(_), Ok(())) => Outcome::FerryFailed("ferry built what docker rejects".into()),
            (Err(_), Err(ferry_err)) => match case.spec.reject_line {
                Some(line) if !names_line(&ferry_err, line) => Outcome::FerryFailed(format!(
                    "ferry rejected it without naming Dockerfile line {line}:\n{ferry_err}"
                )),
                _ => Outcome::Agree,
            },
        };
    }
    if let Err(e) = docker_result {
        return Outcome::BrokenCase(e);
    }
    if let Err(e) = ferry_result {
        return Outcome::FerryFailed(e);
    }
    let docker = match image::read_archive(&docker_tar) {
        Ok(i) => i,
        Err(e) => return Outcome::BrokenCase(format!("reading docker's image: {e}")),
    };
    let ferry = match image::read_archive(&ferry_tar) {
        Ok(i) => i,
        Err(e) => return Outcome::FerryFailed(format!("reading ferry's image: {e}")),
    };
    let diffs = compare::compare(&docker, &ferry, build_start);
    if diffs.is_empty() {
        Outcome::Agree
    } else {
        Outcome::Differ(diffs)
    }
}

/// An error names the line as `Dockerfile:LINE` (miette's file:line:column) or `line LINE`.
fn names_line(text: &str, line: usize) -> bool {
    text.contains(&format!("Dockerfile:{line}:"))
        || text.contains(&format!("Dockerfile:{line}\n"))
        || text.contains(&format!("Dockerfile:{line} "))
        || text.contains(&format!("line {line}"))
}

fn docker_build(case: &Case, ctx: &Path, out: &Path) -> Result<(), String> {
    let cli = &env().bases.docker;
    let tag = format!("ferry-conformance/{}:latest", case.name);
    // --no-cache: a layer docker cached in an earlier run keeps that run's mtimes, which the
    // mtime rule would take for the context's.
    let mut args: Vec<String> = vec![
        "build".into(),
        "--no-cache".into(),
        "--network".into(),
        "host".into(),
        "-t".into(),
        tag.clone(),
    ];
    for (k, v) in &case.spec.args {
        args.push("--build-arg".into());
        args.push(format!("{k}={v}"));
    }
    if let Some(t) = &case.spec.target {
        args.push("--target".into());
        args.push(t.clone());
    }
    for (id, file) in &case.spec.secrets {
        args.push("--secret".into());
        args.push(format!("id={id},src={}", ctx.join(file).display()));
    }
    args.push(ctx.to_string_lossy().into_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bases::docker(cli, &args)?;
    let saved = bases::docker(cli, &["save", "-o", &out.to_string_lossy(), &tag]);
    let _ = bases::docker(cli, &["rmi", &tag]);
    saved.map(|_| ())
}

fn ferry_build(case: &Case, proj: &Path, out: &Path, registry: &str) -> Result<(), String> {
    let mut toml =
        String::from("[project]\nname = \"conformance\"\n\n[images.case]\ncontext = \"ctx\"\n");
    if let Some(t) = &case.spec.target {
        toml.push_str(&format!("target = {t:?}\n"));
    }
    if !case.spec.args.is_empty() {
        let args: Vec<String> =
            case.spec.args.iter().map(|(k, v)| format!("{k:?} = {v:?}")).collect();
        toml.push_str(&format!("args = {{ {} }}\n", args.join(", ")));
    }
    toml.push_str(&format!("\n[registries.\"docker.io\"]\nmirrors = [\"http://{registry}\"]\n"));
    std::fs::write(proj.join("images.toml"), toml).unwrap();

    let mut cmd = env().ferry.command();
    // No epoch: outside git, ferry keeps mtimes as docker does.
    cmd.env_remove("SOURCE_DATE_EPOCH");
    cmd.arg("-C").arg(proj).arg("build").arg("--output").arg(format!("docker:{}", out.display()));
    for (id, file) in &case.spec.secrets {
        cmd.arg("--secret").arg(format!("id={id},src={}", proj.join("ctx").join(file).display()));
    }
    let output = cmd.output().unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(common::stderr(&output))
    }
}

/// `deviations.toml`: case name → why ferry differs from docker there on purpose.
fn deviations() -> BTreeMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Deviation {
        reason: String,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/deviations.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let table: BTreeMap<String, Deviation> =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    table.into_iter().map(|(k, v)| (k, v.reason)).collect()
}

/// Build `cases` with docker and ferry, `FERRY_CONFORMANCE_JOBS` at a time.
fn run_all(cases: &[Case]) -> Vec<Outcome> {
    let jobs: usize =
        std::env::var("FERRY_CONFORMANCE_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(2);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new((0..cases.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = cases.get(i) else { break };
                let outcome = run_case(case);
                eprintln!("conformance: {} {}", case.name, verdict(&outcome));
                results.lock().unwrap()[i] = Some(outcome);
            });
        }
    });
    results.into_inner().unwrap().into_iter().map(Option::unwrap).collect()
}

fn verdict(o: &Outcome) -> &'static str {
    match o {
        Outcome::Agree => "agrees",
        Outcome::Differ(_) => "DIFFERS",
        Outcome::FerryFailed(_) => "FERRY FAILED",
        Outcome::BrokenCase(_) => "BROKEN CASE",
    }
}

fn describe(case: &Case, o: &Outcome) -> String {
    let body = match o {
        Outcome::Agree => return String::new(),
        Outcome::Differ(d) => {
            let mut lines: Vec<String> = d.iter().take(12).map(|l| format!("    {l}")).collect();
            if d.len() > 12 {
                lines.push(format!("    … and {} more", d.len() - 12));
            }
            lines.join("\n")
        }
        // The end of a build log is where its error is.
        Outcome::FerryFailed(e) | Outcome::BrokenCase(e) => {
            let lines: Vec<&str> = e.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
        }
    };
    format!("  {} {}:\n{body}\n", case.name, verdict(o))
}

#[test]
fn ferry_builds_what_docker_builds() {
    let filter = std::env::var("FERRY_CONFORMANCE_CASES").unwrap_or_default();
    let cases: Vec<Case> = load_cases().into_iter().filter(|c| c.name.contains(&filter)).collect();
    let outcomes = run_all(&cases);
    let deviations = deviations();

    let mut report = String::new();
    let mut problems = Vec::new();
    let agreeing = outcomes.iter().filter(|o| matches!(o, Outcome::Agree)).count();
    for (case, outcome) in cases.iter().zip(&outcomes) {
        report.push_str(&describe(case, outcome));
        match (outcome, deviations.get(&case.name)) {
            (Outcome::BrokenCase(_), _) => {
                problems.push(format!("{}: the case is broken", case.name))
            }
            (Outcome::Agree, Some(_)) => {
                problems.push(format!("{}: agrees now; remove it from deviations.toml", case.name))
            }
            (Outcome::Agree, None) | (_, Some(_)) => {}
            (_, None) => problems.push(format!("{}: differs from docker", case.name)),
        }
    }
    let summary = format!("{agreeing} of {} cases agree with docker", cases.len());
    eprintln!("conformance: {summary}\n{report}");
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-report.txt"),
        &report,
    );
    if filter.is_empty() {
        assert!(
            cases.len() >= 100,
            "the suite must keep at least 100 cases; it has {}",
            cases.len()
        );
        assert!(
            agreeing * 100 >= cases.len() * 97,
            "ferry must agree with docker on at least 97% of the cases: {summary}"
        );
        let docs = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFORMANCE.md"),
        )
        .unwrap_or_default();
        for name in deviations.keys() {
            if !docs.contains(&format!("`{name}`")) {
                problems.push(format!(
                    "{name}: in deviations.toml but not in docs/CONFORMANCE.md's table"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{summary}\n{}\n\n{report}", problems.join("\n"));
}

/// One case by name, as its own test: the acceptance cases for each real base.
fn assert_case_agrees(name: &str) {
    let case = load_cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let outcome = run_case(&case);
    assert!(matches!(outcome, Outcome::Agree), "{}", describe(&case, &outcome));
}

#[test]
fn on_a_debootstrapped_debian_run_path_copy_and_gzip_work_as_in_docker() {
    assert_case_agrees("base-debian-run-path-copy-gzip");
}

#[test]
fn on_a_docker_built_busybox_run_path_copy_and_gzip_work_as_in_docker() {
    assert_case_agrees("base-busybox-run-path-copy-gzip");
}

#[test]
fn on_a_base_without_path_or_workdir_run_path_copy_and_gzip_work_as_in_docker() {
    assert_case_agrees("base-bare-run-path-copy-gzip");
}
