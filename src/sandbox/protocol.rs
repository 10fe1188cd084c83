//! What ferry and its sandbox init say to each other over the init's stdin, a Unix stream
//! socket: one JSON line each way to start, then one JSON line per event from the init.
//!
//! ```text
//! ferry ──InitRequest──► init            init ──Ready──► ferry   (mounts are in place)
//! ferry ──"go"─────────► init            init ──Exited / Failed / ExecFailed──► ferry
//! ```
//! The pause at `Ready` lets ferry record what the set-up left in the upper dir before the
//! RUN command can touch it, so that exactly that can be removed afterwards.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ExitStatus, RunSpec};

/// The byte ferry sends to let the init continue after `Ready`.
pub const GO: u8 = b'g';

#[derive(Debug, Serialize, Deserialize)]
pub struct InitRequest {
    pub spec: RunSpec,
    /// An empty directory the overlay is mounted on.
    pub rootfs: PathBuf,
    /// An empty directory used as the only lower dir when `spec.lower_dirs` is empty.
    pub empty_lower: PathBuf,
    /// An empty directory on which the init mounts a private tmpfs for secrets.
    pub secrets_staging: PathBuf,
    pub user_namespace: UserNamespace,
    /// Said when a step needs an id this sandbox does not have (with [`UserNamespace::SingleId`]:
    /// why there is no range, and what to add).
    pub id_note: Option<String>,
}

/// Which user namespace the steps run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserNamespace {
    /// None: ferry is root of the host.
    Host,
    /// The one ferry runs in, as its root: a rootless build's namespace with the caller's
    /// subordinate ids (see `crate::userns`). The sandbox makes no other.
    Inherited,
    /// A new one in which only the init's own uid and gid exist, as 0.
    SingleId,
}

impl UserNamespace {
    pub fn rootless(self) -> bool {
        self != UserNamespace::Host
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum InitMessage {
    /// The rootfs is mounted and every mount point exists; waiting for [`GO`].
    Ready,
    /// The kernel would not create a user namespace for a rootless run.
    RootlessRefused { reason: String },
    /// A set-up step failed; nothing was executed.
    Failed { step: String, message: String },
    /// The RUN program could not be started.
    ExecFailed { program: String, message: String },
    /// The RUN program ended.
    Exited { status: ExitStatus },
}

pub fn write_message(out: &mut impl Write, message: &InitMessage) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    // One write call: the init's processes share the socket, and a short write to a Unix
    // stream socket is not split, so messages never interleave.
    out.write_all(&line)
}

/// Reads the next line, without its newline; `None` at end of stream.
pub fn read_message_line(input: &mut impl BufRead) -> Result<Option<String>, String> {
    let mut line = String::new();
    match input.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(line.trim_end_matches('\n').to_string())),
        Err(e) => Err(e.to_string()),
    }
}

/// Reads the next message; `None` at end of stream.
pub fn read_message(input: &mut impl BufRead) -> Result<Option<InitMessage>, String> {
    match read_message_line(input)? {
        None => Ok(None),
        Some(line) => serde_json::from_str(&line).map(Some).map_err(|e| format!("{e} in {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_one_per_line() {
        let mut buf = Vec::new();
        write_message(&mut buf, &InitMessage::Ready).unwrap();
        write_message(&mut buf, &InitMessage::Exited { status: ExitStatus::Signal(9) }).unwrap();
        let mut input = std::io::BufReader::new(buf.as_slice());
        assert_eq!(read_message(&mut input).unwrap(), Some(InitMessage::Ready));
        assert_eq!(
            read_message(&mut input).unwrap(),
            Some(InitMessage::Exited { status: ExitStatus::Signal(9) })
        );
        assert_eq!(read_message(&mut input).unwrap(), None);
    }

    #[test]
    fn garbage_is_an_error_quoting_the_line() {
        let mut input = std::io::BufReader::new(b"hello\n".as_slice());
        let err = read_message(&mut input).unwrap_err();
        assert!(err.contains("\"hello\""), "{err}");
    }
}
