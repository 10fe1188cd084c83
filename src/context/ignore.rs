//! `.dockerignore` files and the path matcher behind them, with docker's semantics (moby's
//! `patternmatcher` and its ignore-file reader), so that a context ferry builds contains exactly
//! the files `docker build` would send. The same matcher serves `COPY --exclude`.
//!
//! Semantics, in short: patterns are evaluated in order and the last one that matches a path
//! decides (a `!` pattern re-includes); a pattern matches a path if it matches the path itself
//! or any of its parent directories, so excluding `docs` excludes everything below it while
//! `!docs/README.md` can still bring one file back; `**` spans any number of directories.

use std::path::{Path, PathBuf};

use regex::Regex;

use super::glob::{self, BadPattern, Token};
use super::ContextError;

/// How one pattern compares paths. Mirrors moby's four kinds: they are not just an
/// optimisation, they decide edge cases (`**file` is a plain suffix test and so matches
/// `dir/myfile`, which the regular expression form would not).
#[derive(Debug, Clone)]
enum MatchKind {
    Exact(String),
    /// `dir/**`: the path starts with `dir/`.
    Prefix(String),
    /// `**/foo`, `**foo`: the path ends with the rest of the pattern.
    Suffix(String),
    Regex(Regex),
}

/// One cleaned pattern of an ignore list.
#[derive(Debug, Clone)]
pub struct IgnorePattern {
    /// The pattern after cleaning, without its `!`.
    text: String,
    exception: bool,
    kind: MatchKind,
}

impl IgnorePattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            MatchKind::Exact(p) => path == p,
            MatchKind::Prefix(p) => path.starts_with(p.as_str()),
            MatchKind::Suffix(s) => {
                path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            MatchKind::Regex(re) => re.is_match(path),
        }
    }

    /// The pattern as written after cleaning (without `!`).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn is_exception(&self) -> bool {
        self.exception
    }
}

/// An ordered list of ignore patterns (a `.dockerignore`, or the `--exclude` flags of one COPY).
#[derive(Debug, Clone, Default)]
pub struct IgnoreMatcher {
    patterns: Vec<IgnorePattern>,
}

impl IgnoreMatcher {
    /// Compile patterns as moby's `patternmatcher.New` does: whitespace trimmed, empty ones
    /// skipped, each cleaned, a leading `!` marking an exception. On error, returns the index of
    /// the offending pattern and why.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<IgnoreMatcher, (usize, BadPattern)> {
        let mut compiled = Vec::new();
        for (index, raw) in patterns.iter().enumerate() {
            let trimmed = raw.as_ref().trim();
            if trimmed.is_empty() {
                continue;
            }
            let cleaned = glob::clean(trimmed);
            let (exception, text) = match cleaned.strip_prefix('!') {
                Some("") => return Err((index, BadPattern("illegal exclusion pattern \"!\""))),
                Some(rest) => (true, rest.to_string()),
                None => (false, cleaned),
            };
            let kind = compile(&text).map_err(|e| (index, e))?;
            compiled.push(IgnorePattern { text, exception, kind });
        }
        Ok(IgnoreMatcher { patterns: compiled })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn patterns(&self) -> &[IgnorePattern] {
        &self.patterns
    }

