//! The fleet DAG: an edge parent → child for every `FROM`, `COPY --from` or `RUN
//! --mount=from=` that names another image of the manifest (by key or repository), and for
//! every `depends_on`. Anything else a stage starts from is an external base.

use std::collections::{BTreeMap, BTreeSet};

use petgraph::algo::kosaraju_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::diagnostic::{did_you_mean, Problem};
use crate::dockerfile::expand::{Lexer, Vars};
use crate::dockerfile::{Dockerfile, DockerfileError, Kind};
use crate::manifest::Manifest;

/// What a stage's FROM, or a `--from=`, refers to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum BaseRef {
    Scratch,
    /// An earlier stage of the same Dockerfile, by index.
    Stage(usize),
    /// The build output of another image of the manifest, by key.
    Image(String),
    /// An image from a registry, as written after expansion.
    External(String),
}

/// One image of the fleet with what the graph knows about it.
#[derive(Debug, Clone)]
pub struct ImageNode {
    pub name: String,
    pub dockerfile: Dockerfile,
    /// The target stage and every stage it needs, in Dockerfile order.
    pub stages: Vec<usize>,
    /// Per needed stage, the earlier stages it builds on or copies from: stages without a
    /// path between them build concurrently.
    pub stage_deps: BTreeMap<usize, BTreeSet<usize>>,
    pub target_stage: usize,
    /// Per needed stage, what its FROM names.
    pub stage_bases: BTreeMap<usize, BaseRef>,
    pub parents: BTreeSet<String>,
    pub external_bases: BTreeSet<String>,
    pub level: usize,
}

/// The image DAG, with nodes kept in a stable build order (by level, then name).
#[derive(Debug, Clone)]
pub struct Graph {
    dag: DiGraph<String, ()>,
    index: BTreeMap<String, NodeIndex>,
    nodes: BTreeMap<String, ImageNode>,
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// Problems in images.toml (cycles, targets) — reported together.
    #[error("{}", .0.first().map(|p| p.to_string()).unwrap_or_default())]
    Manifest(Vec<Problem>),
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    #[error("unknown image `{name}`{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownImage { name: String, suggestion: Option<String> },
}

