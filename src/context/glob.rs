//! Path-pattern primitives with Go's semantics, because Dockerfile users write patterns for
//! Go's `path/filepath`: `Clean` (lexical path normalisation) and `Match` (one shell pattern
//! against one name, `*` and `?` never crossing `/`). COPY sources and `--exclude` use them, and
//! the `.dockerignore` matcher builds on the same character-class syntax.

/// Why a pattern is malformed (Go's `filepath.ErrBadPattern`, with the reason spelled out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPattern(pub &'static str);

impl std::fmt::Display for BadPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Lexical path clean with Go's `path.Clean` rules: collapse `//`, drop `.` elements, resolve
/// `x/..` pairs, drop `..` at the start of a rooted path, no trailing slash, `.` for empty.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for elem in path.split('/') {
        match elem {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|last| *last != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            _ => out.push(elem),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// Go's `filepath.Dir`: everything before the last `/`, cleaned; `.` when there is no `/`.
pub fn dir(path: &str) -> String {
    match path.rfind('/') {
        Some(i) => clean(&path[..=i]),
        None => ".".to_string(),
    }
}

/// Whether a COPY source contains glob syntax (as BuildKit decides: a `\` escapes the next
/// character, so `a\*` is a literal name).
pub fn has_wildcards(s: &str) -> bool {
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// One piece of a parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Token {
    Literal(char),
    /// `*`: any run of non-`/` characters.
    Star,
    /// `?`: one non-`/` character.
    AnyChar,
    /// `[...]`: one character in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// Parse a pattern with Go's `filepath.Match` grammar, rejecting what Go rejects
/// (`[`, `[]a]`, `[-]`, `[x-]`, `[a-b-c]`, a trailing `\`, ...).
pub(crate) fn parse(pattern: &str) -> Result<Vec<Token>, BadPattern> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' => {
                tokens.push(Token::Star);
                i += 1;
            }
            '?' => {
                tokens.push(Token::AnyChar);
                i += 1;
            }
            '\\' => {
                let c = *chars.get(i + 1).ok_or(BadPattern("a trailing \\ escapes nothing"))?;
                tokens.push(Token::Literal(c));
                i += 2;
            }
            '[' => {
                let (token, next) = parse_class(&chars, i + 1)?;
                tokens.push(token);
                i = next;
            }
            c => {
                tokens.push(Token::Literal(c));
                i += 1;
            }
        }
    }
    Ok(tokens)
}

/// Parse a character class whose `[` was just consumed; returns the token and the index after
/// the closing `]`.
pub(crate) fn parse_class(chars: &[char], mut i: usize) -> Result<(Token, usize), BadPattern> {
    const UNCLOSED: BadPattern = BadPattern("unclosed character class [");
    let mut negated = false;
    if chars.get(i) == Some(&'^') {
        negated = true;
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        match chars.get(i) {
            None => return Err(UNCLOSED),
            Some(']') if !ranges.is_empty() => {
                return Ok((Token::Class { negated, ranges }, i + 1))
            }
            Some(_) => {}
        }
        let (lo, next) = class_char(chars, i)?;
        i = next;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            let (h, next) = class_char(chars, i + 1)?;
            hi = h;
            i = next;
        }
        ranges.push((lo, hi));
    }
}

/// One (possibly escaped) character inside a class; an unescaped `-` or `]` is malformed here,
/// exactly as in Go.
fn class_char(chars: &[char], i: usize) -> Result<(char, usize), BadPattern> {
    match chars.get(i) {
        None => Err(BadPattern("unclosed character class [")),
        Some('-') | Some(']') => {
            Err(BadPattern("'-' or ']' must be escaped with \\ in a character class"))
        }
        Some('\\') => match chars.get(i + 1) {
            Some(c) => Ok((*c, i + 2)),
            None => Err(BadPattern("a trailing \\ escapes nothing")),
        },
        Some(c) => Ok((*c, i + 1)),
    }
}

pub(crate) fn class_matches(negated: bool, ranges: &[(char, char)], c: char) -> bool {
    let inside = ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi);
    inside != negated
}

