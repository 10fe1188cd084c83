//! Dockerfiles: parsed (parse-dockerfile) into typed instructions with their lines, words kept
//! unexpanded; expansion happens per instruction in the build, with the variables of that
//! moment (see [`expand`]).

mod continuation;
pub mod expand;

use std::ops::Range;
use std::path::Path;

use crate::diagnostic::{Problem, Problems, SourceFile};
use parse_dockerfile as pd;

/// A parsed Dockerfile.
#[derive(Debug, Clone)]
pub struct Dockerfile {
    pub file: SourceFile,
    pub escape: char,
    /// The `# syntax=` directive, accepted and ignored (ferry is its own frontend).
    pub syntax: Option<String>,
    /// ARGs before the first FROM; they are visible to FROM lines only.
    pub global_args: Vec<Instruction>,
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub index: usize,
    /// `AS name`, lowercased as docker does.
    pub name: Option<String>,
    pub from: From,
    pub instructions: Vec<Instruction>,
}

#[derive(Debug, Clone)]
pub struct From {
    /// The image word, unexpanded.
    pub image: String,
    pub platform: Option<String>,
    pub line: usize,
    pub span: Range<usize>,
}

/// One instruction with where it is.
#[derive(Debug, Clone)]
pub struct Instruction {
    pub line: usize,
    pub span: Range<usize>,
    pub kind: Kind,
}

/// A command in exec form (JSON array) or shell form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Exec(Vec<String>),
    Shell(String),
}

/// `--name=value` or `--name` flags as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub name: String,
    pub value: Option<String>,
}

/// A here-document: its body and whether `$` expansion applies (unquoted delimiter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HereDoc {
    pub body: String,
    pub expand: bool,
}

/// A COPY/ADD source: a path (maybe a glob or URL) or a here-document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Path(String),
    HereDoc { name: String, doc: HereDoc },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Raw `NAME[=default]` words.
    Arg(Vec<String>),
    /// Raw `KEY=VALUE` words, or the legacy `KEY VALUE` form turned into one pair.
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Run {
        flags: Vec<Flag>,
        command: Command,
        heredocs: Vec<HereDoc>,
    },
    Copy {
        flags: Vec<Flag>,
        sources: Vec<Source>,
        dest: String,
    },
    Add {
        flags: Vec<Flag>,
        sources: Vec<Source>,
        dest: String,
    },
    Cmd(Command),
    Entrypoint(Command),
    Shell(Vec<String>),
    Workdir(String),
    User(String),
    Expose(Vec<String>),
    Volume(Vec<String>),
    Stopsignal(String),
    Healthcheck {
        flags: Vec<Flag>,
        command: Option<Command>,
    },
    /// The trigger instruction's text, run when a child image builds FROM this one.
    Onbuild(String),
    Maintainer(String),
}

impl Kind {
    pub fn keyword(&self) -> &'static str {
        match self {
            Kind::Arg(_) => "ARG",
            Kind::Env(_) => "ENV",
            Kind::Label(_) => "LABEL",
            Kind::Run { .. } => "RUN",
            Kind::Copy { .. } => "COPY",
            Kind::Add { .. } => "ADD",
            Kind::Cmd(_) => "CMD",
            Kind::Entrypoint(_) => "ENTRYPOINT",
            Kind::Shell(_) => "SHELL",
            Kind::Workdir(_) => "WORKDIR",
            Kind::User(_) => "USER",
            Kind::Expose(_) => "EXPOSE",
            Kind::Volume(_) => "VOLUME",
            Kind::Stopsignal(_) => "STOPSIGNAL",
            Kind::Healthcheck { .. } => "HEALTHCHECK",
            Kind::Onbuild(_) => "ONBUILD",
            Kind::Maintainer(_) => "MAINTAINER",
        }
    }
}

