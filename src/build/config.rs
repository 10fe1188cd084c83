//! Instructions that change only the image config (ENV, LABEL, WORKDIR, USER, EXPOSE,
//! VOLUME, CMD, ENTRYPOINT, SHELL, STOPSIGNAL, HEALTHCHECK, ONBUILD, MAINTAINER), applied as
//! docker applies them, and ARG scoping.

use super::history;
use std::collections::BTreeMap;

use crate::dockerfile::expand::{ExpandError, Lexer, Vars};
use crate::dockerfile::{Command, Flag, Kind};
use crate::oci::{ContainerConfig, EmptyObject, Healthcheck};

/// The default SHELL of a Linux image.
pub fn default_shell() -> Vec<String> {
    vec!["/bin/sh".to_string(), "-c".to_string()]
}

/// Environment list (`K=V` strings) as a map.
pub fn env_map(env: &[String]) -> BTreeMap<String, String> {
    env.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect()
}

fn set_env(env: &mut Vec<String>, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    match env.iter_mut().find(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k) == key) {
        Some(slot) => *slot = entry,
        None => env.push(entry),
    }
}

/// Variables visible to word expansion: ARGs in scope, overridden by ENV (as docker does).
pub fn expansion_vars(args: &Vars, config: &ContainerConfig) -> Vars {
    let mut vars = args.clone();
    vars.extend(env_map(&config.env));
    vars
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Expand(#[from] ExpandError),
    #[error("{0}")]
    Invalid(String),
}

/// What a metadata instruction did, for the history entry.
pub struct Applied {
    /// The history entry's text; None for an instruction BuildKit records none of.
    pub created_by: Option<String>,
}

/// Per-stage state that is not part of the config: whether CMD was set in this stage (an
/// ENTRYPOINT resets an inherited CMD only).
#[derive(Default)]
pub struct StageFlags {
    pub cmd_set: bool,
}

/// Apply a metadata instruction. Returns None if `kind` is not one (ARG, RUN, COPY, ADD).
pub fn apply(
    kind: &Kind,
    lexer: Lexer,
    vars: &Vars,
    config: &mut ContainerConfig,
    author: &mut Option<String>,
    flags: &mut StageFlags,
) -> Option<Result<Applied, ConfigError>> {
    apply_inner(kind, lexer, vars, config, author, flags).transpose()
}

fn apply_inner(
    kind: &Kind,
    lexer: Lexer,
    vars: &Vars,
    config: &mut ContainerConfig,
    author: &mut Option<String>,
    flags: &mut StageFlags,
) -> Result<Option<Applied>, ConfigError> {
    let word = |w: &str| lexer.expand_word(w, vars);
    let created_by = match kind {
        Kind::Env(pairs) => {
            // Every value sees the variables as they were before this instruction.
            let mut expanded = Vec::new();
            for (k, v) in pairs {
                expanded.push((word(k)?, word(v)?));
            }
            for (k, v) in &expanded {
                set_env(&mut config.env, k, v);
            }
            format!(
                "ENV {}",
                expanded.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
            )
        }
        Kind::Label(pairs) => {
            let mut shown = Vec::new();
            for (k, v) in pairs {
                let (k, v) = (word(k)?, word(v)?);
                shown.push(format!("{k}={v}"));
                config.labels.insert(k, v);
            }
            format!("LABEL {}", shown.join(" "))
        }
        Kind::Maintainer(name) => {
            *author = Some(name.clone());
            config.labels.insert("maintainer".to_string(), name.clone());
            format!("MAINTAINER {name}")
        }
        Kind::Workdir(dir) => {
            let dir = word(dir)?;
            let current = config.working_dir.clone().unwrap_or_else(|| "/".to_string());
            // As BuildKit: an absolute WORKDIR is recorded as written, a relative one is
            // joined to the current one and cleaned.
            let dir = if dir.starts_with('/') {
                dir.clone()
            } else {
                clean_path(&format!("{}/{dir}", current.trim_end_matches('/')))
            };
            config.working_dir = Some(dir.clone());
            format!("WORKDIR {dir}")
        }
        Kind::User(user) => {
            let user = word(user)?;
            config.user = Some(user.clone());
            format!("USER {user}")
        }
        Kind::Expose(ports) => {
            // BuildKit's entry is Go's `%v` of this instruction's port set: sorted keys.
            let mut shown = std::collections::BTreeSet::new();
            for p in ports {
                for p in lexer.expand_words(p, vars)? {
                    for port in expose_ports(&p).map_err(ConfigError::Invalid)? {
                        shown.insert(port.clone());
                        config.exposed_ports.insert(port, EmptyObject {});
                    }
                }
            }
            let shown: Vec<String> = shown.into_iter().map(|p| format!("{p}:{{}}")).collect();
            format!("EXPOSE map[{}]", shown.join(" "))
        }
        Kind::Volume(paths) => {
            let mut shown = Vec::new();
            for p in paths {
                let p = word(p)?;
                if p.is_empty() {
                    return Err(ConfigError::Invalid(
                        "VOLUME specified can not be an empty string".into(),
                    ));
                }
                shown.push(p.clone());
                config.volumes.insert(p, EmptyObject {});
            }
            format!("VOLUME [{}]", shown.join(" "))
        }
        Kind::Cmd(cmd) => {
            let argv = command_argv(cmd, &config.shell);
            // `CMD []` removes the command, as docker records it (no Cmd at all).
            config.cmd = (!argv.is_empty()).then(|| argv.clone());
            // docker's frontend sets ArgsEscaped after every CMD, whatever its form.
            config.args_escaped = true;
            flags.cmd_set = true;
            format!("CMD {}", history::quoted_list(&argv))
        }
        Kind::Entrypoint(cmd) => {
            let argv = command_argv(cmd, &config.shell);
            config.entrypoint = (!argv.is_empty()).then(|| argv.clone());
            // Only CMD sets ArgsEscaped in docker's frontend; ENTRYPOINT leaves it as it is.
            if !flags.cmd_set {
                config.cmd = None;
            }
            format!("ENTRYPOINT {}", history::quoted_list(&argv))
        }
        Kind::Shell(shell) => {
            if shell.is_empty() {
                return Err(ConfigError::Invalid(
                    "SHELL needs a JSON array with at least one element".into(),
                ));
            }
            config.shell = shell.clone();
            format!("SHELL {}", history::plain_list(shell))
        }
        Kind::Stopsignal(sig) => {
            let sig = word(sig)?;
            if !valid_signal(&sig) {
                return Err(ConfigError::Invalid(format!(
                    "invalid STOPSIGNAL `{sig}`: use a number or a name like SIGTERM"
                )));
            }
            config.stop_signal = Some(sig.clone());
            format!("STOPSIGNAL {sig}")
        }
        Kind::Healthcheck { flags: hc_flags, command } => {
            let mut hc = Healthcheck::default();
            match command {
                None => hc.test = vec!["NONE".to_string()],
                Some(Command::Shell(s)) => hc.test = vec!["CMD-SHELL".to_string(), s.clone()],
                Some(Command::Exec(v)) => {
                    hc.test = std::iter::once("CMD".to_string()).chain(v.iter().cloned()).collect()
                }
            }
            for f in hc_flags {
                apply_healthcheck_flag(&mut hc, f, lexer, vars)?;
            }
            let shown = history::healthcheck(&hc);
            config.healthcheck = Some(hc);
            shown
        }
        Kind::Onbuild(text) => {
            let upper = text.trim_start().to_ascii_uppercase();
            if upper.starts_with("ONBUILD")
                || upper.starts_with("FROM")
                || upper.starts_with("MAINTAINER")
            {
                return Err(ConfigError::Invalid(format!(
                    "ONBUILD cannot trigger `{}`",
                    text.split_whitespace().next().unwrap_or_default()
                )));
            }
            config.on_build.push(text.clone());
            // BuildKit records no history entry for ONBUILD.
            return Ok(Some(Applied { created_by: None }));
        }
        Kind::Arg(_) | Kind::Run { .. } | Kind::Copy { .. } | Kind::Add { .. } => return Ok(None),
    };
    Ok(Some(Applied { created_by: Some(created_by) }))
}

/// The argv of CMD, ENTRYPOINT or RUN: exec form as written (no expansion, as docker), shell
/// form through the stage's SHELL.
pub fn command_argv(cmd: &Command, shell: &[String]) -> Vec<String> {
    match cmd {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => {
            let mut argv = if shell.is_empty() { default_shell() } else { shell.to_vec() };
            argv.push(s.clone());
            argv
        }
    }
}

fn apply_healthcheck_flag(
    hc: &mut Healthcheck,
    f: &Flag,
    lexer: Lexer,
    vars: &Vars,
) -> Result<(), ConfigError> {
    let value =
        f.value.as_deref().map(|v| lexer.expand_word(v, vars)).transpose()?.unwrap_or_default();
    let duration = || {
        parse_duration(&value).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "HEALTHCHECK --{}: `{value}` is not a duration like 30s or 1m30s",
                f.name
            ))
        })
    };
    match f.name.as_str() {
        "interval" => hc.interval = duration()?,
        "timeout" => hc.timeout = duration()?,
        "start-period" => hc.start_period = duration()?,
        "start-interval" => hc.start_interval = duration()?,
        "retries" => {
            hc.retries = value.parse().map_err(|_| {
                ConfigError::Invalid(format!("HEALTHCHECK --retries: `{value}` is not a number"))
            })?;
            if hc.retries < 0 {
                return Err(ConfigError::Invalid(format!(
                    "HEALTHCHECK --retries must not be negative (not {value})"
                )));
            }
        }
        other => return Err(ConfigError::Invalid(format!("HEALTHCHECK does not take --{other}"))),
    }
    Ok(())
}

