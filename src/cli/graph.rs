//! `ferry graph`: the image graph as text, Graphviz dot or Mermaid.

use clap::{Args, ValueEnum};

use super::fleet::{load_graph, load_manifest};
use super::{CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
}

#[derive(Args, Debug)]
pub struct GraphArgs {
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

pub fn run(global: &GlobalArgs, args: GraphArgs, printer: &Printer) -> CliResult {
    let manifest = load_manifest(global)?;
    let graph = load_graph(&manifest, &Default::default())?;
    if printer.json {
        let images: Vec<serde_json::Value> = graph
            .build_order()
            .iter()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "level": n.level,
                    "parents": n.parents,
                    "children": graph.children(&n.name),
                    "external_bases": n.external_bases,
                })
            })
            .collect();
        printer.json(&serde_json::json!({ "images": images, "levels": graph.levels() }));
        return Ok(ExitStatus::Success);
    }
    let mut out = String::new();
    match args.format {
        Format::Text => {
            for (level, names) in graph.levels().iter().enumerate() {
                for name in names {
                    let node = graph.node(name);
                    let parents: Vec<String> =
                        node.map(|n| n.parents.iter().cloned().collect()).unwrap_or_default();
                    let external: Vec<String> = node
                        .map(|n| n.external_bases.iter().cloned().collect())
                        .unwrap_or_default();
                    let mut from: Vec<String> = parents;
                    from.extend(external.iter().map(|e| format!("{e} (external)")));
                    let from = if from.is_empty() {
                        String::new()
                    } else {
                        format!(" <- {}", from.join(", "))
                    };
                    out.push_str(&format!("{level}  {name}{from}\n"));
                }
            }
        }
        Format::Dot => {
            out.push_str("digraph fleet {\n  rankdir=LR;\n");
            for n in graph.build_order() {
                out.push_str(&format!("  \"{}\";\n", n.name));
            }
            for (a, b) in graph.edges() {
                out.push_str(&format!("  \"{a}\" -> \"{b}\";\n"));
            }
            out.push_str("}\n");
        }
        Format::Mermaid => {
            out.push_str("graph LR\n");
            for n in graph.build_order() {
                out.push_str(&format!("  {}[\"{}\"]\n", mermaid_id(&n.name), n.name));
            }
            for (a, b) in graph.edges() {
                out.push_str(&format!("  {} --> {}\n", mermaid_id(&a), mermaid_id(&b)));
            }
        }
    }
    printer.text(&out);
    Ok(ExitStatus::Success)
}

/// Mermaid node ids allow only word characters.
fn mermaid_id(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}
