//! Loading the manifest and the graph for a command, with errors mapped to exit codes.

use std::collections::BTreeMap;

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

/// The images a command works on.
pub struct Selection<'a> {
    pub manifest: &'a Manifest,
    pub graph: &'a Graph,
    pub selected: &'a std::collections::BTreeSet<String>,
}
