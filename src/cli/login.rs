//! `ferry login [REGISTRY]`: check credentials against the registry and store them in
//! docker's `config.json` (or its credential helper), as `docker login` does.

use std::io::{BufRead, IsTerminal, Read, Write};

use clap::Args;
use ferry::reference::DEFAULT_REGISTRY;
use ferry::registry::{Credential, DockerConfigFile, RegistryClient, Secret, StoredIn};

use super::pull::{registry_config, registry_error};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The registry (`host[:port]`); default: Docker Hub.
    pub registry: Option<String>,
    /// User name.
    #[arg(short, long)]
    pub username: Option<String>,
    /// Password (visible to other users of this machine: prefer --password-stdin).
    #[arg(short, long)]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long, conflicts_with = "password")]
    pub password_stdin: bool,
}

pub fn run(global: &GlobalArgs, args: LoginArgs, printer: &Printer) -> CliResult {
    let registry = normalize_registry(args.registry.as_deref().unwrap_or(DEFAULT_REGISTRY));
    let interactive = std::io::stdin().is_terminal();
    let username = match args.username {
        Some(u) => u,
        None if interactive && !args.password_stdin => prompt("Username: ", true)?,
        None => {
            return Err(CliError::invalid(miette::miette!(
                "--username is required when standard input is not a terminal"
            )))
        }
    };
    if username.is_empty() {
        return Err(CliError::invalid(miette::miette!("the user name is empty")));
    }
    let password = if let Some(p) = args.password {
        printer.warn("using --password on the command line is insecure; use --password-stdin");
        p
    } else if args.password_stdin {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| {
            CliError::invalid(miette::miette!("cannot read the password from standard input: {e}"))
        })?;
        s.trim_end_matches(['\n', '\r']).to_string()
    } else if interactive {
        prompt("Password: ", false)?
    } else {
        return Err(CliError::invalid(miette::miette!("give the password with --password-stdin")));
    };
    if password.is_empty() {
        return Err(CliError::invalid(miette::miette!("the password is empty")));
    }
    let secret = Secret::new(password);
    let config = registry_config(global);
    let client = RegistryClient::new(config.clone());
    client.set_credential(
        &registry,
        Credential::Basic { username: username.clone(), password: secret.clone() },
    );
    client.check_login(&registry).map_err(registry_error)?;
    let file = DockerConfigFile::locate(config.docker_config_dir.as_deref()).ok_or_else(|| {
        CliError::invalid(miette::miette!(
            "no place for docker's config.json: set DOCKER_CONFIG or HOME"
        ))
    })?;
    let stored = file.store(&registry, &username, &secret).map_err(registry_error)?;
    match stored {
        StoredIn::ConfigFile(p) => {
            printer.status(&format!("Credentials stored in {}", p.display()))
        }
        StoredIn::Helper(h) => printer.status(&format!("Credentials stored with {h}")),
    }
    printer.text("Login Succeeded");
    Ok(ExitStatus::Success)
}

/// `https://index.docker.io/v1/`, `registry-1.docker.io` → `docker.io`; a URL → its host.
fn normalize_registry(input: &str) -> String {
    let s = input.trim_end_matches('/');
    let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s);
    match host {
        "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_string(),
        h => h.to_string(),
    }
}

/// Read one line from the terminal, without echo for a password.
fn prompt(label: &str, echo: bool) -> Result<String, CliError> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let mut err = std::io::stderr();
    let _ = err.write_all(label.as_bytes());
    let _ = err.flush();
    let stdin = std::io::stdin();
    let saved = if echo {
        None
    } else {
        tcgetattr(&stdin).ok().inspect(|t| {
            let mut quiet = t.clone();
            quiet.local_flags.remove(LocalFlags::ECHO);
            let _ = tcsetattr(&stdin, SetArg::TCSANOW, &quiet);
        })
    };
    let mut line = String::new();
    let r = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &t);
        let _ = err.write_all(b"\n");
    }
    r.map_err(|e| CliError::invalid(miette::miette!("cannot read from the terminal: {e}")))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_normalize_like_docker() {
        assert_eq!(normalize_registry("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_registry("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(normalize_registry("https://ghcr.io"), "ghcr.io");
    }
}
