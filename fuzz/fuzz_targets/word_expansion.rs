//! BuildKit-style word expansion: `NAME=VALUE` lines set variables, the last line is
//! expanded as one word and as a word list with both escape characters.
#![no_main]

use ferry::dockerfile::expand::{split_words, Lexer, Vars};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines: Vec<&str> = text.split('\n').collect();
    let word = lines.pop().unwrap_or_default();
    let mut vars = Vars::new();
    for l in lines {
        let (k, v) = l.split_once('=').unwrap_or((l, ""));
        vars.insert(k.to_string(), v.to_string());
    }
    for escape in ['\\', '`'] {
        let lexer = Lexer { escape };
        let _ = lexer.expand_word(word, &vars);
        let _ = lexer.expand_words(word, &vars);
        let _ = split_words(word, escape);
    }
});