/// Go's time.ParseDuration for the units docker accepts, in nanoseconds.
pub fn parse_duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().ok()?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * scale;
        rest = tail;
    }
    Some(total as i64)
}

/// The ports of one EXPOSE word: `80`, `53/udp`, a range `8000-8002/tcp` (one port each,
/// as docker records a range).
fn expose_ports(p: &str) -> Result<Vec<String>, String> {
    let port = normalise_port(p)?;
    let (number, proto) = port.split_once('/').unwrap_or((&port, "tcp"));
    match number.split_once('-') {
        Some((a, b)) => {
            let (a, b): (u16, u16) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
            if a > b {
                return Err(format!("invalid EXPOSE port range `{p}`"));
            }
            Ok((a..=b).map(|n| format!("{n}/{proto}")).collect())
        }
        None => Ok(vec![port.clone()]),
    }
}

fn normalise_port(p: &str) -> Result<String, String> {
    let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
    let proto = proto.to_ascii_lowercase();
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid EXPOSE protocol in `{p}`: use tcp, udp or sctp"));
    }
    let valid = |s: &str| s.parse::<u16>().is_ok();
    let ok = match port.split_once('-') {
        Some((a, b)) => valid(a) && valid(b),
        None => valid(port),
    };
    if !ok {
        return Err(format!("invalid EXPOSE port `{p}`"));
    }
    Ok(format!("{port}/{proto}"))
}

