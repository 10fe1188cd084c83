//! Rootless builds: the user namespace ferry runs in when it is not root.
//!
//! A rootless build must record the same owners as a root build: 0:0 for what a RUN step
//! creates as root, 1000:1000 for a file it gives to 1000, 33 for a base image's file owned
//! by 33. With only the caller's own id mapped, that is impossible (every id but 0 is
//! `nobody` inside). So, as podman and buildah do, ferry re-executes itself at start-up in a
//! user namespace that maps container id 0 to the caller and 1..N to the caller's
//! subordinate range (`/etc/subuid`, `/etc/subgid`, set by the setuid `newuidmap` and
//! `newgidmap` of the uidmap package), where it is root ([`reexec_if_rootless`]).
//!
//! Everything ferry does then sees ids as the image does: layer snapshots are extracted with
//! their owners (chown to a mapped id works), a RUN step's upper dir is read with the owners
//! it gave, and the store's cleanup can remove files owned by subordinate ids, which the
//! caller outside the namespace could not. The RUN sandbox stays in that namespace rather
//! than making one of its own.
//!
//! Without a range (or without the helpers), ferry runs as the caller and each RUN sandbox
//! maps that one id to 0: the build works as long as it needs no other id, and ferry says
//! what to add ([`setup_hint`]).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use crate::layer::IdMapping;

pub const SUBUID_FILE: &str = "/etc/subuid";
pub const SUBGID_FILE: &str = "/etc/subgid";

/// The most lines the kernel takes in a uid_map or gid_map (since Linux 4.15).
const MAX_MAP_LINES: usize = 340;

/// A user namespace's id maps: container id → host id ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMaps {
    pub uid: Vec<IdMapping>,
    pub gid: Vec<IdMapping>,
}

impl IdMaps {
    /// Only `uid`/`gid` exist, as 0.
    pub fn single(uid: u32, gid: u32) -> Self {
        IdMaps {
            uid: vec![IdMapping { container: 0, host: uid, size: 1 }],
            gid: vec![IdMapping { container: 0, host: gid, size: 1 }],
        }
    }

    /// 0 is `uid`/`gid`; 1, 2, … are the subordinate ranges `(start, count)`, in order.
    pub fn with_ranges(
        uid: u32,
        gid: u32,
        sub_uids: &[(u32, u32)],
        sub_gids: &[(u32, u32)],
    ) -> Self {
        let chain = |own: u32, ranges: &[(u32, u32)]| {
            let mut map = vec![IdMapping { container: 0, host: own, size: 1 }];
            let mut next: u32 = 1;
            for &(start, count) in ranges.iter().take(MAX_MAP_LINES - 1) {
                // The caller's own id, if a range holds it, is already 0.
                if count == 0 || (start <= own && own - start < count) {
                    continue;
                }
                let Some(end) = next.checked_add(count) else { break };
                map.push(IdMapping { container: next, host: start, size: count });
                next = end;
            }
            map
        };
        IdMaps { uid: chain(uid, sub_uids), gid: chain(gid, sub_gids) }
    }

    /// The highest container uid and gid mapped.
    pub fn highest(&self) -> (u32, u32) {
        let top = |map: &[IdMapping]| {
            map.iter().map(|m| m.container.saturating_add(m.size.saturating_sub(1))).max()
        };
        (top(&self.uid).unwrap_or(0), top(&self.gid).unwrap_or(0))
    }

    /// Container id `id`'s host id.
    pub fn to_host(map: &[IdMapping], id: u32) -> Option<u32> {
        map.iter().find_map(|m| {
            let off = id.checked_sub(m.container)?;
            (off < m.size).then(|| m.host + off)
        })
    }
}

/// The ranges `(start, count)` that `/etc/subuid`-format `text` gives `user`, whose uid is
/// `uid`. As shadow-utils' newuidmap: lines naming the user, or else lines naming the
/// numeric uid.
pub fn parse_subordinate(text: &str, user: &str, uid: u32) -> Vec<(u32, u32)> {
    let entries: Vec<(&str, u32, u32)> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut fields = line.split(':');
            let owner = fields.next()?;
            let start = fields.next()?.trim().parse().ok()?;
            let count = fields.next()?.trim().parse().ok()?;
            Some((owner, start, count))
        })
        .collect();
    let by = |name: &str| -> Vec<(u32, u32)> {
        entries.iter().filter(|(o, _, _)| *o == name).map(|&(_, s, c)| (s, c)).collect()
    };
    let named = if user.is_empty() { Vec::new() } else { by(user) };
    if !named.is_empty() {
        return named;
    }
    by(&uid.to_string())
}

