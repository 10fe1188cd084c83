//! `ferry check [--env E] [--since REF]`: the semantic-version policy, for CI. Lists every
//! violation; exit 1 if there is any.

use clap::Args;
use ferry::manifest::Environment;
use ferry::registry::{Registry, RegistryClient};
use ferry::release::policy::{self, Rule, Violation};
use serde::Serialize;

use super::build::BuildInputs;
use super::fleet::{graph_error, load_graph, load_manifest, Selection};
use super::push::{build_for_env, env_repository, environment};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Check against this environment: its require_version and release_only, and build
    /// every image to compare it with what its version tag there already holds.
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
    /// Require a version bump for every image changed since this git ref, and no version
    /// lower than there.
    #[arg(long, value_name = "GIT_REF")]
    pub since: Option<String>,
    #[command(flatten)]
    pub inputs: BuildInputs,
}

#[derive(Serialize)]
struct CheckReport {
    ok: bool,
    environment: Option<String>,
    since: Option<String>,
    violations: Vec<Violation>,
    /// With --since: the images counted as changed, and why.
    changed: Vec<policy::Change>,
    /// Rules that could not run, and why.
    skipped: Vec<String>,
}

fn invalid(message: impl std::fmt::Display) -> CliError {
    CliError::invalid(miette::Report::msg(message.to_string()))
}

pub fn run(global: &GlobalArgs, args: CheckArgs, printer: &Printer) -> CliResult {
    let mut report = CheckReport {
        ok: true,
        environment: args.env.clone(),
        since: args.since.clone(),
        violations: Vec::new(),
        changed: Vec::new(),
        skipped: Vec::new(),
    };
    // Versions first, on the raw file: a version that is not semver is a policy violation
    // (exit 1), not a reason to stop at the manifest loader.
    let text = std::fs::read_to_string(&global.file)
        .map_err(|e| invalid(format!("cannot read {}: {e}", global.file.display())))?;
    report.violations = policy::semver_violations(&global.file.display().to_string(), &text);
    if !report.violations.is_empty() {
        report.skipped.push("the other rules need every version to be valid".to_string());
        return finish(report, printer);
    }

    let manifest = load_manifest(global)?;
    // Environment rules apply to the environment being released to: a pre-release is at
    // home in dev even when prod is release_only.
    let envs: Vec<&Environment> = match &args.env {
        Some(e) => vec![environment(&manifest, e)?],
        None => Vec::new(),
    };
    let graph = load_graph(&manifest, &args.inputs.build_args())?;
    let selected = graph.select(&[], false).map_err(|e| graph_error(&manifest, e))?;
    report.violations.extend(policy::environment_violations(&manifest, &selected, &envs));

    if let Some(git_ref) = &args.since {
        let (violations, changed) =
            policy::since_violations(&manifest, &graph, git_ref).map_err(invalid)?;
        report.violations.extend(violations);
        report.changed = changed;
    }

    if let Some(env) = args.env.as_deref().map(|e| environment(&manifest, e)).transpose()? {
        let fleet = Selection { manifest: &manifest, graph: &graph, selected: &selected };
        let built = build_for_env(global, printer, &fleet, env, true, &args.inputs)?;
        let client = RegistryClient::new(ferry::registry::RegistryConfig::for_manifest(&manifest));
        for (name, result) in &built.images {
            let Some(version) = manifest.images.get(name).and_then(|i| i.version.as_ref()) else {
                continue;
            };
            let pushable = match result {
                Ok(p) => p,
                Err(why) => {
                    report.violations.push(Violation {
                        rule: Rule::NotBuilt,
                        image: name.clone(),
                        environment: Some(env.name.clone()),
                        message: format!(
                            "image `{name}` did not build, so its digest cannot be checked: {why}"
                        ),
                    });
                    continue;
                }
            };
            let image = &manifest.images[name];
            let repository = format!("{}/{}", env.registry, image.repository);
            let repo = env_repository(&repository)?;
            let tag = version.to_string().replace('+', "_");
            let published = client
                .head_manifest(&repo, &tag)
                .map_err(|e| invalid(format!("environment `{}`: {e}", env.name)))?;
            if let Some(published) = published {
                report.violations.extend(policy::digest_violation(
                    name,
                    version,
                    &env.name,
                    &format!("{repository}:{tag}"),
                    &pushable.descriptor.digest,
                    &published.digest,
                ));
            }
        }
    } else {
        report.skipped.push(
            "environment rules (require_version, release_only, published digests): give --env"
                .to_string(),
        );
    }
    finish(report, printer)
}

fn finish(mut report: CheckReport, printer: &Printer) -> CliResult {
    report.ok = report.violations.is_empty();
    if printer.json {
        printer.json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        let mut text = String::new();
        for v in &report.violations {
            text.push_str(&format!("error[{}]: {}\n", rule_name(v.rule), v.message));
        }
        for s in &report.skipped {
            text.push_str(&format!("note: not checked: {s}\n"));
        }
        if report.ok {
            text.push_str("check passed\n");
        } else {
            text.push_str(&format!(
                "check failed: {} violation{}\n",
                report.violations.len(),
                if report.violations.len() == 1 { "" } else { "s" }
            ));
        }
        printer.text(&text);
    }
    Ok(if report.ok { ExitStatus::Success } else { ExitStatus::Failure })
}

fn rule_name(rule: Rule) -> &'static str {
    match rule {
        Rule::NotSemver => "not-semver",
        Rule::VersionRequired => "version-required",
        Rule::PreRelease => "pre-release",
        Rule::DigestChangedWithoutBump => "digest-changed-without-bump",
        Rule::ChangedWithoutBump => "changed-without-bump",
        Rule::VersionDecreased => "version-decreased",
        Rule::NotBuilt => "not-built",
    }
}