impl Dockerfile {
    /// Read and parse a Dockerfile; `display_name` is how errors name it.
    pub fn load(path: &Path, display_name: &str) -> Result<Dockerfile, DockerfileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| DockerfileError::Read { file: display_name.to_string(), source })?;
        Dockerfile::parse(SourceFile::new(display_name, text))
    }

    pub fn parse(file: SourceFile) -> Result<Dockerfile, DockerfileError> {
        // Errors and spans refer to the normalized text; it differs from the file only by
        // whitespace after a continuation and a continuation at the very end.
        let file = SourceFile::new(file.name.clone(), continuation::normalize(&file.text));
        let text = file.text.clone();
        if let Some((line, keyword)) = instruction_before_from(&text) {
            let span = file.line_span(line);
            return Err(DockerfileError::Syntax(Box::new(Problems {
                file: file.clone(),
                problems: vec![Problem::new(
                    &file,
                    span,
                    format!("{keyword} before the first FROM"),
                    "only ARG may come before FROM",
                )
                .with_help("a Dockerfile starts with FROM, optionally after ARG lines")],
            })));
        }
        // The parser reads a RUN here-document only at the start of the command; the others
        // (`RUN cat <<EOF > f`, several here-documents) are taken out here, their lines
        // masked as comments so that line numbers stay, and given back to the RUN whole.
        let (masked, shell_heredocs) = mask_run_heredocs(&text);
        let masked = mask_empty_exec(&masked);
        let parsed = pd::parse(&masked).map_err(|e| {
            let span = file.line_span(e.line().max(1));
            let at = span.start + e.column().saturating_sub(1).min(span.len());
            DockerfileError::Syntax(Box::new(Problems {
                file: file.clone(),
                problems: vec![Problem::new(&file, at..at + 1, format!("{e:#}"), "here")
                    .with_help("see https://docs.docker.com/reference/dockerfile/")],
            }))
        })?;
        let escape = parsed.parser_directives.escape.as_ref().map_or('\\', |d| d.value.value);
        let syntax = parsed.parser_directives.syntax.as_ref().map(|d| d.value.value.to_string());
        let conv = Converter { file: &file, escape, shell_heredocs: &shell_heredocs };
        let mut global_args = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        for ins in &parsed.instructions {
            match ins {
                pd::Instruction::From(f) => {
                    let span = f.from.span.start..f.image.span.end;
                    let mut platform = None;
                    for flag in &f.options {
                        match flag.name.value.as_ref() {
                            "platform" => {
                                platform = flag.value.as_ref().map(|v| v.value.to_string())
                            }
                            other => {
                                return Err(conv.error(
                                    flag.span(),
                                    format!("FROM does not take --{other}"),
                                    "unknown flag",
                                ))
                            }
                        }
                    }
                    stages.push(Stage {
                        index: stages.len(),
                        name: f.as_.as_ref().map(|(_, n)| n.value.to_lowercase()),
                        from: From {
                            image: f.image.value.to_string(),
                            platform,
                            line: conv.line(span.start),
                            span,
                        },
                        instructions: Vec::new(),
                    });
                }
                other => {
                    let converted = conv.instruction(other)?;
                    match stages.last_mut() {
                        Some(stage) => stage.instructions.push(converted),
                        None if matches!(converted.kind, Kind::Arg(_)) => {
                            global_args.push(converted)
                        }
                        None => {
                            return Err(conv.error(
                                converted.span,
                                format!("{} before the first FROM", converted.kind.keyword()),
                                "only ARG may come before FROM",
                            ));
                        }
                    }
                }
            }
        }
        if stages.is_empty() {
            let end = file.text.len();
            return Err(conv.error(
                end..end,
                "the Dockerfile has no FROM instruction".into(),
                "end of file",
            ));
        }
        let mut seen = std::collections::BTreeMap::new();
        for s in &stages {
            if let Some(n) = &s.name {
                // BuildKit's rule for a stage name: `^[a-z][a-z0-9-_.]*$` (lowercased).
                let valid = n.starts_with(|c: char| c.is_ascii_lowercase())
                    && n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
                if !valid {
                    return Err(conv.error(
                        s.from.span.clone(),
                        format!("invalid name for build stage: `{n}`"),
                        "a stage name starts with a letter; then letters, digits, - _ .",
                    ));
                }
                if let Some(first) = seen.insert(n.clone(), s.from.line) {
                    return Err(conv.error(
                        s.from.span.clone(),
                        format!("stage name `{n}` is already used by the stage at line {first}"),
                        "duplicate stage name",
                    ));
                }
            }
        }
        Ok(Dockerfile { file, escape, syntax, global_args, stages })
    }

    /// The stage `target` names, or the last stage.
    pub fn target_stage(&self, target: Option<&str>) -> Option<usize> {
        match target {
            None => Some(self.stages.len() - 1),
            Some(t) => {
                let t = t.to_lowercase();
                self.stages.iter().position(|s| s.name.as_deref() == Some(t.as_str()))
            }
        }
    }

    /// A problem at an instruction, for errors found after parsing (expansion, build).
    pub fn problem(&self, span: Range<usize>, message: String, label: &str) -> Problem {
        Problem::new(&self.file, span, message, label)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    #[error("cannot read Dockerfile {file}: {source}")]
    Read { file: String, source: std::io::Error },
    #[error(transparent)]
    Syntax(Box<Problems>),
}