    /// Whether any pattern is a `!` exception.
    pub fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exception)
    }

    /// Whether `path` (relative, `/`-separated, no trailing slash) is excluded: the last
    /// pattern matching the path or one of its parent directories decides (moby's
    /// `MatchesOrParentMatches`).
    pub fn matches(&self, path: &str) -> bool {
        if self.patterns.is_empty() || path.is_empty() || path == "." {
            // The root of the tree is never excluded (docker: "kind of silly").
            return false;
        }
        // The parent directories, shortest first: "a", "a/b" for "a/b/c" (the same strings
        // moby builds by splitting and re-joining, sliced once per path instead).
        let parent = glob::dir(path);
        let parents: Vec<&str> = if parent == "." {
            Vec::new()
        } else {
            parent
                .match_indices('/')
                .map(|(i, _)| &parent[..i])
                .chain(std::iter::once(parent.as_str()))
                .collect()
        };
        let mut excluded = false;
        for pattern in &self.patterns {
            // An include pattern cannot change an excluded path, nor an exception an
            // included one.
            if pattern.exception != excluded {
                continue;
            }
            let hit = pattern.matches(path) || parents.iter().any(|p| pattern.matches(p));
            if hit {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Whether something below the excluded directory `dir` might be re-included by an
    /// exception, so that the directory has to be walked rather than skipped. Exact for
    /// literal exceptions; any exception with glob syntax is assumed to possibly apply.
    pub fn may_reinclude_below(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.patterns.iter().filter(|p| p.exception).any(|p| {
            glob::has_wildcards(&p.text) || p.text.contains('\\') || p.text.starts_with(&prefix)
        })
    }
}

/// Translate one cleaned pattern, as moby's `Pattern.compile` does, into its match kind.
fn compile(pattern: &str) -> Result<MatchKind, BadPattern> {
    // Reject what Go's filepath.Match rejects, as docker does before compiling.
    glob::parse(pattern)?;

    #[derive(PartialEq, Clone, Copy)]
    enum Detected {
        Exact,
        Prefix,
        Suffix,
        Regex,
    }
    let chars: Vec<char> = pattern.chars().collect();
    let mut regex = String::from("(?s)^");
    let mut detected = Detected::Exact;
    let mut i = 0;
    while i < chars.len() {
        let at_start = i == 0;
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                // `**/` is the same as `**`.
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i == chars.len() {
                    // A trailing `**` accepts everything below, as in .gitignore.
                    if detected == Detected::Exact {
                        detected = Detected::Prefix;
                    } else {
                        regex.push_str(".*");
                        detected = Detected::Regex;
                    }
                } else {
                    // Any number of directories, including none.
                    regex.push_str("(.*/)?");
                    detected = Detected::Regex;
                }
                if at_start {
                    detected = Detected::Suffix;
                }
            }
            '*' => {
                regex.push_str("[^/]*");
                detected = Detected::Regex;
            }
            '?' => {
                regex.push_str("[^/]");
                detected = Detected::Regex;
            }
            '\\' => {
                // parse() guarantees an escaped character follows.
                if let Some(next) = chars.get(i) {
                    regex.push_str(&regex::escape(&next.to_string()));
                    i += 1;
                }
                detected = Detected::Regex;
            }
            '[' => {
                let (class, next) = class_at(&chars, i)?;
                regex.push_str(&class);
                i = next;
                detected = Detected::Regex;
            }
            ']' => {
                regex.push_str(&regex::escape("]"));
                detected = Detected::Regex;
            }
            other => regex.push_str(&regex::escape(&other.to_string())),
        }
    }
    Ok(match detected {
        Detected::Exact => MatchKind::Exact(pattern.to_string()),
        Detected::Prefix => MatchKind::Prefix(strip_last_two(pattern)),
        Detected::Suffix => MatchKind::Suffix(pattern.chars().skip(2).collect()),
        Detected::Regex => {
            regex.push('$');
            // A class Go accepts can still be one no regular expression can hold (an inverted
            // range such as `[z-a]`); docker fails on those too.
            MatchKind::Regex(Regex::new(&regex).map_err(|_| BadPattern("invalid character class"))?)
        }
    })
}

fn strip_last_two(s: &str) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    chars.truncate(chars.len().saturating_sub(2));
    chars.into_iter().collect()
}

