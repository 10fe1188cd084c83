//! Loading the manifest and the graph for a command, with errors mapped to exit codes.

use std::collections::{BTreeMap, BTreeSet};

use ferry::graph::{Graph, GraphError};
use ferry::manifest::Manifest;

use super::{CliError, GlobalArgs};

pub fn load_manifest(global: &GlobalArgs) -> Result<Manifest, CliError> {
    Manifest::load(&global.file).map_err(|e| CliError::invalid(e.into_report()))
}

pub fn graph_error(manifest: &Manifest, e: GraphError) -> CliError {
    match e {
        GraphError::Manifest(problems) => CliError::invalid(
            ferry::diagnostic::Problems { file: manifest.file.clone(), problems }.into_report(),
        ),
        GraphError::Dockerfile(d) => CliError::invalid(d.into_report()),
        other => CliError::invalid(miette::Report::msg(other.to_string())),
    }
}

pub fn load_graph(manifest: &Manifest, args: &BTreeMap<String, String>) -> Result<Graph, CliError> {
    Graph::build(manifest, args).map_err(|e| graph_error(manifest, e))
}

/// `--arg K=V` values.
pub fn parse_build_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

/// The store: `--store`, else $FERRY_STORE, else the default location.
pub fn open_store(global: &GlobalArgs) -> Result<ferry::store::Store, CliError> {
    let root = match &global.store {
        Some(p) => p.clone(),
        None => ferry::store::Store::default_root()
            .map_err(|e| CliError::invalid(miette::miette!("{e}")))?,
    };
    ferry::store::Store::open(&root).map_err(|e| CliError::invalid(miette::miette!("{e}")))
}

/// `--output oci:DIR|docker:FILE` for the built images: (store name, manifest digest).
/// By digest, not by name: another process may have moved the name since the build.
pub fn export(
    store: &ferry::store::Store,
    built: &[(String, String)],
    kind: &str,
    path: &std::path::Path,
) -> Result<(), String> {
    let mut images = Vec::new();
    for (n, digest) in built {
        let digest: ferry::digest::Digest =
            digest.parse().map_err(|e| format!("image `{n}`: {e}"))?;
        let d = store.manifest_descriptor(&digest).map_err(|e| format!("image `{n}`: {e}"))?;
        images.push((n.clone(), d));
    }
    match kind {
        "oci" => {
            ferry::build::output::write_oci_layout(store, &images, path).map_err(|e| e.to_string())
        }
        _ => ferry::build::output::write_docker_archive(store, &images, path)
            .map_err(|e| e.to_string()),
    }
}

/// The store, only if it already exists (commands that only read must not create it).
pub fn open_store_if_exists(global: &GlobalArgs) -> Result<ferry::store::Store, CliError> {
    let root = match &global.store {
        Some(p) => p.clone(),
        None => ferry::store::Store::default_root()
            .map_err(|e| CliError::invalid(miette::miette!("{e}")))?,
    };
    if !root.join("oci-layout").exists() {
        return Err(CliError::invalid(miette::miette!("no store at {}", root.display())));
    }
    ferry::store::Store::open(&root).map_err(|e| CliError::invalid(miette::miette!("{e}")))
}

/// What a command selects: the named images (every image when none is named) and their
/// ancestors; `with_dependents` adds the named images' descendants. With `since` (a git
/// ref), only those of the named images that changed since it start the selection, and
/// their dependents come with them: what CI rebuilds after a commit. Returns the
/// selection and, with `since`, the changed images with why.
pub fn select_images(
    manifest: &Manifest,
    graph: &Graph,
    names: &[String],
    with_dependents: bool,
    since: Option<&str>,
) -> Result<(BTreeSet<String>, Option<Changed>), CliError> {
    let Some(git_ref) = since else {
        let selected =
            graph.select(names, with_dependents).map_err(|e| graph_error(manifest, e))?;
        return Ok((selected, None));
    };
    // Unknown names are errors even when nothing changed.
    graph.select(names, false).map_err(|e| graph_error(manifest, e))?;
    let changed = ferry::changes::since(manifest, graph, git_ref)
        .map_err(|e| CliError::invalid(miette::miette!("{e}")))?
        .changed;
    let start: Vec<String> =
        changed.keys().filter(|c| names.is_empty() || names.contains(c)).cloned().collect();
    let selected = if start.is_empty() {
        BTreeSet::new()
    } else {
        graph.select(&start, true).map_err(|e| graph_error(manifest, e))?
    };
    let changed = changed.into_iter().filter(|(c, _)| selected.contains(c)).collect();
    Ok((selected, Some(changed)))
}

/// Images changed since a git ref, each with why.
pub type Changed = BTreeMap<String, String>;

/// `Changed since REF: a (why), b (why)`, or that nothing changed.
pub fn describe_changes(git_ref: &str, changed: &Changed) -> String {
    if changed.is_empty() {
        return format!("Nothing changed since {git_ref}");
    }
    let list: Vec<String> = changed.iter().map(|(name, why)| format!("{name} ({why})")).collect();
    format!("Changed since {git_ref}: {}", list.join(", "))
}

/// The images a command works on.
pub struct Selection<'a> {
    pub manifest: &'a Manifest,
    pub graph: &'a Graph,
    pub selected: &'a std::collections::BTreeSet<String>,
}
