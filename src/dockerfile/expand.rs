//! Word expansion as BuildKit's shell lexer does it: quotes, the escape character, and
//! `$v ${v} ${v:-w} ${v-w} ${v:+w} ${v+w} ${v:?w} ${v?w}`. No command substitution, no
//! globbing: a Dockerfile word is never run through a shell here.

use std::collections::BTreeMap;

/// Variables visible to an instruction: build args and environment, already merged.
pub type Vars = BTreeMap<String, String>;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExpandError {
    #[error("unexpected end of text while looking for the matching {0}")]
    Unterminated(&'static str),
    #[error("bad substitution `{0}`")]
    BadSubstitution(String),
    #[error("{name}: {message}")]
    Required { name: String, message: String },
}

/// The lexer; `escape` is the Dockerfile's escape character (`\` or a backtick).
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    pub escape: char,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer { escape: '\\' }
    }
}

/// Which variables an expansion read; the cache key includes exactly these.
#[derive(Debug, Default, Clone)]
pub struct Used(pub std::collections::BTreeSet<String>);

impl Lexer {
    /// Expand one word, removing quotes.
    pub fn expand_word(&self, word: &str, vars: &Vars) -> Result<String, ExpandError> {
        let mut used = Used::default();
        self.expand_word_tracked(word, vars, &mut used)
    }

    pub fn expand_word_tracked(
        &self,
        word: &str,
        vars: &Vars,
        used: &mut Used,
    ) -> Result<String, ExpandError> {
        let chars: Vec<char> = word.chars().collect();
        let mut p = Parser { chars: &chars, pos: 0, escape: self.escape, vars, used, depth: 0 };
        let (out, _) = p.word(&[])?;
        Ok(out)
    }

    /// Split text into words on unquoted whitespace, expanding each. A word that was only an
    /// unquoted variable expanding to nothing disappears, as in a shell.
    pub fn expand_words(&self, text: &str, vars: &Vars) -> Result<Vec<String>, ExpandError> {
        let mut used = Used::default();
        self.expand_words_tracked(text, vars, &mut used)
    }

    pub fn expand_words_tracked(
        &self,
        text: &str,
        vars: &Vars,
        used: &mut Used,
    ) -> Result<Vec<String>, ExpandError> {
        let mut words = Vec::new();
        for raw in split_words(text, self.escape) {
            let quoted = raw.contains(['"', '\'']);
            let w = self.expand_word_tracked(&raw, vars, used)?;
            if !w.is_empty() || quoted {
                words.push(w);
            }
        }
        Ok(words)
    }
}

