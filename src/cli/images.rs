//! `ferry images`: the local images, as `docker images` shows them. Also the helpers the
//! image-management commands share (opening the store, error mapping, human units).

use clap::Args;
use ferry::store::{Store, StoreError};

use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Show digests.
    #[arg(long)]
    pub digests: bool,
    /// Filter: `reference=PATTERN` (glob on repository or repository:tag; repeatable).
    #[arg(long = "filter", value_name = "FILTER")]
    pub filters: Vec<String>,
    /// Do not truncate ids.
    #[arg(long)]
    pub no_trunc: bool,
}

pub fn run(global: &GlobalArgs, args: ImagesArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let mut patterns = Vec::new();
    for f in &args.filters {
        match f.split_once('=') {
            Some(("reference", p)) => {
                let glob =
                    globset::GlobBuilder::new(p).literal_separator(true).build().map_err(|e| {
                        CliError::invalid(miette::miette!("invalid --filter pattern {p:?}: {e}"))
                    })?;
                patterns.push(glob.compile_matcher());
            }
            _ => {
                return Err(CliError::invalid(miette::miette!(
                    "unsupported filter {f:?}; ferry images supports --filter reference=PATTERN"
                )))
            }
        }
    }
    let mut rows = store.images().map_err(store_error)?;
    if !patterns.is_empty() {
        rows.retain(|r| {
            let with_tag = r.tag.as_ref().map(|t| format!("{}:{t}", r.repository));
            patterns.iter().any(|p| {
                p.is_match(&r.repository) || with_tag.as_ref().is_some_and(|t| p.is_match(t))
            })
        });
    }
    let id = |d: &ferry::digest::Digest| {
        if args.no_trunc {
            d.to_string()
        } else {
            d.short().to_string()
        }
    };
    // `-q` (the global quiet flag) prints only ids, as `docker images -q` does.
    if printer.quiet {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = String::new();
        for r in &rows {
            if seen.insert(r.id.clone()) {
                out.push_str(&id(&r.id));
                out.push('\n');
            }
        }
        printer.text(&out);
        return Ok(ExitStatus::Success);
    }
    if printer.json {
        printer.json(&serde_json::to_value(&rows).unwrap_or_default());
        return Ok(ExitStatus::Success);
    }
    let mut table = vec![{
        let mut h = vec!["REPOSITORY", "TAG"];
        if args.digests {
            h.push("DIGEST");
        }
        h.extend(["IMAGE ID", "CREATED", "SIZE"]);
        h.into_iter().map(str::to_string).collect::<Vec<_>>()
    }];
    for r in &rows {
        let mut row =
            vec![r.repository.clone(), r.tag.clone().unwrap_or_else(|| "<none>".to_string())];
        if args.digests {
            row.push(r.digest.to_string());
        }
        row.push(id(&r.id));
        row.push(r.created.as_deref().map(human_age).unwrap_or_else(|| "N/A".to_string()));
        row.push(human_size(r.size));
        table.push(row);
    }
    printer.text(&render_table(&table));
    Ok(ExitStatus::Success)
}

pub(super) fn open_store(global: &GlobalArgs) -> Result<Store, CliError> {
    let root = match &global.store {
        Some(p) => p.clone(),
        None => Store::default_root().map_err(store_error)?,
    };
    Store::open(root).map_err(store_error)
}

/// Exit 2 for what the user named wrongly, 1 for what failed.
pub(super) fn store_error(e: StoreError) -> CliError {
    let invalid = matches!(
        e,
        StoreError::ImageNotFound { .. }
            | StoreError::Ambiguous { .. }
            | StoreError::InvalidRefName { .. }
            | StoreError::NotALayout { .. }
            | StoreError::Archive { .. }
            | StoreError::NoMatchingPlatform { .. }
    ) || matches!(&e, StoreError::Invalid { what, .. } if what == "the environment");
    let report = miette::miette!("{e}");
    if invalid {
        CliError::invalid(report)
    } else {
        CliError::failure(report)
    }
}

/// Columns padded as docker does (three spaces between).
pub(super) fn render_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Sizes as docker prints them: SI units, three significant digits (`7.8MB`).
pub(super) fn human_size(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s =
        if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    format!("{s}{}", units[u])
}

/// An RFC 3339 time as docker's "N units ago".
pub(super) fn human_age(created: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(created) else {
        return created.to_string();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds();
    if secs < 0 {
        return "in the future".to_string();
    }
    let (m, h, d) = (60, 3600, 86400);
    let s = match secs {
        0 => "Less than a second".to_string(),
        s if s < m => format!("{s} seconds"),
        s if s < 2 * m => "About a minute".to_string(),
        s if s < 46 * m => format!("{} minutes", s / m),
        s if s < 90 * m => "About an hour".to_string(),
        s if s < 48 * h => format!("{} hours", s / h),
        s if s < 14 * d => format!("{} days", s / d),
        s if s < 60 * d => format!("{} weeks", s / (7 * d)),
        s if s < 730 * d => format!("{} months", s / (30 * d)),
        s => format!("{} years", s / (365 * d)),
    };
    format!("{s} ago")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::super::Cli::command().debug_assert();
    }

    #[test]
    fn sizes_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(7_800_000), "7.8MB");
        assert_eq!(human_size(123_400), "123kB");
        assert_eq!(human_size(1_234_000_000), "1.23GB");
    }

    #[test]
    fn ages() {
        assert_eq!(human_age("1970-01-01T00:00:00Z").split(' ').nth(1), Some("years"));
        assert_eq!(human_age("not a date"), "not a date");
    }

    #[test]
    fn table_pads_columns() {
        let t = render_table(&[vec!["A".into(), "B".into()], vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A      B\nlong   x\n");
    }
}