impl Graph {
    /// Parse every image's Dockerfile and infer the edges. `extra_args` (from `--arg`) override
    /// images.toml args.
    pub fn build(
        manifest: &Manifest,
        extra_args: &BTreeMap<String, String>,
    ) -> Result<Graph, GraphError> {
        let mut dag = DiGraph::new();
        let mut index = BTreeMap::new();
        for name in manifest.images.keys() {
            index.insert(name.clone(), dag.add_node(name.clone()));
        }
        let repositories: BTreeMap<&str, &str> =
            manifest.images.values().map(|i| (i.repository.as_str(), i.name.as_str())).collect();
        let mut nodes = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, image) in &manifest.images {
            let display =
                format!("{}/{}", image.context_rel.trim_end_matches('/'), image.dockerfile_rel);
            let dockerfile = Dockerfile::load(&image.dockerfile, &display)?;
            let mut args = image.args.clone();
            args.extend(extra_args.clone());
            let Some(target_stage) = dockerfile.target_stage(image.target.as_deref()) else {
                let stages: Vec<String> =
                    dockerfile.stages.iter().filter_map(|s| s.name.clone()).collect();
                let target = image.target.clone().unwrap_or_default();
                problems.push(
                    manifest
                        .image_problem(
                            name,
                            format!("image `{name}`: target stage `{target}` is not in {display}"),
                            "this image",
                        )
                        .with_help(
                            match did_you_mean(&target, stages.iter().map(String::as_str)) {
                                Some(s) => format!("did you mean `{s}`?"),
                                None => format!(
                                    "named stages: {}",
                                    if stages.is_empty() {
                                        "none".into()
                                    } else {
                                        stages.join(", ")
                                    }
                                ),
                            },
                        ),
                );
                continue;
            };
            let resolver = Resolver {
                dockerfile: &dockerfile,
                args: &args,
                images: manifest,
                repositories: &repositories,
            };
            let needs = resolver.needed_stages(target_stage)?;
            let mut parents = BTreeSet::new();
            let mut external = BTreeSet::new();
            let mut stage_bases = BTreeMap::new();
            for (&stage, refs) in &needs {
                for r in refs {
                    match r {
                        BaseRef::Image(p) => {
                            parents.insert(p.clone());
                        }
                        BaseRef::External(e) => {
                            external.insert(e.clone());
                        }
                        _ => {}
                    }
                }
                stage_bases.insert(stage, resolver.stage_base(stage)?);
            }
            parents.extend(image.depends_on.iter().cloned());
            parents.remove(name.as_str()).then(|| {
                problems.push(manifest.image_problem(
                    name,
                    format!("dependency cycle: {name} → {name}"),
                    "this image builds from itself",
                ));
            });
            for p in &parents {
                if let (Some(&from), Some(&to)) = (index.get(p), index.get(name)) {
                    dag.add_edge(from, to, ());
                }
            }
            nodes.insert(
                name.clone(),
                ImageNode {
                    name: name.clone(),
                    dockerfile,
                    stages: needs.keys().copied().collect(),
                    stage_deps: needs
                        .iter()
                        .map(|(&stage, refs)| {
                            let deps = refs.iter().filter_map(|r| match r {
                                BaseRef::Stage(s) => Some(*s),
                                _ => None,
                            });
                            (stage, deps.collect())
                        })
                        .collect(),
                    target_stage,
                    stage_bases,
                    parents,
                    external_bases: external,
                    level: 0,
                },
            );
        }
        problems.extend(cycles(&dag, manifest));
        if !problems.is_empty() {
            return Err(GraphError::Manifest(problems));
        }
        let mut graph = Graph { dag, index, nodes };
        graph.assign_levels();
        Ok(graph)
    }

    fn assign_levels(&mut self) {
        // Acyclic by now, so parents come before children in topological order.
        let order = self.topological();
        for name in order {
            let level = self.nodes[&name]
                .parents
                .iter()
                .map(|p| self.nodes.get(p).map_or(0, |n| n.level + 1))
                .max()
                .unwrap_or(0);
            if let Some(n) = self.nodes.get_mut(&name) {
                n.level = level;
            }
        }
    }

    /// Names in a topological order (Kahn, ties broken by name) so output is stable.
    fn topological(&self) -> Vec<String> {
        let mut indegree: BTreeMap<&str, usize> =
            self.nodes.iter().map(|(n, node)| (n.as_str(), node.parents.len())).collect();
        let mut ready: BTreeSet<&str> =
            indegree.iter().filter(|(_, d)| **d == 0).map(|(n, _)| *n).collect();
        let mut order = Vec::new();
        while let Some(n) = ready.pop_first() {
            order.push(n.to_string());
            for child in self.children(n) {
                if let Some(d) = indegree.get_mut(child.as_str()) {
                    *d -= 1;
                    if *d == 0 {
                        if let Some((k, _)) = self.nodes.get_key_value(child.as_str()) {
                            ready.insert(k.as_str());
                        }
                    }
                }
            }
        }
        order
    }

    pub fn node(&self, name: &str) -> Option<&ImageNode> {
        self.nodes.get(name)
    }

    /// Every image in build order: by level, then by name.
    pub fn build_order(&self) -> Vec<&ImageNode> {
        let mut v: Vec<&ImageNode> = self.nodes.values().collect();
        v.sort_by(|a, b| (a.level, &a.name).cmp(&(b.level, &b.name)));
        v
    }

    /// The levels: images of one level depend only on images of lower levels.
    pub fn levels(&self) -> Vec<Vec<String>> {
        let mut levels: Vec<Vec<String>> = Vec::new();
        for n in self.build_order() {
            if levels.len() <= n.level {
                levels.resize(n.level + 1, Vec::new());
            }
            levels[n.level].push(n.name.clone());
        }
        levels
    }

    pub fn children(&self, name: &str) -> Vec<String> {
        let Some(&ix) = self.index.get(name) else { return Vec::new() };
        let mut v: Vec<String> = self
            .dag
            .neighbors_directed(ix, Direction::Outgoing)
            .map(|c| self.dag[c].clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn closure(&self, start: &BTreeSet<String>, dir: Direction) -> BTreeSet<String> {
        let mut seen = start.clone();
        let mut stack: Vec<NodeIndex> =
            start.iter().filter_map(|n| self.index.get(n).copied()).collect();
        while let Some(ix) = stack.pop() {
            for next in self.dag.neighbors_directed(ix, dir) {
                if seen.insert(self.dag[next].clone()) {
                    stack.push(next);
                }
            }
        }
        seen
    }

    /// The images to work on for a selection: the named ones and their ancestors; with
    /// `with_dependents`, their descendants too (and those descendants' ancestors, so the
    /// set is buildable). No names selects everything.
    pub fn select(
        &self,
        names: &[String],
        with_dependents: bool,
    ) -> Result<BTreeSet<String>, GraphError> {
        if names.is_empty() {
            return Ok(self.nodes.keys().cloned().collect());
        }
        let mut start = BTreeSet::new();
        for n in names {
            if !self.nodes.contains_key(n) {
                return Err(GraphError::UnknownImage {
                    name: n.clone(),
                    suggestion: did_you_mean(n, self.nodes.keys().map(String::as_str))
                        .map(str::to_string),
                });
            }
            start.insert(n.clone());
        }
        let start = if with_dependents { self.closure(&start, Direction::Outgoing) } else { start };
        Ok(self.closure(&start, Direction::Incoming))
    }

    /// Edges as (parent, child), sorted.
    pub fn edges(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .dag
            .edge_indices()
            .filter_map(|e| self.dag.edge_endpoints(e))
            .map(|(a, b)| (self.dag[a].clone(), self.dag[b].clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Every cycle, spelled out (`a → b → a`) and pointing at its first image in images.toml.
fn cycles(dag: &DiGraph<String, ()>, manifest: &Manifest) -> Vec<Problem> {
    let mut problems = Vec::new();
    for scc in kosaraju_scc(dag) {
        if scc.len() < 2 {
            continue;
        }
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        // Start at the alphabetically first member and walk inside the component until we
        // come back: every node of a strongly connected component lies on a cycle.
        let Some(&start) = members.iter().min_by_key(|ix| dag[**ix].clone()) else { continue };
        let mut path = vec![start];
        let mut seen = BTreeSet::from([start]);
        let mut cur = start;
        loop {
            let mut next: Vec<NodeIndex> = dag
                .neighbors_directed(cur, Direction::Outgoing)
                .filter(|n| members.contains(n))
                .collect();
            next.sort_by_key(|ix| dag[*ix].clone());
            if next.contains(&start) {
                path.push(start);
                break;
            }
            let Some(&n) = next.iter().find(|n| !seen.contains(n)).or(next.first()) else { break };
            if !seen.insert(n) {
                // Came back to a node already on the path: cut the path to the loop.
                if let Some(pos) = path.iter().position(|p| *p == n) {
                    path.drain(..pos);
                }
                path.push(n);
                break;
            }
            path.push(n);
            cur = n;
        }
        let spelled: Vec<&str> = path.iter().map(|ix| dag[*ix].as_str()).collect();
        let first = spelled.first().copied().unwrap_or_default();
        problems.push(
            manifest
                .image_problem(first, format!("dependency cycle: {}", spelled.join(" → ")), "part of a cycle")
                .with_help("an image cannot be built from its own descendants; check FROM, COPY --from and depends_on"),
        );
    }
    problems
}

/// Resolves FROM and --from words of one Dockerfile.
struct Resolver<'a> {
    dockerfile: &'a Dockerfile,
    args: &'a BTreeMap<String, String>,
    images: &'a Manifest,
    repositories: &'a BTreeMap<&'a str, &'a str>,
}

impl Resolver<'_> {
    fn global_vars(&self) -> Result<Vars, DockerfileError> {
        global_arg_values(self.dockerfile, self.args)
    }

    fn expand_error(
        &self,
        span: std::ops::Range<usize>,
        e: crate::dockerfile::expand::ExpandError,
    ) -> DockerfileError {
        DockerfileError::Syntax(Box::new(crate::diagnostic::Problems {
            file: self.dockerfile.file.clone(),
            problems: vec![self.dockerfile.problem(span, e.to_string(), "cannot expand")],
        }))
    }

    /// What stage `index`'s FROM names.
    fn stage_base(&self, index: usize) -> Result<BaseRef, DockerfileError> {
        let stage = &self.dockerfile.stages[index];
        let vars = self.global_vars()?;
        let word = Lexer { escape: self.dockerfile.escape }
            .expand_word(&stage.from.image, &vars)
            .map_err(|e| self.expand_error(stage.from.span.clone(), e))?;
        if word.is_empty() {
            return Err(DockerfileError::Syntax(Box::new(crate::diagnostic::Problems {
                file: self.dockerfile.file.clone(),
                problems: vec![self
                    .dockerfile
                    .problem(
                        stage.from.span.clone(),
                        format!("FROM `{}` expands to an empty image name", stage.from.image),
                        "empty after expansion",
                    )
                    .with_help("give the ARG a default or set it in images.toml `args`")],
            })));
        }
        Ok(self.resolve(&word, index, false))
    }

    /// A FROM or --from word after expansion. `by_index` allows `--from=0`.
    fn resolve(&self, word: &str, before: usize, by_index: bool) -> BaseRef {
        if word == "scratch" {
            return BaseRef::Scratch;
        }
        let lower = word.to_lowercase();
        if let Some(i) = self.dockerfile.stages[..before]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            return BaseRef::Stage(i);
        }
        if by_index {
            if let Ok(i) = word.parse::<usize>() {
                if i < before {
                    return BaseRef::Stage(i);
                }
            }
        }
        if self.images.images.contains_key(word) {
            return BaseRef::Image(word.to_string());
        }
        let name = crate::reference::strip_tag_and_digest(word);
        if let Some(image) = self.repositories.get(name) {
            return BaseRef::Image(image.to_string());
        }
        BaseRef::External(word.to_string())
    }

    /// The target and every stage it needs, each with the references it makes (its FROM,
    /// `COPY --from`, `RUN --mount=from=`), in Dockerfile order.
    fn needed_stages(
        &self,
        target: usize,
    ) -> Result<BTreeMap<usize, Vec<BaseRef>>, DockerfileError> {
        let mut needed: BTreeMap<usize, Vec<BaseRef>> = BTreeMap::new();
        let mut stack = vec![target];
        let vars = self.global_vars()?;
        let lexer = Lexer { escape: self.dockerfile.escape };
        while let Some(i) = stack.pop() {
            if needed.contains_key(&i) {
                continue;
            }
            let mut refs = vec![self.stage_base(i)?];
            for ins in &self.dockerfile.stages[i].instructions {
                for word in from_words(&ins.kind) {
                    let word = lexer
                        .expand_word(&word, &vars)
                        .map_err(|e| self.expand_error(ins.span.clone(), e))?;
                    refs.push(self.resolve(&word, i, true));
                }
            }
            for r in &refs {
                if let BaseRef::Stage(s) = r {
                    stack.push(*s);
                }
            }
            needed.insert(i, refs);
        }
        Ok(needed)
    }
}

/// The `--from=` words of an instruction: COPY/ADD `--from`, RUN `--mount=...,from=...`.
pub fn from_words(kind: &Kind) -> Vec<String> {
    match kind {
        Kind::Copy { flags, .. } | Kind::Add { flags, .. } => {
            flags.iter().filter(|f| f.name == "from").filter_map(|f| f.value.clone()).collect()
        }
        Kind::Run { flags, .. } => flags
            .iter()
            .filter(|f| f.name == "mount")
            .filter_map(|f| f.value.as_deref())
            .flat_map(|v| {
                v.split(',')
                    .filter_map(|kv| kv.strip_prefix("from="))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Values of a Dockerfile's global ARGs: their defaults, overridden by build args. Only
/// declared ARGs are visible, as in docker.
pub fn global_arg_values(
    dockerfile: &Dockerfile,
    args: &BTreeMap<String, String>,
) -> Result<Vars, DockerfileError> {
    let lexer = Lexer { escape: dockerfile.escape };
    // BuildKit's automatic platform ARGs are in the global scope, declared or not, so a
    // FROM may use them (`FROM base-$TARGETARCH`); a stage still declares them to see them.
    let host = crate::oci::Platform::host();
    let platform = format!("{}/{}", host.os, host.architecture);
    let mut vars: Vars = ["TARGETPLATFORM", "TARGETOS", "TARGETARCH", "TARGETVARIANT"]
        .iter()
        .chain(&["BUILDPLATFORM", "BUILDOS", "BUILDARCH", "BUILDVARIANT"])
        .filter_map(|n| {
            crate::build::executor::builtin_arg(n, &platform).map(|v| (n.to_string(), v))
        })
        .collect();
    for ins in &dockerfile.global_args {
        let Kind::Arg(words) = &ins.kind else { continue };
        for w in words {
            let (name, default) = match w.split_once('=') {
                Some((n, d)) => (n.to_string(), Some(d)),
                None => (w.clone(), None),
            };
            let value = match (args.get(&name), default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(d)) => Some(lexer.expand_word(d, &vars).map_err(|e| {
                    DockerfileError::Syntax(Box::new(crate::diagnostic::Problems {
                        file: dockerfile.file.clone(),
                        problems: vec![dockerfile.problem(
                            ins.span.clone(),
                            e.to_string(),
                            "cannot expand",
                        )],
                    }))
                })?),
                (None, None) => None,
            };
            if let Some(v) = value {
                vars.insert(name, v);
            }
        }
    }
    Ok(vars)
}
