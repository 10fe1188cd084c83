//! What "ferry built what docker built" means, field by field, and the one list of
//! build-time noise the comparison ignores. docs/CONFORMANCE.md explains each rule.

use std::collections::{BTreeMap, BTreeSet};

use super::image::{Image, Node};

/// Paths whose content is build-time noise: package index downloads and caches, logs,
/// Python bytecode. They differ between any two builds, docker's included, so both sides
/// drop them (presence too: a cache cleaned in one build and not the other is still noise).
pub fn is_noise(path: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "var/lib/apt/lists/",
        "var/cache/apt/",
        "var/cache/debconf/",
        "var/cache/ldconfig/",
        "var/log/",
        "root/.cache/",
        "tmp/.cache/",
    ];
    const FILES: &[&str] =
        &["var/lib/dpkg/status-old", "var/lib/dpkg/diversions-old", "etc/.pwd.lock"];
    PREFIXES.iter().any(|p| path.starts_with(p))
        || FILES.contains(&path)
        || path.ends_with(".pyc")
        || path.contains("/__pycache__")
        || path.starts_with("var/lib/dpkg/") && path.ends_with("-old")
}

/// The comparison of one case: empty when ferry agrees with docker.
pub fn compare(docker: &Image, ferry: &Image, build_start: i64) -> Vec<String> {
    let mut diffs = Vec::new();
    compare_config(&docker.config, &ferry.config, &mut diffs);
    compare_history(docker, ferry, &mut diffs);
    compare_trees(docker, ferry, build_start, &mut diffs);
    diffs
}

/// The config fields a user sees in `docker inspect`, with docker's equivalences: an
/// absent field, null and an empty value mean the same.
const CONFIG_FIELDS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "Healthcheck",
    "StopSignal",
    "Shell",
    "OnBuild",
    "ArgsEscaped",
];

fn normalised(v: Option<&serde_json::Value>, field: &str) -> serde_json::Value {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if s.is_empty() => Value::Null,
        Some(Value::Bool(false)) => Value::Null,
        // An empty map means nothing set; an empty list is meaningful for Cmd and
        // Entrypoint (`CMD []`) only.
        Some(Value::Object(m)) if m.is_empty() => Value::Null,
        Some(Value::Array(a)) if a.is_empty() && !matches!(field, "Cmd" | "Entrypoint") => {
            Value::Null
        }
        Some(v) => v.clone(),
    }
}

fn compare_config(docker: &serde_json::Value, ferry: &serde_json::Value, diffs: &mut Vec<String>) {
    let (dc, fc) = (&docker["config"], &ferry["config"]);
    for field in CONFIG_FIELDS {
        let d = normalised(dc.get(*field), field);
        let f = normalised(fc.get(*field), field);
        if d != f {
            diffs.push(format!("config {field}: docker {d}, ferry {f}"));
        }
    }
    for field in ["architecture", "os", "variant"] {
        let d = normalised(docker.get(field), field);
        let f = normalised(ferry.get(field), field);
        if d != f {
            diffs.push(format!("{field}: docker {d}, ferry {f}"));
        }
    }
}

