//! The `created_by` text of history entries, as BuildKit's Dockerfile frontend writes it, so
//! that `docker history` reads the same for a ferry image. BuildKit formats several of them
//! with Go's `%q` and `%v` verbs; these functions give the same text. The one difference,
//! on purpose: a layer entry ends in `# ferry` where BuildKit writes `# buildkit`
//! (docs/CONFORMANCE.md).

use crate::oci::Healthcheck;

/// The suffix of an entry that made a layer.
pub const LAYER_SUFFIX: &str = " # ferry";

/// `RUN` as BuildKit records it: `RUN [|N K=V…] argv…`, the stage's ARGs (in declaration
/// order, each with its ENV value when an ENV overrides it) before the argv.
pub fn run(argv: &[String], build_args: &[(String, String)]) -> String {
    let mut words: Vec<String> = Vec::new();
    if !build_args.is_empty() {
        words.push(format!("|{}", build_args.len()));
        words.extend(build_args.iter().map(|(k, v)| format!("{k}={v}")));
    }
    words.extend(argv.iter().cloned());
    format!("RUN {}{LAYER_SUFFIX}", words.join(" "))
}

/// Go's `%q` of a `[]string`: `["a" "b c"]`.
pub fn quoted_list(words: &[String]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| go_quote(w)).collect();
    format!("[{}]", quoted.join(" "))
}

/// Go's `%v` of a `[]string`: `[a b c]`.
pub fn plain_list(words: &[String]) -> String {
    format!("[{}]", words.join(" "))
}

/// Go's `%q` of the healthcheck struct BuildKit keeps:
/// `&{["CMD" "true"] "5s" "3s" "0s" '\x03'}` (test, interval, timeout, start period, retries).
pub fn healthcheck(hc: &Healthcheck) -> String {
    format!(
        "HEALTHCHECK &{{{} {} {} {} {}}}",
        quoted_list(&hc.test),
        go_quote(&go_duration(hc.interval)),
        go_quote(&go_duration(hc.timeout)),
        go_quote(&go_duration(hc.start_period)),
        go_rune(hc.retries),
    )
}

/// Go's `strconv.Quote`.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%q` of an integer: a rune literal (`'\x03'`, `'A'`).
fn go_rune(n: i64) -> String {
    match u32::try_from(n).ok().and_then(char::from_u32) {
        Some('\'') => "'\\''".into(),
        Some('\\') => "'\\\\'".into(),
        Some(c) if (c as u32) < 0x20 || c as u32 == 0x7f => format!("'\\x{:02x}'", c as u32),
        Some(c) => format!("'{c}'"),
        None => format!("%!q(int={n})"),
    }
}

/// Go's `time.Duration.String()` of nanoseconds: `0s`, `1.5s`, `1m30s`, `2h0m0s`, `100ms`.
pub fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let sign = if ns < 0 { "-" } else { "" };
    let u = ns.unsigned_abs();
    if u < 1_000_000_000 {
        let (unit, div) = match u {
            0..=999 => ("ns", 1),
            1_000..=999_999 => ("µs", 1_000),
            _ => ("ms", 1_000_000),
        };
        return format!("{sign}{}{unit}", fraction(u, div));
    }
    let hours = u / 3_600_000_000_000;
    let rest = u % 3_600_000_000_000;
    let minutes = rest / 60_000_000_000;
    let seconds = fraction(rest % 60_000_000_000, 1_000_000_000);
    match (hours, minutes) {
        (0, 0) => format!("{sign}{seconds}s"),
        (0, m) => format!("{sign}{m}m{seconds}s"),
        (h, m) => format!("{sign}{h}h{m}m{seconds}s"),
    }
}

/// `value / div` with the fraction's trailing zeros dropped: 1500/1000 → `1.5`.
fn fraction(value: u64, div: u64) -> String {
    let (int, frac) = (value / div, value % div);
    if frac == 0 {
        return int.to_string();
    }
    let width = div.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{int}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_prints_them() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(5_000_000_000), "5s");
        assert_eq!(go_duration(90_000_000_000), "1m30s");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
        assert_eq!(go_duration(7_200_000_000_000), "2h0m0s");
        assert_eq!(go_duration(100_000_000), "100ms");
        assert_eq!(go_duration(1_500), "1.5µs");
    }

    #[test]
    fn healthcheck_reads_as_buildkit_records_it() {
        let hc = Healthcheck {
            test: vec!["CMD".into(), "/bin/cat".into(), "/etc/passwd".into()],
            interval: 5_000_000_000,
            timeout: 3_000_000_000,
            start_period: 90_000_000_000,
            retries: 3,
            ..Default::default()
        };
        assert_eq!(
            healthcheck(&hc),
            r#"HEALTHCHECK &{["CMD" "/bin/cat" "/etc/passwd"] "5s" "3s" "1m30s" '\x03'}"#
        );
    }

    #[test]
    fn run_lists_the_stage_args_first() {
        let argv = vec!["/bin/sh".to_string(), "-c".into(), "echo \"$V\"".into()];
        assert_eq!(run(&argv, &[]), "RUN /bin/sh -c echo \"$V\" # ferry");
        assert_eq!(
            run(&argv, &[("V".into(), "9.9".into()), ("W".into(), String::new())]),
            "RUN |2 V=9.9 W= /bin/sh -c echo \"$V\" # ferry"
        );
        assert_eq!(quoted_list(&["sh".into(), "-c".into()]), r#"["sh" "-c"]"#);
        assert_eq!(plain_list(&["/bin/sh".into(), "-ec".into()]), "[/bin/sh -ec]");
    }
}
