//! Dockerfile text → `Dockerfile::parse`, then what the build does first with every stage:
//! expand the FROM word with the global ARGs' defaults and pick the target stage. Errors
//! are rendered as the CLI renders them (spans into the text).
#![no_main]

use ferry::diagnostic::SourceFile;
use ferry::dockerfile::expand::{Lexer, Vars};
use ferry::dockerfile::{Dockerfile, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let df = match Dockerfile::parse(SourceFile::new("Dockerfile", text)) {
        Ok(df) => df,
        Err(e) => {
            let _ = format!("{:?}", e.into_report());
            return;
        }
    };
    let lexer = Lexer { escape: df.escape };
    let mut vars = Vars::new();
    for ins in &df.global_args {
        if let Kind::Arg(words) = &ins.kind {
            for w in words {
                if let Ok(w) = lexer.expand_word(w, &vars) {
                    let (k, v) = w.split_once('=').unwrap_or((w.as_str(), ""));
                    vars.insert(k.to_string(), v.to_string());
                }
            }
        }
    }
    for stage in &df.stages {
        if let Err(e) = lexer.expand_word(&stage.from.image, &vars) {
            let problem = df.problem(stage.from.span.clone(), e.to_string(), "here");
            let _ = problem.location();
        }
        for ins in &stage.instructions {
            let _ = df.problem(ins.span.clone(), "fuzz".into(), "here").location();
        }
    }
    let _ = df.target_stage(None);
    let _ = df.target_stage(df.stages.last().and_then(|s| s.name.as_deref()));
});