/// A compiled `filepath.Match` pattern for one path component (or a whole slash path: `*` and
/// `?` never match `/`, so components line up just as Go's do).
#[derive(Debug, Clone)]
pub struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, BadPattern> {
        Ok(Glob { tokens: parse(pattern)? })
    }

    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        match_tokens(&self.tokens, &name)
    }
}

/// Backtracking matcher: on a `*`, remember where it was and how much of the name it has
/// taken, and on a later mismatch let it take one more non-`/` character.
fn match_tokens(tokens: &[Token], name: &[char]) -> bool {
    let (mut t, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    loop {
        if t < tokens.len() {
            let step = match &tokens[t] {
                Token::Star => {
                    star = Some((t, n));
                    t += 1;
                    continue;
                }
                Token::AnyChar => name.get(n).is_some_and(|c| *c != '/'),
                Token::Literal(l) => name.get(n) == Some(l),
                Token::Class { negated, ranges } => {
                    name.get(n).is_some_and(|c| *c != '/' && class_matches(*negated, ranges, *c))
                }
            };
            if step {
                t += 1;
                n += 1;
                continue;
            }
        } else if n == name.len() {
            return true;
        }
        match star {
            Some((st, sn)) if sn < name.len() && name[sn] != '/' => {
                star = Some((st, sn + 1));
                t = st + 1;
                n = sn + 1;
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_follows_go() {
        for (input, want) in [
            ("", "."),
            (".", "."),
            ("/", "/"),
            ("//a//b/", "/a/b"),
            ("a/./b", "a/b"),
            ("a/../b", "b"),
            ("a/../../b", "../b"),
            ("/../a", "/a"),
            ("../../a/..", "../.."),
            ("docs/", "docs"),
            ("!docs/../x", "x"),
        ] {
            assert_eq!(clean(input), want, "clean({input:?})");
        }
        assert_eq!(dir("dir/file/"), "dir/file");
        assert_eq!(dir("file"), ".");
        assert_eq!(dir("/file"), "/");
    }

    #[test]
    fn wildcard_detection_honours_escapes() {
        assert!(has_wildcards("*.txt"));
        assert!(has_wildcards("a/b?"));
        assert!(has_wildcards("x[ab]"));
        assert!(!has_wildcards("plain/path"));
        assert!(!has_wildcards(r"a\*b"));
    }

    // Go's own filepath.Match cases (the same table moby's patternmatcher reuses).
    #[test]
    fn go_match_table() {
        let ok = [
            ("abc", "abc", true),
            ("*", "abc", true),
            ("*c", "abc", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ab/c", false),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", false),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", false),
            ("a*b?c*x", "abxbbxdbxebxczzx", true),
            ("a*b?c*x", "abxbbxdbxebxczzy", false),
            ("ab[c]", "abc", true),
            ("ab[b-d]", "abc", true),
            ("ab[e-g]", "abc", false),
            ("ab[^c]", "abc", false),
            ("ab[^b-d]", "abc", false),
            ("ab[^e-g]", "abc", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "ab", false),
            ("a?b", "a☺b", true),
            ("a[^a]b", "a☺b", true),
            ("a???b", "a☺b", false),
            ("a[^a][^a][^a]b", "a☺b", false),
            ("[a-ζ]*", "α", true),
            ("*[a-ζ]", "A", false),
            ("a?b", "a/b", false),
            ("a*b", "a/b", false),
            ("[\\]a]", "]", true),
            ("[\\-]", "-", true),
            ("[x\\-]", "x", true),
            ("[x\\-]", "-", true),
            ("[x\\-]", "z", false),
            ("[\\-x]", "x", true),
            ("[\\-x]", "-", true),
            ("[\\-x]", "a", false),
            ("*x", "xxx", true),
            (".*", ".hidden", true),
        ];
        for (pattern, name, want) in ok {
            let glob = Glob::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(glob.matches(name), want, "Match({pattern:?}, {name:?})");
        }
        for bad in ["[]a]", "[-]", "[x-]", "[-x]", "\\", "[a-b-c]", "[", "[^", "[^bc", "a[", "ab\\"]
        {
            assert!(Glob::new(bad).is_err(), "{bad:?} must be a bad pattern");
        }
    }
}