/// What a user without a subordinate range must add for rootless builds with every id.
pub fn setup_hint(user: &str) -> String {
    let user = if user.is_empty() { "USER" } else { user };
    format!(
        "add a line `{user}:100000:65536` to both {SUBUID_FILE} and {SUBGID_FILE} (any \
         range no other user has) and install newuidmap and newgidmap (Debian and Ubuntu: \
         the uidmap package; Fedora: shadow-utils)"
    )
}

/// Why `uid` gets no subordinate range, with what to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRange {
    pub reason: String,
    pub hint: String,
}

impl std::fmt::Display for NoRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; to map more, {}", self.reason, self.hint)
    }
}

/// The maps a rootless ferry of `uid`:`gid` gets: its own id as 0, then its subordinate
/// ranges. Fails (saying why and what to add) without ranges or without the helpers.
pub fn subordinate_maps(uid: u32, gid: u32) -> Result<IdMaps, NoRange> {
    let account = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
    let user = account.as_ref().map(|u| u.name.clone()).unwrap_or_default();
    let hint = setup_hint(&user);
    let no = |reason: String| Err(NoRange { reason, hint: hint.clone() });
    if user.is_empty() {
        // newuidmap refuses a caller it cannot name.
        return no(format!("uid {uid} has no entry in the user database, so newuidmap refuses it"));
    }
    let ranges = |file: &str| {
        std::fs::read_to_string(file)
            .map(|text| parse_subordinate(&text, &user, uid))
            .unwrap_or_default()
    };
    let (sub_uids, sub_gids) = (ranges(SUBUID_FILE), ranges(SUBGID_FILE));
    if sub_uids.iter().all(|r| r.1 == 0) || sub_gids.iter().all(|r| r.1 == 0) {
        let missing = match (sub_uids.is_empty(), sub_gids.is_empty()) {
            (true, true) => format!("{SUBUID_FILE} and {SUBGID_FILE}"),
            (true, false) => SUBUID_FILE.to_string(),
            _ => SUBGID_FILE.to_string(),
        };
        return no(format!("user {user} has no subordinate id range in {missing}"));
    }
    if let Some(primary) = account.map(|u| u.gid.as_raw()).filter(|&g| g != gid) {
        return Err(NoRange {
            reason: format!(
                "ferry runs as group {gid}, not the user's primary group {primary}, and \
                 newuidmap maps only processes of the primary group"
            ),
            hint: "run ferry with your primary group".into(),
        });
    }
    for helper in ["newuidmap", "newgidmap"] {
        if find_helper(helper).is_none() {
            return no(format!("{helper} is not installed"));
        }
    }
    Ok(IdMaps::with_ranges(uid, gid, &sub_uids, &sub_gids))
}

/// `name` in `PATH`, else in the usual system directories.
pub fn find_helper(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process is in a user namespace other than the initial one.
pub fn in_user_namespace() -> bool {
    static IN: OnceLock<bool> = OnceLock::new();
    *IN.get_or_init(|| match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => map.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"],
        Err(_) => false,
    })
}

/// Whether this process is root of the initial user namespace (real privilege on the host).
pub fn is_host_root() -> bool {
    nix::unistd::Uid::effective().is_root() && !in_user_namespace()
}

/// This process's own id map for `kind` ("uid_map" or "gid_map"), as the kernel shows it.
pub fn own_map(kind: &str) -> Vec<IdMapping> {
    std::fs::read_to_string(format!("/proc/self/{kind}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let f: Vec<u32> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            (f.len() == 3).then(|| IdMapping { container: f[0], host: f[1], size: f[2] })
        })
        .collect()
}

