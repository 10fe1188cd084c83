//! The unknown-key check. Allowed keys come from the JSON schema generated from the serde
//! types, so the check can never drift from what the loader accepts.

use std::collections::BTreeMap;
use std::ops::Range;

use serde_json::Value;
use toml::de::{DeTable, DeValue};

use crate::diagnostic::{did_you_mean, Problem, SourceFile};

pub(super) fn check_unknown_keys(
    file: &SourceFile,
    doc: &DeTable<'_>,
    problems: &mut Vec<Problem>,
) {
    let schema = super::json_schema();
    let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
    walk_table(file, doc, &schema, &defs, "", problems);
}

/// Follow `$ref` and pick the object alternative of an `Option<T>`'s `anyOf`.
fn resolve<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        return resolve(&defs[name], defs);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            for alt in alts {
                let r = resolve(alt, defs);
                if r.get("properties").is_some() || r.get("additionalProperties").is_some() {
                    return r;
                }
            }
        }
    }
    schema
}

fn walk_table(
    file: &SourceFile,
    table: &DeTable<'_>,
    schema: &Value,
    defs: &Value,
    path: &str,
    problems: &mut Vec<Problem>,
) {
    let schema = resolve(schema, defs);
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    for (key, value) in table.iter() {
        let name: &str = key.get_ref();
        let child_path =
            if path.is_empty() { name.to_string() } else { format!("{path}.{}", quote_key(name)) };
        let child_schema = match (properties.and_then(|p| p.get(name)), additional) {
            (Some(s), _) => s,
            (None, Some(Value::Object(s))) => &Value::Object(s.clone()),
            (None, _) if properties.is_some() => {
                let known: Vec<&str> =
                    properties.into_iter().flat_map(|p| p.keys().map(String::as_str)).collect();
                let place = if path.is_empty() {
                    "at the top level".to_string()
                } else {
                    format!("in [{path}]")
                };
                let help = match did_you_mean(name, known.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("allowed keys {place}: {}", known.join(", ")),
                };
                problems.push(
                    Problem::new(
                        file,
                        key.span(),
                        format!("unknown key `{name}` {place}"),
                        "unknown key",
                    )
                    .with_help(help),
                );
                continue;
            }
            (None, _) => continue,
        };
        if let DeValue::Table(t) = value.get_ref() {
            walk_table(file, t, child_schema, defs, &child_path, problems);
        }
    }
}

fn quote_key(key: &str) -> String {
    if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        key.to_string()
    } else {
        format!("\"{key}\"")
    }
}

/// Where each `[images.NAME]` key is written.
pub(super) fn image_key_spans(doc: &DeTable<'_>) -> BTreeMap<String, Range<usize>> {
    let mut spans = BTreeMap::new();
    if let Some(DeValue::Table(images)) = doc.get("images").map(|v| v.get_ref()) {
        for (key, _) in images.iter() {
            spans.insert(key.get_ref().to_string(), key.span());
        }
    }
    spans
}

/// Where a `[registries."HOST"]` key is written.
pub(super) fn registry_key_span(file: &SourceFile, host: &str) -> Option<Range<usize>> {
    let doc = DeTable::parse(&file.text).ok()?;
    let DeValue::Table(regs) = doc.get_ref().get("registries")?.get_ref() else { return None };
    regs.iter().find(|(k, _)| k.get_ref() == host).map(|(k, _)| k.span())
}
