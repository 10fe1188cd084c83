//! Line continuations as docker's parser reads them, applied to the text before the parser
//! (parse-dockerfile) sees it:
//! - an escape character followed only by spaces or tabs still continues the line (BuildKit
//!   matches a continuation with `\\[ \t]*$`), so that whitespace is dropped here;
//! - a continuation on the last instruction of the file (nothing but blank or comment lines
//!   after it) just ends that instruction, so its escape character is dropped.
//!
//! Here-document bodies are left exactly as written. Only characters inside a line are
//! removed, so line numbers stay those of the file.

/// `text` with its continuations in the form the parser takes.
pub fn normalize(text: &str) -> String {
    let escape = escape_directive(text).unwrap_or('\\');
    let mut lines: Vec<(String, Line)> = Vec::new();
    let mut pending: Vec<(String, bool)> = Vec::new();
    for raw in text.split_inclusive('\n') {
        let (content, ending) = split_ending(raw);
        if let Some((delimiter, strip_tabs)) = pending.first().cloned() {
            let candidate = if strip_tabs { content.trim_start_matches('\t') } else { content };
            if candidate == delimiter {
                pending.remove(0);
            }
            lines.push((raw.to_string(), Line::HereDoc));
            continue;
        }
        if content.trim_start().starts_with('#') {
            lines.push((raw.to_string(), Line::Comment));
            continue;
        }
        pending = super::heredoc_delimiters(content);
        let trimmed = content.trim_end_matches([' ', '\t']);
        let line = if trimmed.ends_with(escape) && trimmed.len() != content.len() {
            format!("{trimmed}{ending}")
        } else {
            raw.to_string()
        };
        lines.push((line, Line::Instruction));
    }
    let last = lines
        .iter_mut()
        .rev()
        .find(|(l, kind)| *kind != Line::Comment && !split_ending(l).0.trim().is_empty());
    if let Some((line, Line::Instruction)) = last {
        let (content, ending) = split_ending(line);
        if let Some(stripped) = content.strip_suffix(escape) {
            *line = format!("{stripped}{ending}");
        }
    }
    lines.into_iter().map(|(l, _)| l).collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    Instruction,
    Comment,
    HereDoc,
}

/// A line without its `\n` or `\r\n`, and that ending.
fn split_ending(line: &str) -> (&str, &str) {
    let body = line.strip_suffix('\n').unwrap_or(line);
    let body = body.strip_suffix('\r').unwrap_or(body);
    (body, &line[body.len()..])
}

/// The `# escape=` parser directive: directives are `# key=value` lines at the very top.
fn escape_directive(text: &str) -> Option<char> {
    for line in text.lines() {
        let rest = line.trim().strip_prefix('#')?;
        let (key, value) = rest.split_once('=')?;
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return None;
        }
        if key.eq_ignore_ascii_case("escape") {
            return value.trim().chars().next();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn whitespace_after_the_escape_still_continues() {
        assert_eq!(normalize("RUN a \\  \n b\n"), "RUN a \\\n b\n");
        assert_eq!(normalize("LABEL x=1 \\\t \r\n y=2\r\n"), "LABEL x=1 \\\r\n y=2\r\n");
        assert_eq!(normalize("# escape=`\nRUN a `  \n b\n"), "# escape=`\nRUN a `\n b\n");
        // A backslash with the backtick escape is an ordinary character.
        assert_eq!(normalize("# escape=`\nRUN a \\  \n"), "# escape=`\nRUN a \\  \n");
    }

    #[test]
    fn a_continuation_at_the_end_of_the_file_ends_the_instruction() {
        assert_eq!(normalize("FROM x\nRUN a \\"), "FROM x\nRUN a ");
        assert_eq!(normalize("FROM x\nRUN a \\\n\n# done\n"), "FROM x\nRUN a \n\n# done\n");
        assert_eq!(normalize("FROM x\nRUN a \\\n b\n"), "FROM x\nRUN a \\\n b\n");
    }

    #[test]
    fn here_document_bodies_are_kept() {
        let text = "FROM x\nCOPY <<EOF /f\nline \\  \nEOF\nRUN b\n";
        assert_eq!(normalize(text), text);
        let text = "FROM x\nRUN cat <<-EOF > /f\n\tend \\\n\tEOF\n";
        assert_eq!(normalize(text), text);
    }
}