/// The regular-expression form of the class whose `[` is at `chars[start - 1]`, and the index
/// after its `]`. Every member is escaped, so the class means what Go's `filepath.Match` says,
/// whatever the regular-expression dialect would make of `[`, `&&` or `--` inside a class.
fn class_at(chars: &[char], start: usize) -> Result<(String, usize), BadPattern> {
    let (token, next) = glob::parse_class(chars, start)?;
    let Token::Class { negated, ranges } = token else {
        return Err(BadPattern("unclosed character class ["));
    };
    let mut class = String::from("[");
    if negated {
        class.push('^');
    }
    for (lo, hi) in &ranges {
        class.push_str(&regex::escape(&lo.to_string()));
        if lo != hi {
            class.push('-');
            class.push_str(&regex::escape(&hi.to_string()));
        }
    }
    class.push(']');
    Ok((class, next))
}

/// The patterns of an ignore file, with the line each came from (for error messages).
#[derive(Debug, Clone, Default)]
pub struct IgnoreFile {
    /// Where the patterns came from; `None` when there was no ignore file.
    pub path: Option<PathBuf>,
    /// The patterns as docker's reader returns them (cleaned, `/` prefix dropped).
    pub patterns: Vec<String>,
    /// 1-based line number of each pattern.
    pub lines: Vec<usize>,
    matcher: IgnoreMatcher,
}

impl IgnoreFile {
    /// No ignore rules: everything is visible.
    pub fn none() -> IgnoreFile {
        IgnoreFile::default()
    }

    /// Parse ignore-file text with the rules of docker's reader: a UTF-8 BOM dropped, lines
    /// starting with `#` skipped, whitespace trimmed, blank lines skipped, each pattern
    /// cleaned and a leading `/` dropped (`/a` and `a` are the same), `!` kept in front.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<IgnoreFile, ContextError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        let mut lines = Vec::new();
        for (index, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            patterns.push(normalize_pattern(line));
            lines.push(index + 1);
        }
        let matcher = IgnoreMatcher::new(&patterns).map_err(|(i, reason)| {
            ContextError::BadIgnorePattern {
                file: path.map(Path::to_path_buf).unwrap_or_default(),
                line: lines[i],
                pattern: patterns[i].clone(),
                reason: reason.to_string(),
            }
        })?;
        Ok(IgnoreFile { path: path.map(Path::to_path_buf), patterns, lines, matcher })
    }

    /// Load the ignore file docker would use for a build: `<Dockerfile>.dockerignore` beside
    /// the Dockerfile if it exists, else `<context>/.dockerignore`, else no rules.
    pub fn load(context: &Path, dockerfile: Option<&Path>) -> Result<IgnoreFile, ContextError> {
        let mut candidates = Vec::new();
        if let Some(dockerfile) = dockerfile {
            let mut name = dockerfile.as_os_str().to_owned();
            name.push(".dockerignore");
            let specific = PathBuf::from(name);
            candidates.push(if specific.is_absolute() { specific } else { context.join(specific) });
        }
        candidates.push(context.join(".dockerignore"));
        for candidate in candidates {
            match std::fs::read(&candidate) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    tracing::debug!(file = %candidate.display(), "using ignore file");
                    return IgnoreFile::parse(&text, Some(&candidate));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ContextError::Io { path: candidate, source }),
            }
        }
        Ok(IgnoreFile::none())
    }

    pub fn matcher(&self) -> &IgnoreMatcher {
        &self.matcher
    }

    /// Whether `path` (relative to the context root, `/`-separated) is excluded.
    pub fn excludes(&self, path: &str) -> bool {
        self.matcher.matches(path)
    }
}

/// Normalise one pattern as docker's ignore-file reader does (also applied to `--exclude`).
pub(crate) fn normalize_pattern(line: &str) -> String {
    let (invert, rest) = match line.strip_prefix('!') {
        Some(rest) => (true, rest.trim()),
        None => (false, line),
    };
    let mut pattern = String::new();
    if !rest.is_empty() {
        pattern = glob::clean(rest);
        if pattern.len() > 1 {
            if let Some(stripped) = pattern.strip_prefix('/') {
                pattern = stripped.to_string();
            }
        }
    }
    if invert {
        format!("!{pattern}")
    } else {
        pattern
    }
}

#[cfg(test)]
mod tests;