/// Split on unquoted whitespace, keeping quotes and escapes in the words (BuildKit's
/// `parseWords`), for `KEY=VALUE` lists in ENV, LABEL and ARG.
pub fn split_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match quote {
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                in_word = true;
                cur.push(c);
                if c == escape {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == '"' || c == '\'' {
                    quote = Some(c);
                }
            }
            Some(q) => {
                cur.push(c);
                if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == q {
                    quote = None;
                }
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

struct Parser<'a> {
    chars: &'a [char],
    pos: usize,
    escape: char,
    vars: &'a Vars,
    used: &'a mut Used,
    /// `${…}` nesting at the current position: each level recurses, so it is bounded.
    depth: usize,
}

/// Deepest `${a:-${b:-…}}` nesting accepted. Real Dockerfiles nest two or three levels;
/// unbounded recursion would let a word overflow the stack, which aborts the process.
const MAX_NESTING: usize = 64;

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    /// Read until end or an unquoted character in `stop`; returns the text and the stop char.
    fn word(&mut self, stop: &[char]) -> Result<(String, Option<char>), ExpandError> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if stop.contains(&c) {
                self.pos += 1;
                return Ok((out, Some(c)));
            }
            self.pos += 1;
            if c == self.escape {
                match self.peek() {
                    Some(n) => {
                        self.pos += 1;
                        out.push(n);
                    }
                    None => out.push(c),
                }
            } else if c == '\'' {
                out.push_str(&self.single_quoted()?);
            } else if c == '"' {
                out.push_str(&self.double_quoted()?);
            } else if c == '$' {
                out.push_str(&self.dollar()?);
            } else {
                out.push(c);
            }
        }
        Ok((out, None))
    }

    fn single_quoted(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(ExpandError::Unterminated("single quote")),
                Some('\'') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(c) => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(ExpandError::Unterminated("double quote")),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => {
                    self.pos += 1;
                    out.push_str(&self.dollar()?);
                }
                Some(c) if c == self.escape => {
                    self.pos += 1;
                    match self.peek() {
                        Some(n) if n == '"' || n == '$' || n == self.escape => {
                            self.pos += 1;
                            out.push(n);
                        }
                        _ => out.push(c),
                    }
                }
                Some(c) => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
    }

    fn lookup(&mut self, name: &str) -> Option<String> {
        self.used.0.insert(name.to_string());
        self.vars.get(name).cloned()
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                self.pos += 1;
            } else {
                break;
            }
        }
        name
    }

    /// After a `$`.
    fn dollar(&mut self) -> Result<String, ExpandError> {
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                self.braced()
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let name = self.name();
                Ok(self.lookup(&name).unwrap_or_default())
            }
            _ => Ok("$".to_string()),
        }
    }

    /// After `${`.
    fn braced(&mut self) -> Result<String, ExpandError> {
        if self.depth >= MAX_NESTING {
            return Err(ExpandError::BadSubstitution(format!(
                "${{{}…: nested more than {MAX_NESTING} levels deep",
                self.rest()
            )));
        }
        self.depth += 1;
        let result = self.braced_inner();
        self.depth -= 1;
        result
    }

    fn braced_inner(&mut self) -> Result<String, ExpandError> {
        let name = self.name();
        if name.is_empty() {
            return Err(ExpandError::BadSubstitution(format!("${{{}", self.rest())));
        }
        let value = self.lookup(&name);
        match self.peek() {
            None => Err(ExpandError::Unterminated("closing brace `}`")),
            Some('}') => {
                self.pos += 1;
                Ok(value.unwrap_or_default())
            }
            Some(c @ (':' | '-' | '+' | '?')) => {
                self.pos += 1;
                let colon = c == ':';
                let op = if colon {
                    let op = self.peek().ok_or(ExpandError::Unterminated("closing brace `}`"))?;
                    self.pos += 1;
                    op
                } else {
                    c
                };
                if !matches!(op, '-' | '+' | '?') {
                    return Err(ExpandError::BadSubstitution(format!("${{{name}:{op}")));
                }
                let (word, end) = self.word(&['}'])?;
                if end.is_none() {
                    return Err(ExpandError::Unterminated("closing brace `}`"));
                }
                // With a colon, an empty value counts as unset.
                let set = match &value {
                    Some(v) => !(colon && v.is_empty()),
                    None => false,
                };
                Ok(match op {
                    '-' => {
                        if set {
                            value.unwrap_or_default()
                        } else {
                            word
                        }
                    }
                    '+' => {
                        if set {
                            word
                        } else {
                            String::new()
                        }
                    }
                    _ => {
                        if set {
                            value.unwrap_or_default()
                        } else {
                            let message =
                                if word.is_empty() { "is not set".to_string() } else { word };
                            return Err(ExpandError::Required { name, message });
                        }
                    }
                })
            }
            Some(_) => Err(ExpandError::BadSubstitution(format!("${{{name}{}", self.rest()))),
        }
    }

    fn rest(&self) -> String {
        self.chars[self.pos..].iter().take(20).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `${` level recursed without bound: a long enough word overflowed the stack.
    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let lexer = Lexer::default();
        let deep = format!("{}x{}", "${A:-".repeat(100_000), "}".repeat(100_000));
        // A thread with a small stack, as the build's workers have.
        let err = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || lexer.expand_word(&deep, &Vars::new()))
            .unwrap()
            .join()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("nested more than 64 levels"), "{err}");
        let ok = format!("{}x{}", "${A:-".repeat(64), "}".repeat(64));
        assert_eq!(lexer.expand_word(&ok, &Vars::new()).unwrap(), "x");
    }

    fn vars() -> Vars {
        [("A", "a"), ("EMPTY", ""), ("SP", "x y")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ex(w: &str) -> String {
        Lexer::default().expand_word(w, &vars()).unwrap()
    }

    #[test]
    fn plain_and_braced() {
        assert_eq!(ex("$A"), "a");
        assert_eq!(ex("${A}b"), "ab");
        assert_eq!(ex("$Ab"), "");
        assert_eq!(ex("pre-$A-post"), "pre-a-post");
        assert_eq!(ex("$"), "$");
        assert_eq!(ex("a$"), "a$");
        assert_eq!(ex("$1"), "$1");
        assert_eq!(ex("$UNSET"), "");
    }

    #[test]
    fn modifiers() {
        assert_eq!(ex("${UNSET:-def}"), "def");
        assert_eq!(ex("${EMPTY:-def}"), "def");
        assert_eq!(ex("${EMPTY-def}"), "");
        assert_eq!(ex("${UNSET-def}"), "def");
        assert_eq!(ex("${A:-def}"), "a");
        assert_eq!(ex("${A:+alt}"), "alt");
        assert_eq!(ex("${EMPTY:+alt}"), "");
        assert_eq!(ex("${EMPTY+alt}"), "alt");
        assert_eq!(ex("${UNSET+alt}"), "");
        assert_eq!(ex("${UNSET:-$A$A}"), "aa");
        assert_eq!(ex("${UNSET:-${A:+x}}"), "x");
        assert!(matches!(
            Lexer::default().expand_word("${UNSET:?must be set}", &vars()),
            Err(ExpandError::Required { .. })
        ));
        assert_eq!(ex("${A:?x}"), "a");
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(ex("'$A'"), "$A");
        assert_eq!(ex("\"$A\""), "a");
        assert_eq!(ex("\\$A"), "$A");
        assert_eq!(ex("\"\\$A\""), "$A");
        assert_eq!(ex("\"a\\b\""), "a\\b");
        assert_eq!(ex("a\\ b"), "a b");
        assert_eq!(ex("\"x\"'y'z"), "xyz");
        let tick = Lexer { escape: '`' };
        assert_eq!(tick.expand_word("`$A", &vars()).unwrap(), "$A");
        assert_eq!(tick.expand_word("C:\\dir", &vars()).unwrap(), "C:\\dir");
    }

    #[test]
    fn errors() {
        let l = Lexer::default();
        assert!(l.expand_word("'abc", &vars()).is_err());
        assert!(l.expand_word("\"abc", &vars()).is_err());
        assert!(l.expand_word("${A", &vars()).is_err());
        assert!(l.expand_word("${}", &vars()).is_err());
        assert!(l.expand_word("${A:x}", &vars()).is_err());
    }

    #[test]
    fn words() {
        let l = Lexer::default();
        assert_eq!(
            l.expand_words("a  $A \"b c\" $UNSET ''", &vars()).unwrap(),
            ["a", "a", "b c", ""]
        );
        assert_eq!(split_words("A=1 B=\"x y\" C='$z'", '\\'), ["A=1", "B=\"x y\"", "C='$z'"]);
    }

    #[test]
    fn tracks_used_variables() {
        let mut used = Used::default();
        Lexer::default().expand_word_tracked("$A ${UNSET:-x} $$", &vars(), &mut used).unwrap();
        assert_eq!(used.0.into_iter().collect::<Vec<_>>(), ["A", "UNSET"]);
    }
}