impl DockerfileError {
    pub fn into_report(self) -> miette::Report {
        match self {
            DockerfileError::Syntax(p) => p.into_report(),
            other => miette::Report::msg(other.to_string()),
        }
    }
}

struct Converter<'a> {
    file: &'a SourceFile,
    escape: char,
    /// RUN commands with here-documents the shell handles, by the line of their RUN.
    shell_heredocs: &'a std::collections::BTreeMap<usize, String>,
}

impl Converter<'_> {
    fn line(&self, offset: usize) -> usize {
        self.file.line_col(offset).0
    }

    fn error(&self, span: Range<usize>, message: String, label: &str) -> DockerfileError {
        DockerfileError::Syntax(Box::new(Problems {
            file: self.file.clone(),
            problems: vec![Problem::new(self.file, span, message, label)],
        }))
    }

    fn flags(&self, flags: &[pd::Flag<'_>]) -> Vec<Flag> {
        flags
            .iter()
            .map(|f| Flag {
                name: f.name.value.to_string(),
                value: f.value.as_ref().map(|v| v.value.to_string()),
            })
            .collect()
    }

    /// Shell-form text keeps its line continuations in the parser's output; a shell would
    /// see them joined, and docker drops comment lines inside a continued instruction.
    fn join_continuations(&self, raw: &str) -> String {
        let mut out = String::new();
        let mut lines = raw.split('\n').peekable();
        let mut first = true;
        while let Some(line) = lines.next() {
            let trimmed = line.trim_start();
            if !first && (trimmed.starts_with('#') || trimmed.is_empty()) && lines.peek().is_some()
            {
                continue;
            }
            first = false;
            let l = line.trim_end_matches('\r');
            match l.strip_suffix(self.escape) {
                Some(stripped) if lines.peek().is_some() => out.push_str(stripped),
                _ => {
                    out.push_str(l);
                    if lines.peek().is_some() {
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    fn command(&self, c: &pd::Command<'_>) -> Command {
        match c {
            pd::Command::Exec(v) => {
                Command::Exec(v.value.iter().map(|s| s.value.to_string()).collect())
            }
            pd::Command::Shell(s) if s.value.trim() == EMPTY_EXEC_MARK => Command::Exec(Vec::new()),
            pd::Command::Shell(s) => Command::Shell(self.join_continuations(s.value)),
            // The parser's enums are non-exhaustive; the pinned version has no other forms.
            _ => Command::Exec(Vec::new()),
        }
    }

    /// `keyword_start` is where the COPY/ADD line begins: here-document names are the
    /// delimiters written on that line, in order.
    fn sources(&self, src: &[pd::Source<'_>], keyword_start: usize) -> Vec<Source> {
        let line = self.file.text[keyword_start..].lines().next().unwrap_or_default();
        let mut names = heredoc_names(line).into_iter();
        src.iter()
            .map(|s| match s {
                pd::Source::Path(p) => Source::Path(p.value.to_string()),
                pd::Source::HereDoc(h) => Source::HereDoc {
                    name: names.next().unwrap_or_default(),
                    doc: HereDoc { body: h.value.to_string(), expand: h.expand },
                },
                _ => Source::Path(String::new()),
            })
            .collect()
    }

    fn pairs(
        &self,
        raw: &str,
        span: Range<usize>,
        what: &str,
    ) -> Result<Vec<(String, String)>, DockerfileError> {
        let words = expand::split_words(raw, self.escape);
        if words.is_empty() {
            return Err(self.error(
                span,
                format!("{what} needs at least one KEY=VALUE"),
                "no arguments",
            ));
        }
        // Legacy form: `ENV KEY some value` (no '=' in the first word).
        if !words[0].contains('=') {
            let key = words[0].clone();
            let value = raw.trim_start().get(key.len()..).unwrap_or_default().trim().to_string();
            if value.is_empty() && what == "ENV" {
                return Err(self.error(span, format!("ENV {key} needs a value"), "missing value"));
            }
            return Ok(vec![(key, value)]);
        }
        words
            .into_iter()
            .map(|w| match w.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(self.error(
                    span.clone(),
                    format!("{what}: `{w}` is not KEY=VALUE"),
                    "expected KEY=VALUE",
                )),
            })
            .collect()
    }

    fn instruction(&self, ins: &pd::Instruction<'_>) -> Result<Instruction, DockerfileError> {
        use pd::Instruction as I;
        let (start, end, kind) = match ins {
            I::Arg(a) => (
                a.arg.span.start,
                a.arguments.span.end,
                Kind::Arg(expand::split_words(&a.arguments.value, self.escape)),
            ),
            I::Env(e) => (
                e.env.span.start,
                e.arguments.span.end,
                Kind::Env(self.pairs(
                    &e.arguments.value,
                    e.env.span.start..e.arguments.span.end,
                    "ENV",
                )?),
            ),
            I::Label(l) => (
                l.label.span.start,
                l.arguments.span.end,
                Kind::Label(self.pairs(
                    &l.arguments.value,
                    l.label.span.start..l.arguments.span.end,
                    "LABEL",
                )?),
            ),
            I::Run(r) => (
                r.run.span.start,
                command_end(&r.arguments),
                Kind::Run {
                    flags: self.flags(&r.options),
                    command: match self.shell_heredocs.get(&self.line(r.run.span.start)) {
                        Some(full) => Command::Shell(full.clone()),
                        None => self.command(&r.arguments),
                    },
                    heredocs: r
                        .here_docs
                        .iter()
                        .map(|h| HereDoc { body: h.value.to_string(), expand: h.expand })
                        .collect(),
                },
            ),
            I::Copy(c) => (
                c.copy.span.start,
                c.dest.span.end,
                Kind::Copy {
                    flags: self.flags(&c.options),
                    sources: self.sources(&c.src, c.copy.span.start),
                    dest: c.dest.value.to_string(),
                },
            ),
            I::Add(a) => (
                a.add.span.start,
                a.dest.span.end,
                Kind::Add {
                    flags: self.flags(&a.options),
                    sources: self.sources(&a.src, a.add.span.start),
                    dest: a.dest.value.to_string(),
                },
            ),
            I::Cmd(c) => {
                (c.cmd.span.start, command_end(&c.arguments), Kind::Cmd(self.command(&c.arguments)))
            }
            I::Entrypoint(e) => (
                e.entrypoint.span.start,
                command_end(&e.arguments),
                Kind::Entrypoint(self.command(&e.arguments)),
            ),
            I::Shell(s) => (
                s.shell.span.start,
                s.arguments.last().map_or(s.shell.span.end, |a| a.span.end),
                Kind::Shell(s.arguments.iter().map(|a| a.value.to_string()).collect()),
            ),
            I::Workdir(w) => (
                w.workdir.span.start,
                w.arguments.span.end,
                Kind::Workdir(w.arguments.value.to_string()),
            ),
            I::User(u) => {
                (u.user.span.start, u.arguments.span.end, Kind::User(u.arguments.value.to_string()))
            }
            I::Expose(e) => (
                e.expose.span.start,
                e.arguments.last().map_or(e.expose.span.end, |a| a.span.end),
                Kind::Expose(e.arguments.iter().map(|a| a.value.to_string()).collect()),
            ),
            I::Volume(v) => {
                let (items, end) = match &v.arguments {
                    pd::JsonOrStringArray::Json(j) => {
                        (j.value.iter().map(|s| s.value.to_string()).collect(), j.span.end)
                    }
                    pd::JsonOrStringArray::String(s) => (
                        s.iter().map(|s| s.value.to_string()).collect(),
                        s.last().map_or(v.volume.span.end, |x| x.span.end),
                    ),
                };
                (v.volume.span.start, end, Kind::Volume(items))
            }
            I::Stopsignal(s) => (
                s.stopsignal.span.start,
                s.arguments.span.end,
                Kind::Stopsignal(s.arguments.value.to_string()),
            ),
            I::Healthcheck(h) => {
                let (command, end) = match &h.arguments {
                    pd::HealthcheckArguments::Cmd { arguments, .. } => {
                        (Some(self.command(arguments)), command_end(arguments))
                    }
                    pd::HealthcheckArguments::None { none, .. } => (None, none.span.end),
                    #[allow(unreachable_patterns)]
                    _ => (None, h.healthcheck.span.end),
                };
                (
                    h.healthcheck.span.start,
                    end,
                    Kind::Healthcheck { flags: self.flags(&h.options), command },
                )
            }
            I::Onbuild(o) => {
                let inner = self.instruction(&o.instruction)?;
                let text = self.file.text[inner.span.clone()].to_string();
                (
                    o.onbuild.span.start,
                    inner.span.end,
                    Kind::Onbuild(self.join_continuations(&text)),
                )
            }
            I::Maintainer(m) => (
                m.maintainer.span.start,
                m.name.span.end,
                Kind::Maintainer(m.name.value.to_string()),
            ),
            I::From(f) => {
                return Err(self.error(
                    f.from.span.clone(),
                    "FROM is not allowed here".into(),
                    "unexpected FROM",
                ))
            }
            _ => return Err(self.error(0..0, "unsupported instruction".into(), "unsupported")),
        };
        let end = end.max(start);
        Ok(Instruction { line: self.line(start), span: start..end, kind })
    }
}

/// What stands for an empty exec form (`ENTRYPOINT []`, which docker takes to reset the
/// entrypoint) while the parser, which refuses it, reads the Dockerfile: a shell form of the
/// same length, so that every byte offset stays.
const EMPTY_EXEC_MARK: &str = "\u{1}\u{1}";

/// `ENTRYPOINT []` / `CMD []` lines with the `[]` replaced by [`EMPTY_EXEC_MARK`].
fn mask_empty_exec(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let words: Vec<&str> = line.split_whitespace().collect();
        let empty = matches!(words.as_slice(), [kw, "[]"]
            if kw.eq_ignore_ascii_case("ENTRYPOINT") || kw.eq_ignore_ascii_case("CMD"));
        match line.rfind("[]") {
            Some(at) if empty => {
                out.push_str(&line[..at]);
                out.push_str(EMPTY_EXEC_MARK);
                out.push_str(&line[at + 2..]);
            }
            _ => out.push_str(line),
        }
    }
    out
}

fn command_end(c: &pd::Command<'_>) -> usize {
    match c {
        pd::Command::Exec(v) => v.span.end,
        pd::Command::Shell(s) => s.span.end,
        _ => 0,
    }
}

/// The delimiters of `<<NAME`, `<<-NAME`, `<<"NAME"` here-documents on a line, in order: a
/// `COPY <<NAME /dest` here-document is created as a file called NAME.
fn heredoc_names(line: &str) -> Vec<String> {
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix("<<"))
        .map(|w| w.trim_start_matches('-').trim_matches(['"', '\'']).to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Find RUN lines whose here-documents the parser cannot take (not at the start of the
/// command, or several): return the text with their bodies replaced by `#` lines, and per
/// RUN line the command as the shell must see it (first line after the flags, then the
/// here-document lines verbatim).
fn mask_run_heredocs(text: &str) -> (String, std::collections::BTreeMap<usize, String>) {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut masked: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut commands = std::collections::BTreeMap::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        // `get`: the line's fifth byte may be inside a multi-byte character.
        let Some(rest) = trimmed
            .get(..4)
            .filter(|k| k.eq_ignore_ascii_case("run "))
            .and_then(|_| trimmed.get(4..))
            .filter(|r| !r.is_empty())
        else {
            i += 1;
            continue;
        };
        // The command after `RUN` and its `--flags`.
        let mut command = rest.trim_start();
        while command.starts_with("--") {
            command = command.split_once(char::is_whitespace).map_or("", |(_, r)| r).trim_start();
        }
        let delimiters = heredoc_delimiters(command);
        let parser_handles = delimiters.len() == 1 && command.starts_with("<<");
        if delimiters.is_empty() || parser_handles {
            i += 1;
            continue;
        }
        let mut full = vec![command.to_string()];
        // The parser would read a here-document of its own after a leading `<<`: hide the
        // markers on the RUN line too (the command above keeps them).
        masked[i] = line.replace("<<", "  ");
        let mut j = i + 1;
        for (delim, strip_tabs) in &delimiters {
            while j < lines.len() {
                let body = lines[j];
                full.push(body.to_string());
                // Same byte length, so that the parser's offsets are offsets in the file.
                masked[j] = if body.is_empty() {
                    String::new()
                } else {
                    format!("#{}", " ".repeat(body.len() - 1))
                };
                j += 1;
                let candidate = if *strip_tabs { body.trim_start_matches('\t') } else { body };
                if candidate.trim_end_matches('\r') == delim {
                    break;
                }
            }
        }
        commands.insert(i + 1, full.join("\n"));
        i = j;
    }
    (masked.join("\n"), commands)
}

/// `<<EOF`, `<<-EOF`, `<<'EOF'`, `<<"EOF"` markers in a shell command, in order, with
/// whether leading tabs are stripped (`<<-`). `<<<` (a here-string) is not one.
fn heredoc_delimiters(command: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut rest = command;
    while let Some(pos) = rest.find("<<") {
        let after = &rest[pos + 2..];
        if after.starts_with('<') {
            rest = after.trim_start_matches('<');
            continue;
        }
        let (strip_tabs, after) = match after.strip_prefix('-') {
            Some(a) => (true, a),
            None => (false, after),
        };
        let after = after.trim_start_matches(['\'', '"']);
        let word: String =
            after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !word.is_empty() {
            out.push((word.clone(), strip_tabs));
        }
        rest = &after[word.len()..];
    }
    out
}

/// docker reports an instruction before the first FROM at its own line; the parser only says
/// that FROM is missing, so look for it first.
fn instruction_before_from(text: &str) -> Option<(usize, String)> {
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let keyword = t.split_whitespace().next().unwrap_or_default().to_ascii_uppercase();
        return match keyword.as_str() {
            "FROM" => None,
            // Skip the rest of a continued ARG line.
            "ARG" => {
                if t.ends_with('\\') {
                    return None;
                }
                continue;
            }
            _ => Some((i + 1, keyword)),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Dockerfile, DockerfileError> {
        Dockerfile::parse(SourceFile::new("Dockerfile", text))
    }

    #[test]
    fn stages_names_and_args() {
        let d = parse("ARG BASE=base\nFROM ${BASE} AS Build\nRUN echo hi \\\n  there\nFROM scratch\nCOPY --from=build /a /b\n").unwrap();
        assert_eq!(d.global_args.len(), 1);
        assert_eq!(d.stages.len(), 2);
        assert_eq!(d.stages[0].name.as_deref(), Some("build"));
        assert_eq!(d.stages[0].from.image, "${BASE}");
        assert_eq!(d.stages[0].from.line, 2);
        match &d.stages[0].instructions[0].kind {
            Kind::Run { command: Command::Shell(s), .. } => assert_eq!(s, "echo hi   there"),
            k => panic!("{k:?}"),
        }
        assert_eq!(d.stages[0].instructions[0].line, 3);
        match &d.stages[1].instructions[0].kind {
            Kind::Copy { flags, sources, dest } => {
                assert_eq!(flags[0], Flag { name: "from".into(), value: Some("build".into()) });
                assert_eq!(sources, &[Source::Path("/a".into())]);
                assert_eq!(dest, "/b");
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(d.target_stage(Some("BUILD")), Some(0));
        assert_eq!(d.target_stage(None), Some(1));
    }

    #[test]
    fn env_and_label_pairs() {
        let d = parse("FROM scratch\nENV A=1 B=\"x y\"\nENV LEGACY some value\nLABEL \"k\"=v\n")
            .unwrap();
        let k: Vec<_> = d.stages[0].instructions.iter().map(|i| i.kind.clone()).collect();
        assert_eq!(k[0], Kind::Env(vec![("A".into(), "1".into()), ("B".into(), "\"x y\"".into())]));
        assert_eq!(k[1], Kind::Env(vec![("LEGACY".into(), "some value".into())]));
        assert_eq!(k[2], Kind::Label(vec![("\"k\"".into(), "v".into())]));
    }

    #[test]
    fn heredocs_and_exec_form() {
        let d = parse("FROM scratch\nRUN <<EOF\necho a\nEOF\nCMD [\"/bin/sh\", \"-c\", \"x\"]\nCOPY <<conf.txt /etc/\nhello\nconf.txt\n").unwrap();
        let ins = &d.stages[0].instructions;
        match &ins[0].kind {
            Kind::Run { heredocs, .. } => assert_eq!(heredocs[0].body, "echo a\n"),
            k => panic!("{k:?}"),
        }
        assert_eq!(
            ins[1].kind,
            Kind::Cmd(Command::Exec(vec!["/bin/sh".into(), "-c".into(), "x".into()]))
        );
        assert_eq!(ins[1].line, 5);
        match &ins[2].kind {
            Kind::Copy { sources, .. } => match &sources[0] {
                Source::HereDoc { name, doc } => {
                    assert_eq!(name, "conf.txt");
                    assert_eq!(doc.body, "hello\n");
                }
                s => panic!("{s:?}"),
            },
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("FROM scratch\nCOPY onlyone\n").unwrap_err();
        match e {
            DockerfileError::Syntax(p) => assert_eq!(p.problems[0].line, 2, "{}", p.problems[0]),
            e => panic!("{e}"),
        }
        let e = parse("# comment\nRUN echo\n").unwrap_err();
        assert!(e.to_string().contains("Dockerfile:2"), "{e}");
        let e = parse("ARG X\n").unwrap_err();
        assert!(e.to_string().contains("FROM instruction"), "{e}");
        let e = parse("FROM a AS x\nFROM b AS x\n").unwrap_err();
        assert!(e.to_string().contains("Dockerfile:2:"), "{e}");
    }

    #[test]
    fn heredocs_anywhere_in_a_run_go_to_the_shell_whole() {
        let d = parse("FROM scratch\nRUN --network=none cat <<EOT > /f && cat <<-'B' >> /f\nline $X\nEOT\n\tb-line\nB\nENV A=1\n").unwrap();
        let ins = &d.stages[0].instructions;
        match &ins[0].kind {
            Kind::Run { command: Command::Shell(s), flags, heredocs } => {
                assert_eq!(s, "cat <<EOT > /f && cat <<-'B' >> /f\nline $X\nEOT\n\tb-line\nB");
                assert_eq!(flags[0].name, "network");
                assert!(heredocs.is_empty());
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(ins[1].line, 7, "line numbers after the here-documents are kept");
        assert_eq!(heredoc_delimiters("a <<< x <<\"Q\" y"), vec![("Q".to_string(), false)]);
    }

    /// Found by the `dockerfile` fuzz target: a multi-byte character where a RUN keyword's
    /// space would be was sliced through.
    #[test]
    fn multi_byte_characters_next_to_keywords_are_no_panic() {
        for text in [
            "FROM scratch\nRUN\u{db} x\n",
            "FROM scratch\nrun\u{db}\n",
            "FROM scratch\nENV \u{a0}K v\n",
            "FROM scratch\nLABEL \u{2003}k\u{e9} v\n",
        ] {
            let _ = parse(text);
        }
        assert!(parse("FROM scratch\nRUN\u{db} x\n").is_err());
    }

    #[test]
    fn escape_directive() {
        let d = parse("# escape=`\nFROM scratch\nRUN echo a `\n b\n").unwrap();
        assert_eq!(d.escape, '`');
        match &d.stages[0].instructions[0].kind {
            Kind::Run { command: Command::Shell(s), .. } => assert_eq!(s, "echo a  b"),
            k => panic!("{k:?}"),
        }
    }
}
