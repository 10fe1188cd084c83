//! Reading an image's filesystem without running it: one file out of a layer stack (for
//! `--chown` names, looked up in /etc/passwd and /etc/group as docker does), and a stack
//! flattened into a directory (for writable bind mounts from a stage or image).

use std::io::Read;
use std::path::Path;

use crate::layer::{decompress, extract_layer, ExtractMode};
use crate::oci::Descriptor;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("reading layer {digest}: {source}")]
    Read { digest: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("extracting layer {digest}: {source}")]
    Layer { digest: String, source: crate::layer::LayerError },
    #[error("{path} in layer {digest} is {size} bytes; more than the {MAX_READ_FILE} read from an image")]
    TooLarge { path: String, digest: String, size: u64 },
}

/// The largest file [`read_file`] reads into memory. It reads account databases
/// (/etc/passwd, /etc/group), a few kilobytes in real images; a base image claiming one of
/// gigabytes (a few bytes once compressed) must not exhaust memory.
pub const MAX_READ_FILE: u64 = 16 * 1024 * 1024;

/// Normalise a tar entry name to `a/b/c` (no `./`, no leading or trailing `/`).
fn normalise(name: &str) -> String {
    name.trim_start_matches("./").trim_matches('/').to_string()
}

/// The content of regular file `path` (absolute) in the image made of `layers` (bottom
/// first), honouring whiteouts; None if it does not exist.
pub fn read_file(
    store: &Store,
    layers: &[Descriptor],
    path: &str,
) -> Result<Option<Vec<u8>>, RootfsError> {
    let want = normalise(path);
    let parents: Vec<String> = {
        let mut v = Vec::new();
        let mut cur = want.as_str();
        while let Some((p, _)) = cur.rsplit_once('/') {
            v.push(p.to_string());
            cur = p;
        }
        v.push(String::new());
        v
    };
    for desc in layers.iter().rev() {
        let err = |source| RootfsError::Read { digest: desc.digest.to_string(), source };
        let blob = store.open_blob(&desc.digest)?;
        let (_, tar) = decompress(blob).map_err(err)?;
        let mut archive = tar::Archive::new(tar);
        let mut hidden_below = false;
        for entry in archive.entries().map_err(err)? {
            let mut entry = entry.map_err(err)?;
            let name = normalise(&entry.path().map_err(err)?.to_string_lossy());
            let (dir, base) = name.rsplit_once('/').unwrap_or(("", name.as_str()));
            if base == ".wh..wh..opq" && parents.iter().any(|p| p == dir) {
                hidden_below = true;
            } else if let Some(deleted) = base.strip_prefix(".wh.") {
                let deleted =
                    if dir.is_empty() { deleted.to_string() } else { format!("{dir}/{deleted}") };
                if deleted == want || want.starts_with(&format!("{deleted}/")) {
                    return Ok(None);
                }
            } else if name == want {
                if entry.header().entry_type().is_file() {
                    let size = entry.header().size().map_err(err)?;
                    if size > MAX_READ_FILE {
                        return Err(RootfsError::TooLarge {
                            path: path.to_string(),
                            digest: desc.digest.to_string(),
                            size,
                        });
                    }
                    let mut content = Vec::new();
                    entry.read_to_end(&mut content).map_err(err)?;
                    return Ok(Some(content));
                }
                return Ok(None);
            }
        }
        if hidden_below {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Extract `layers` (bottom first) on top of each other into the empty directory `dest`.
pub fn flatten(store: &Store, layers: &[Descriptor], dest: &Path) -> Result<(), RootfsError> {
    for desc in layers {
        let blob = store.open_blob(&desc.digest)?;
        let (_, tar) = decompress(blob)
            .map_err(|source| RootfsError::Read { digest: desc.digest.to_string(), source })?;
        extract_layer(tar, dest, ExtractMode::Apply)
            .map_err(|source| RootfsError::Layer { digest: desc.digest.to_string(), source })?;
    }
    Ok(())
}

/// Reads one file of an image by absolute path (None: it does not exist).
pub type ReadFile<'a> = dyn FnMut(&str) -> Result<Option<Vec<u8>>, RootfsError> + 'a;

/// Resolve `user[:group]` to numeric ids through the image's /etc/passwd and /etc/group
/// (only read when a name needs it). A user without a group gets the user's primary group.
pub fn resolve_owner(
    spec: &str,
    read: &mut ReadFile<'_>,
) -> Result<Result<(u32, u32), String>, RootfsError> {
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
pub fn home_of(passwd: &[u8], uid: u32) -> String {
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

    #[test]
    fn read_file_refuses_a_file_too_large_to_hold_in_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("store")).unwrap();
        // A header claiming 1 GiB and no data: the claim alone is refused, nothing is read.
        let mut header = tar::Header::new_ustar();
        header.set_path("etc/passwd").unwrap();
        header.set_size(1 << 30);
        header.set_mode(0o644);
        header.set_cksum();
        let mut layer = header.as_bytes().to_vec();
        layer.extend_from_slice(&[0u8; 1024]);
        let digest = store.put_blob_bytes(&layer, None).unwrap();
        let desc = Descriptor::new(crate::oci::media_type::OCI_LAYER, digest, layer.len() as u64);
        let err = read_file(&store, &[desc], "/etc/passwd").unwrap_err();
        assert!(matches!(err, RootfsError::TooLarge { size: 1073741824, .. }), "{err}");
        assert!(err.to_string().contains("/etc/passwd in layer sha256:"), "{err}");
    }

    #[test]
    fn owners_resolve_by_number_and_name() {
        let mut read = |p: &str| -> Result<Option<Vec<u8>>, RootfsError> {
            Ok(Some(match p {
                "/etc/passwd" => {
                    b"root:x:0:0::/root:/bin/sh\napp:x:10001:20002::/home/app:/bin/sh\n".to_vec()
                }
                _ => b"root:x:0:\nstaff:x:50:\n".to_vec(),
            }))
        };
        assert_eq!(resolve_owner("1:2", &mut read).unwrap(), Ok((1, 2)));
        assert_eq!(resolve_owner("7", &mut read).unwrap(), Ok((7, 7)));
        assert_eq!(resolve_owner("app", &mut read).unwrap(), Ok((10001, 20002)));
        assert_eq!(resolve_owner("app:staff", &mut read).unwrap(), Ok((10001, 50)));
        assert!(resolve_owner("nobody", &mut read).unwrap().is_err());
        assert!(resolve_owner("app:nogroup", &mut read).unwrap().is_err());
    }
}
