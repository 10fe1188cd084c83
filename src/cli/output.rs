//! The one place the CLI writes to the terminal: results on stdout (text or one JSON
//! document), diagnostics and progress on stderr.

use std::io::{IsTerminal, Write};

use super::GlobalArgs;

pub struct Printer {
    pub json: bool,
    pub quiet: bool,
    pub verbose: u8,
    /// Whether stderr is a terminal: progress bars and colours only then.
    pub stderr_is_terminal: bool,
}

impl Printer {
    pub fn new(global: &GlobalArgs) -> Printer {
        Printer {
            json: global.json,
            quiet: global.quiet,
            verbose: global.verbose,
            stderr_is_terminal: std::io::stderr().is_terminal(),
        }
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
