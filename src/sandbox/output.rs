//! The last lines of a RUN step's output, kept for the error message of a failed step.

use std::collections::VecDeque;

/// Keeps the last `max_lines` lines of a byte stream fed in arbitrary chunks. A line longer
/// than `max_line_bytes` is cut (a step printing one huge line must not hold it all).
#[derive(Debug, Clone)]
pub struct OutputTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    max_lines: usize,
    max_line_bytes: usize,
}

impl Default for OutputTail {
    fn default() -> Self {
        OutputTail::new(20, 4096)
    }
}

impl OutputTail {
    pub fn new(max_lines: usize, max_line_bytes: usize) -> Self {
        OutputTail { lines: VecDeque::new(), partial: Vec::new(), max_lines, max_line_bytes }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.extend_partial(&bytes[..newline]);
            self.finish_line();
            bytes = &bytes[newline + 1..];
        }
        self.extend_partial(bytes);
    }

    /// The kept lines, including an unterminated last line.
    pub fn finish(mut self) -> Vec<String> {
        if !self.partial.is_empty() {
            self.finish_line();
        }
        self.lines.into()
    }

    fn extend_partial(&mut self, bytes: &[u8]) {
        let room = self.max_line_bytes.saturating_sub(self.partial.len());
        self.partial.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn finish_line(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_string();
        self.partial.clear();
        if self.max_lines == 0 {
            return;
        }
        if self.lines.len() == self.max_lines {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_last_lines_across_chunks() {
        let mut tail = OutputTail::new(2, 100);
        tail.push(b"one\ntw");
        tail.push(b"o\nthree\r\nfo");
        tail.push(b"ur");
        assert_eq!(tail.finish(), vec!["three", "four"]);
    }

    #[test]
    fn cuts_long_lines() {
        let mut tail = OutputTail::new(5, 3);
        tail.push(b"abcdef\nxy\n");
        assert_eq!(tail.finish(), vec!["abc", "xy"]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let mut tail = OutputTail::default();
        tail.push(b"a\xffb\n");
        assert_eq!(tail.finish(), vec!["a\u{fffd}b"]);
    }
}