/// Layer count, and per history entry whether it made a layer. The text of `created_by`
/// is compared too (it is what `docker history` shows), less the builder's name BuildKit
/// and ferry end a layer's entry with (`# buildkit`, `# ferry`).
fn compare_history(docker: &Image, ferry: &Image, diffs: &mut Vec<String>) {
    if docker.layer_count != ferry.layer_count {
        diffs.push(format!("layers: docker {}, ferry {}", docker.layer_count, ferry.layer_count));
    }
    let history = |img: &Image| -> Vec<(bool, String)> {
        img.config["history"]
            .as_array()
            .map(|h| {
                h.iter()
                    .map(|e| {
                        (
                            e["empty_layer"].as_bool().unwrap_or(false),
                            without_builder(e["created_by"].as_str().unwrap_or("")).to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (dh, fh) = (history(docker), history(ferry));
    let flags = |h: &[(bool, String)]| -> String {
        h.iter().map(|(empty, _)| if *empty { 'e' } else { 'L' }).collect()
    };
    if flags(&dh) != flags(&fh) {
        diffs.push(format!(
            "history (L = layer, e = empty_layer): docker {}, ferry {}",
            flags(&dh),
            flags(&fh)
        ));
    }
    for (i, (d, f)) in dh.iter().zip(fh.iter()).enumerate() {
        if d.1 != f.1 {
            diffs.push(format!("history[{i}] created_by: docker {:?}, ferry {:?}", d.1, f.1));
        }
    }
}

fn without_builder(created_by: &str) -> &str {
    created_by
        .strip_suffix(" # buildkit")
        .or_else(|| created_by.strip_suffix(" # ferry"))
        .unwrap_or(created_by)
}

fn compare_trees(docker: &Image, ferry: &Image, build_start: i64, diffs: &mut Vec<String>) {
    let paths: BTreeSet<&String> =
        docker.tree.keys().chain(ferry.tree.keys()).filter(|p| !is_noise(p)).collect();
    for path in paths {
        match (docker.tree.get(path), ferry.tree.get(path)) {
            (Some(_), None) => diffs.push(format!("/{path}: only in docker's image")),
            (None, Some(_)) => diffs.push(format!("/{path}: only in ferry's image")),
            (Some(d), Some(f)) => compare_node(path, d, f, build_start, diffs),
            (None, None) => unreachable!(),
        }
        let dl = docker.links.get(path);
        let fl = ferry.links.get(path);
        if dl != fl && docker.tree.contains_key(path) && ferry.tree.contains_key(path) {
            diffs.push(format!("/{path}: hard links docker {dl:?}, ferry {fl:?}"));
        }
    }
}

/// mtimes are compared where docker's mtime predates the build: a file from the context
/// or the base keeps its time in docker's image, and must in ferry's. What the build itself
/// wrote carries the time of the build in each tool, which cannot agree.
fn compare_node(path: &str, d: &Node, f: &Node, build_start: i64, diffs: &mut Vec<String>) {
    let mut what = Vec::new();
    if d.kind != f.kind {
        what.push(format!("type docker {:?}, ferry {:?}", d.kind, f.kind));
    }
    if d.mode != f.mode {
        what.push(format!("mode docker {:o}, ferry {:o}", d.mode, f.mode));
    }
    if (d.uid, d.gid) != (f.uid, f.gid) {
        what.push(format!("owner docker {}:{}, ferry {}:{}", d.uid, d.gid, f.uid, f.gid));
    }
    if d.size != f.size || d.digest != f.digest {
        what.push(format!(
            "content docker {} bytes, ferry {} bytes (digests differ)",
            d.size, f.size
        ));
    }
    // docker's layer writer keeps only file capabilities (moby's archive package, as
    // containerd's); ferry keeps every xattr a RUN set, so only those docker keeps compare.
    let (dx, fx) = (exported_xattrs(&d.xattrs), exported_xattrs(&f.xattrs));
    if dx != fx {
        what.push(format!(
            "xattrs docker {:?}, ferry {:?}",
            dx.keys().collect::<Vec<_>>(),
            fx.keys().collect::<Vec<_>>()
        ));
    }
    if d.mtime < build_start && d.mtime != f.mtime {
        what.push(format!("mtime docker {}, ferry {}", d.mtime, f.mtime));
    }
    if !what.is_empty() {
        diffs.push(format!("/{path}: {}", what.join("; ")));
    }
}

/// The xattrs docker writes into a layer.
fn exported_xattrs(all: &BTreeMap<String, Vec<u8>>) -> BTreeMap<&String, &Vec<u8>> {
    all.iter().filter(|(name, _)| name.as_str() == "security.capability").collect()
}
