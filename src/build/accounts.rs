//! User and group names as docker resolves them for `--chown`, `USER` and `WORKDIR`: looked
//! up in the image's /etc/passwd and /etc/group. The files are read from the stage's layer
//! snapshots (a [`MergedView`]), never out of a compressed layer, and only when a step has
//! to run: a cache key names the spec as written, since the parent key already stands for
//! the files the names resolve through.

use std::io;

use super::merged::MergedView;

/// The largest account database read into memory: real ones are a few kilobytes.
const MAX_ACCOUNT_FILE: u64 = 16 * 1024 * 1024;

/// Reads one file of an image by absolute path (None: it does not exist).
pub type ReadFile<'a> = dyn FnMut(&str) -> io::Result<Option<Vec<u8>>> + 'a;

/// [`resolve_owner`] through the files of `view`.
pub fn resolve_owner_in(spec: &str, view: &MergedView) -> io::Result<Result<(u32, u32), String>> {
    resolve_owner(spec, &mut |p| view.read_file(p, MAX_ACCOUNT_FILE))
}

/// The home directory of `uid` in the image of `view`; `/` when it has none.
pub fn home_in(view: &MergedView, uid: u32) -> io::Result<String> {
    let passwd = view.read_file("/etc/passwd", MAX_ACCOUNT_FILE)?.unwrap_or_default();
    Ok(home_of(&passwd, uid))
}

/// Resolve `user[:group]` to numeric ids through /etc/passwd and /etc/group (each read only
/// when a name needs it). A user without a group gets the user's primary group. The inner
/// error is a user-facing message (an unknown name).
pub fn resolve_owner(
    spec: &str,
    read: &mut ReadFile<'_>,
) -> io::Result<Result<(u32, u32), String>> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => {
            let passwd = read("/etc/passwd")?.unwrap_or_default();
            match lookup(&passwd, user) {
                Some(fields) => (
                    fields.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
                    fields.get(3).and_then(|s| s.parse().ok()),
                ),
                None => {
                    return Ok(Err(format!(
                        "unknown user `{user}`: not in the image's /etc/passwd"
                    )))
                }
            }
        }
    };
    let gid = match group {
        None => primary_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read("/etc/group")?.unwrap_or_default();
                match lookup(&groups, g).and_then(|f| f.get(2).and_then(|s| s.parse().ok())) {
                    Some(gid) => gid,
                    None => {
                        return Ok(Err(format!(
                            "unknown group `{g}`: not in the image's /etc/group"
                        )))
                    }
                }
            }
        },
    };
    Ok(Ok((uid, gid)))
}

/// The home directory of `uid` in a passwd file; `/` when it has none.
fn home_of(passwd: &[u8], uid: u32) -> String {
    String::from_utf8_lossy(passwd)
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.get(2).and_then(|u| u.parse::<u32>().ok()) == Some(uid))
        .and_then(|f| f.get(5).map(|h| h.to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string())
}

/// The `:`-separated fields of the line of a passwd/group file whose name is `name`.
fn lookup(file: &[u8], name: &str) -> Option<Vec<String>> {
    String::from_utf8_lossy(file)
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .find(|f| f.first().map(String::as_str) == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0::/root:/bin/sh\napp:x:10001:20002::/home/app:/bin/sh\n";

    #[test]
    fn owners_resolve_by_number_and_name() {
        let reads = std::cell::RefCell::new(Vec::new());
        let mut read = |p: &str| -> io::Result<Option<Vec<u8>>> {
            reads.borrow_mut().push(p.to_string());
            Ok(Some(match p {
                "/etc/passwd" => PASSWD.to_vec(),
                _ => b"root:x:0:\nstaff:x:50:\n".to_vec(),
            }))
        };
        assert_eq!(resolve_owner("1:2", &mut read).unwrap(), Ok((1, 2)));
        assert_eq!(resolve_owner("7", &mut read).unwrap(), Ok((7, 7)));
        assert_eq!(resolve_owner("app", &mut read).unwrap(), Ok((10001, 20002)));
        assert_eq!(resolve_owner("app:staff", &mut read).unwrap(), Ok((10001, 50)));
        assert!(resolve_owner("nobody", &mut read).unwrap().is_err());
        assert!(resolve_owner("app:nogroup", &mut read).unwrap().is_err());
        // Numeric ids read nothing; a name reads only the file it is looked up in.
        let reads = reads.borrow();
        assert_eq!(reads.first().map(String::as_str), Some("/etc/passwd"));
        assert_eq!(reads.len(), 6, "{reads:?}");
    }

    #[test]
    fn home_is_the_passwd_entry_or_the_root() {
        assert_eq!(home_of(PASSWD, 10001), "/home/app");
        assert_eq!(home_of(PASSWD, 42), "/");
        assert_eq!(home_of(b"x:x:5:5::::\n", 5), "/");
    }
}
