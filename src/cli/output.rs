//! The one place the CLI writes results: stdout gets text or exactly one JSON document;
//! diagnostics go to stderr.

use std::io::Write;

use super::GlobalArgs;

pub struct Printer {
    pub json: bool,
    pub quiet: bool,
}

impl Printer {
    pub fn new(global: &GlobalArgs) -> Printer {
        Printer { json: global.json, quiet: global.quiet }
    }

    /// A command's text result on stdout.
    pub fn text(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        if !text.ends_with('\n') && !text.is_empty() {
            let _ = out.write_all(b"\n");
        }
    }

    /// A command's JSON result: exactly one document on stdout.
    pub fn json(&self, value: &serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer_pretty(&mut out, value);
        let _ = out.write_all(b"\n");
    }

    /// A status line on stderr (suppressed by -q).
    pub fn status(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    /// A warning on stderr.
    pub fn warn(&self, line: &str) {
        eprintln!("warning: {line}");
    }

    /// A failure, rendered as a miette diagnostic on stderr.
    pub fn error(&self, report: &miette::Report) {
        eprintln!("{report:?}");
    }
}