/// A signal as docker's `signal.ParseSignal` takes it: a number, or a Linux signal name
/// with or without `SIG` (`SIGRTMIN+3` too).
fn valid_signal(s: &str) -> bool {
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
        "RTMIN", "RTMAX", "UNUSED",
    ];
    if s.parse::<u32>().is_ok_and(|n| n > 0) {
        return true;
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let base = name.split(['+', '-']).next().unwrap_or_default();
    NAMES.contains(&base)
        && (base == name || name[base.len() + 1..].parse::<u32>().is_ok_and(|n| n <= 15))
}

/// Lexical path cleaning (Go's path.Clean) for absolute image paths.
pub fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kinds: &[Kind]) -> ContainerConfig {
        let mut c = ContainerConfig::default();
        let mut author = None;
        let mut flags = StageFlags::default();
        for k in kinds {
            let vars = expansion_vars(&Vars::new(), &c);
            apply(k, Lexer::default(), &vars, &mut c, &mut author, &mut flags).unwrap().unwrap();
        }
        c
    }

    #[test]
    fn env_values_see_the_previous_environment() {
        let c = run(&[
            Kind::Env(vec![("A".into(), "1".into())]),
            Kind::Env(vec![("A".into(), "2".into()), ("B".into(), "$A".into())]),
        ]);
        assert_eq!(c.env, ["A=2", "B=1"]);
    }

    #[test]
    fn workdir_user_ports_volumes() {
        let c = run(&[
            Kind::Workdir("/app".into()),
            Kind::Workdir("sub/../lib".into()),
            Kind::User("app:app".into()),
            Kind::Expose(vec!["80".into(), "53/UDP".into()]),
            Kind::Volume(vec!["/data".into()]),
        ]);
        assert_eq!(c.working_dir.as_deref(), Some("/app/lib"));
        assert_eq!(c.user.as_deref(), Some("app:app"));
        assert_eq!(c.exposed_ports.keys().collect::<Vec<_>>(), ["53/udp", "80/tcp"]);
        assert!(c.volumes.contains_key("/data"));
    }

    #[test]
    fn entrypoint_resets_an_inherited_cmd_only() {
        let mut c = ContainerConfig { cmd: Some(vec!["inherited".into()]), ..Default::default() };
        let mut author = None;
        let mut flags = StageFlags::default();
        let ep = Kind::Entrypoint(Command::Exec(vec!["/ep".into()]));
        apply(&ep, Lexer::default(), &Vars::new(), &mut c, &mut author, &mut flags)
            .unwrap()
            .unwrap();
        assert_eq!(c.cmd, None);
        let c = run(&[Kind::Cmd(Command::Exec(vec!["x".into()])), ep]);
        assert_eq!(c.cmd, Some(vec!["x".to_string()]));
    }

    #[test]
    fn shell_form_uses_the_stage_shell() {
        let c = run(&[
            Kind::Shell(vec!["/bin/bash".into(), "-eu".into(), "-c".into()]),
            Kind::Cmd(Command::Shell("echo hi".into())),
        ]);
        assert_eq!(c.cmd.unwrap(), ["/bin/bash", "-eu", "-c", "echo hi"]);
    }

    #[test]
    fn healthcheck_as_docker_records_it() {
        let c = run(&[Kind::Healthcheck {
            flags: vec![
                Flag { name: "interval".into(), value: Some("30s".into()) },
                Flag { name: "timeout".into(), value: Some("1m30s".into()) },
                Flag { name: "retries".into(), value: Some("3".into()) },
            ],
            command: Some(Command::Shell("curl -f localhost".into())),
        }]);
        let hc = c.healthcheck.unwrap();
        assert_eq!(hc.test, ["CMD-SHELL", "curl -f localhost"]);
        assert_eq!(hc.interval, 30_000_000_000);
        assert_eq!(hc.timeout, 90_000_000_000);
        assert_eq!(hc.retries, 3);
    }

    #[test]
    fn bad_values_are_errors() {
        let mut c = ContainerConfig::default();
        let mut a = None;
        let mut f = StageFlags::default();
        for k in [
            Kind::Expose(vec!["http".into()]),
            Kind::Stopsignal("x".into()),
            Kind::Healthcheck {
                flags: vec![Flag { name: "interval".into(), value: Some("soon".into()) }],
                command: None,
            },
            Kind::Onbuild("FROM x".into()),
        ] {
            assert!(
                apply(&k, Lexer::default(), &Vars::new(), &mut c, &mut a, &mut f).unwrap().is_err(),
                "{k:?}"
            );
        }
    }
}