/// How an owner on disk, as this process sees it, is the image's: unchanged, except in a
/// rootless process that could not enter its namespace, whose own files are root's.
pub fn image_owner(uid: u32, gid: u32) -> (u32, u32) {
    let euid = nix::unistd::Uid::effective().as_raw();
    if euid == 0 {
        return (uid, gid);
    }
    let egid = nix::unistd::Gid::effective().as_raw();
    (if uid == euid { 0 } else { uid }, if gid == egid { 0 } else { gid })
}

/// Runs `newuidmap` and `newgidmap` to give process `pid` (which has just unshared its
/// user namespace and belongs to the caller) the maps `maps`.
pub fn apply_maps(pid: u32, maps: &IdMaps) -> Result<(), String> {
    for (helper, map) in [("newuidmap", &maps.uid), ("newgidmap", &maps.gid)] {
        let program = find_helper(helper).ok_or_else(|| format!("{helper} is not installed"))?;
        crate::report::work::process_started();
        let mut command = std::process::Command::new(&program);
        command.arg(pid.to_string());
        for m in map {
            command.args([m.container.to_string(), m.host.to_string(), m.size.to_string()]);
        }
        let out = command
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{helper} {} failed ({}): {}",
                command.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// The environment variable that turns the namespace off (`FERRY_USERNS=off`): ferry then
/// runs as the caller, and RUN steps get only id 0.
pub const USERNS_ENV: &str = "FERRY_USERNS";

/// In a rootless ferry whose user has a subordinate range: runs this same command again in
/// a user namespace with that range (see the module documentation), waits for it and
/// returns its exit code. `None`: carry on in this process (root, already inside, no range,
/// turned off, or the kernel refuses user namespaces, which a RUN step then reports).
///
/// Must be called before ferry starts any thread.
pub fn reexec_if_rootless() -> Option<i32> {
    if nix::unistd::Uid::effective().is_root() {
        return None;
    }
    if std::env::var(USERNS_ENV).is_ok_and(|v| v == "off" || v == "0") {
        return None;
    }
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    if nix::unistd::geteuid().as_raw() != uid || nix::unistd::getegid().as_raw() != gid {
        // Set-id: newuidmap maps only the real ids of a process owned by them.
        return None;
    }
    let maps = subordinate_maps(uid, gid).ok()?;
    let exe = std::env::current_exe().ok()?;
    match run_in_namespace(&exe, &maps) {
        Ok(code) => Some(code),
        Err(Entry::Refused) => None,
        Err(Entry::Failed(message)) => {
            eprintln!(
                "error: cannot enter the rootless build's user namespace: {message}\n\
                 (the ranges come from {SUBUID_FILE} and {SUBGID_FILE}; set {USERNS_ENV}=off \
                 to build with only your own id)"
            );
            Some(125)
        }
    }
}

enum Entry {
    /// The kernel does not let this user create a user namespace.
    Refused,
    Failed(String),
}

/// What the child says before it execs: `p` and its pid when it has unshared and waits
/// for its maps, `r` when unshare was refused.
const CHILD_READY: u8 = b'p';
const CHILD_REFUSED: u8 = b'r';
/// What ferry answers: maps written, or not.
const MAPPED: u8 = b'g';
const NOT_MAPPED: u8 = b'f';

fn run_in_namespace(exe: &Path, maps: &IdMaps) -> Result<i32, Entry> {
    let failed = |context: &str, e: std::io::Error| Entry::Failed(format!("{context}: {e}"));
    let (mut from_child, child_writes) = std::io::pipe().map_err(|e| failed("pipe", e))?;
    let (child_reads, mut to_child) = std::io::pipe().map_err(|e| failed("pipe", e))?;
    let child_writes = OwnedFd::from(child_writes);
    let child_reads = OwnedFd::from(child_reads);
    let (w, r) = (child_writes.as_raw_fd(), child_reads.as_raw_fd());

    crate::report::work::process_started();
    let mut command = std::process::Command::new(exe);
    command.args(std::env::args_os().skip(1));
    // SAFETY: only async-signal-safe system calls between fork and exec; the descriptors
    // stay open in the child until exec (they are close-on-exec).
    unsafe {
        command.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                let errno = *libc::__errno_location();
                libc::write(w, [CHILD_REFUSED].as_ptr().cast(), 1);
                return Err(std::io::Error::from_raw_os_error(errno));
            }
            let mut message = [CHILD_READY, 0, 0, 0, 0];
            message[1..].copy_from_slice(&(libc::getpid() as u32).to_le_bytes());
            if libc::write(w, message.as_ptr().cast(), message.len()) != message.len() as isize {
                return Err(std::io::Error::from_raw_os_error(libc::EPIPE));
            }
            let mut answer = [0u8];
            if libc::read(r, answer.as_mut_ptr().cast(), 1) != 1 || answer[0] != MAPPED {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            // If ferry outside dies, so does the build inside.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
            Ok(())
        });
    }

    let maps = maps.clone();
    let helper = std::thread::spawn(move || -> Result<(), Entry> {
        let mut message = [0u8; 5];
        let mut got = 0;
        while got < message.len() {
            match from_child.read(&mut message[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Entry::Failed(format!("reading from the child: {e}"))),
            }
        }
        match message[0] {
            CHILD_READY if got == message.len() => {}
            CHILD_REFUSED => return Err(Entry::Refused),
            _ => return Err(Entry::Failed("the child ended before entering the namespace".into())),
        }
        let pid = u32::from_le_bytes([message[1], message[2], message[3], message[4]]);
        let result = apply_maps(pid, &maps);
        let answer = if result.is_ok() { MAPPED } else { NOT_MAPPED };
        let _ = to_child.write_all(&[answer]);
        result.map_err(Entry::Failed)
    });
    let spawned = command.spawn();
    drop(command);
    drop(child_writes);
    drop(child_reads);
    let mapped = helper.join().unwrap_or_else(|_| Err(Entry::Failed("helper panicked".into())));
    let mut child = match (spawned, mapped) {
        (Ok(child), Ok(())) => child,
        (Ok(mut child), Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        (Err(_), Err(e)) => return Err(e),
        (Err(e), Ok(())) => return Err(failed(&format!("cannot start {}", exe.display()), e)),
    };
    // The terminal's Ctrl-C reaches the child too; this process only waits for it.
    // SAFETY: setting dispositions to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = child.wait().map_err(|e| failed("waiting for the build", e))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_are_found_by_name_then_by_uid() {
        let text =
            "# comment\nalice:100000:65536\nbob:165536:65536\n1001:300000:10\nalice:400000:5\n";
        assert_eq!(parse_subordinate(text, "alice", 1000), vec![(100000, 65536), (400000, 5)]);
        assert_eq!(parse_subordinate(text, "carol", 1001), vec![(300000, 10)]);
        assert_eq!(parse_subordinate(text, "dave", 1002), vec![]);
        assert_eq!(parse_subordinate("broken\nx:y:z\n", "x", 1), vec![]);
    }

    #[test]
    fn maps_put_the_caller_at_0_and_the_ranges_after_it() {
        let maps =
            IdMaps::with_ranges(1001, 1002, &[(100000, 65536), (400000, 5)], &[(200000, 10)]);
        assert_eq!(
            maps.uid,
            vec![
                IdMapping { container: 0, host: 1001, size: 1 },
                IdMapping { container: 1, host: 100000, size: 65536 },
                IdMapping { container: 65537, host: 400000, size: 5 },
            ]
        );
        assert_eq!(maps.gid[1], IdMapping { container: 1, host: 200000, size: 10 });
        assert_eq!(maps.highest(), (65541, 10));
        assert_eq!(IdMaps::to_host(&maps.uid, 1000), Some(100999));
        assert_eq!(IdMaps::to_host(&maps.uid, 0), Some(1001));
        assert_eq!(IdMaps::to_host(&maps.gid, 11), None);
        // A range holding the caller's own id would map it twice: left out.
        let odd = IdMaps::with_ranges(1001, 1001, &[(1000, 10)], &[(5000, 1)]);
        assert_eq!(odd.uid.len(), 1);
    }

    #[test]
    fn the_hint_names_the_files_the_line_and_the_package() {
        let hint = setup_hint("alice");
        assert!(hint.contains("`alice:100000:65536`"), "{hint}");
        assert!(hint.contains("/etc/subuid") && hint.contains("/etc/subgid"), "{hint}");
        assert!(hint.contains("uidmap"), "{hint}");
    }
}
