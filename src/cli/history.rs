//! `ferry history REF`: one row per build step, newest first, as `docker history`.

use clap::Args;
use serde_json::json;

use super::images::{human_age, human_size, open_store, render_table, store_error};
use super::{CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// The image.
    pub reference: String,
    /// Do not truncate CREATED BY.
    #[arg(long)]
    pub no_trunc: bool,
}

pub fn run(global: &GlobalArgs, args: HistoryArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let resolved = store.resolve(&args.reference).map_err(store_error)?;
    let img = store.image(&resolved.descriptor).map_err(store_error)?;
    // Steps that made a layer take the manifest's layers in order.
    let mut layers = img.manifest.layers.iter();
    let mut rows = Vec::new();
    for h in &img.config.history {
        let size = if h.empty_layer { 0 } else { layers.next().map(|l| l.size).unwrap_or(0) };
        rows.push((h, size));
    }
    rows.reverse();
    if printer.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(h, size)| {
                json!({
                    "Created": h.created,
                    "CreatedBy": h.created_by,
                    "Size": size,
                    "Comment": h.comment,
                    "EmptyLayer": h.empty_layer,
                })
            })
            .collect();
        printer.json(&serde_json::Value::Array(v));
        return Ok(ExitStatus::Success);
    }
    let mut table =
        vec![["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"].map(str::to_string).to_vec()];
    for (i, (h, size)) in rows.iter().enumerate() {
        let id = if i == 0 { img.id().short().to_string() } else { "<missing>".to_string() };
        let by = h.created_by.clone().unwrap_or_default().replace(['\n', '\t'], " ");
        let by = if args.no_trunc || by.chars().count() <= 45 {
            by
        } else {
            format!("{}…", by.chars().take(44).collect::<String>())
        };
        table.push(vec![
            id,
            h.created.as_deref().map(human_age).unwrap_or_default(),
            by,
            human_size(*size),
            h.comment.clone().unwrap_or_default(),
        ]);
    }
    printer.text(&render_table(&table));
    Ok(ExitStatus::Success)
}
