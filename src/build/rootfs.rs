//! Reading an image's filesystem without running it: one file out of a layer stack (for
//! `--chown` names, looked up in /etc/passwd and /etc/group as docker does), and a stack
//! flattened into a directory (for `COPY --from` and bind mounts from a stage).

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

/// What a path of an image is, as COPY needs to know it before writing over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    Dir,
    File,
    Symlink(String),
    /// A device or fifo.
    Special,
}

/// The type, mode and owner of one path of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub kind: PathKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The most symlinks followed while resolving one path (Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// Every path of an image with its type and metadata, read from the layers' tar headers
/// (contents are streamed past, never written to disk), whiteouts applied as overlayfs
/// would. COPY consults it to copy *into* an existing directory, to follow the image's
/// symlinks on the way to the destination, and to leave existing directories alone.
#[derive(Debug, Clone, Default)]
pub struct ImagePaths {
    /// Keyed by normalised path (`a/b/c`, "" is the root).
    paths: std::collections::BTreeMap<String, PathInfo>,
}

impl ImagePaths {
    /// Index the image made of `layers` (bottom first).
    pub fn read(store: &Store, layers: &[Descriptor]) -> Result<ImagePaths, RootfsError> {
        let mut image = ImagePaths::default();
        for desc in layers {
            let err = |source| RootfsError::Read { digest: desc.digest.to_string(), source };
            let blob = store.open_blob(&desc.digest)?;
            let (_, tar) = decompress(blob).map_err(err)?;
            let mut archive = tar::Archive::new(tar);
            // Whiteouts hide what lower layers hold, never what this layer adds: collect the
            // layer first, apply its whiteouts, then its entries.
            let mut deleted = Vec::new();
            let mut opaque = Vec::new();
            let mut added = Vec::new();
            for entry in archive.entries().map_err(err)? {
                let entry = entry.map_err(err)?;
                let name = normalise(&entry.path().map_err(err)?.to_string_lossy());
                let (dir, base) = name.rsplit_once('/').unwrap_or(("", name.as_str()));
                if base == ".wh..wh..opq" {
                    opaque.push(dir.to_string());
                    continue;
                }
                if let Some(gone) = base.strip_prefix(".wh.") {
                    deleted.push(if dir.is_empty() {
                        gone.to_string()
                    } else {
                        format!("{dir}/{gone}")
                    });
                    continue;
                }
                let header = entry.header();
                let kind = match header.entry_type() {
                    tar::EntryType::Directory => PathKind::Dir,
                    tar::EntryType::Symlink => PathKind::Symlink(
                        entry
                            .link_name()
                            .map_err(err)?
                            .map(|l| l.to_string_lossy().to_string())
                            .unwrap_or_default(),
                    ),
                    tar::EntryType::Regular
                    | tar::EntryType::Continuous
                    | tar::EntryType::Link
                    | tar::EntryType::GNUSparse => PathKind::File,
                    _ => PathKind::Special,
                };
                let info = PathInfo {
                    kind,
                    mode: header.mode().map_err(err)? & 0o7777,
                    uid: header.uid().map_err(err)? as u32,
                    gid: header.gid().map_err(err)? as u32,
                };
                added.push((name, info));
            }
            for dir in opaque {
                image.remove_below(&dir);
            }
            for path in deleted {
                image.remove_below(&path);
                image.paths.remove(&path);
            }
            for (path, info) in added {
                image.insert(path, info);
            }
        }
        Ok(image)
    }

    fn remove_below(&mut self, dir: &str) {
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let below: Vec<String> = self
            .paths
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        for p in below {
            self.paths.remove(&p);
        }
    }

    fn insert(&mut self, path: String, info: PathInfo) {
        if path.is_empty() {
            return;
        }
        if info.kind != PathKind::Dir {
            // A file over a directory hides the directory's whole subtree.
            self.remove_below(&path);
        }
        // Directories an archive only implies exist once it is extracted.
        let mut cur = path.as_str();
        while let Some((parent, _)) = cur.rsplit_once('/') {
            self.paths.entry(parent.to_string()).or_insert(PathInfo {
                kind: PathKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            });
            cur = parent;
        }
        self.paths.insert(path, info);
    }

    /// What is at absolute path `path` (not following a final symlink); the root is a
    /// directory.
    pub fn get(&self, path: &str) -> Option<&PathInfo> {
        const ROOT: PathInfo = PathInfo { kind: PathKind::Dir, mode: 0o755, uid: 0, gid: 0 };
        let key = normalise(path);
        if key.is_empty() {
            return Some(&ROOT);
        }
        self.paths.get(&key)
    }

    /// Whether absolute `path` is a directory of the image (not following symlinks).
    pub fn is_dir(&self, path: &str) -> bool {
        self.get(path).is_some_and(|i| i.kind == PathKind::Dir)
    }

    /// Absolute `path` with every symlink on it followed as inside the container (`/` and
    /// `..` stop at the image's root), the last component included, as BuildKit resolves a
    /// COPY destination. Components that do not exist are kept as written.
    pub fn resolve(&self, path: &str) -> Result<String, String> {
        let mut pending: std::collections::VecDeque<String> =
            path.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect();
        let mut current: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(component) = pending.pop_front() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    current.pop();
                    continue;
                }
                _ => current.push(component),
            }
            let Some(PathInfo { kind: PathKind::Symlink(target), .. }) =
                self.paths.get(&current.join("/"))
            else {
                continue;
            };
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(format!("{path}: too many levels of symbolic links in the image"));
            }
            current.pop();
            if target.starts_with('/') {
                current.clear();
            }
            let mut rest: Vec<String> =
                target.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect();
            rest.extend(pending.drain(..));
            pending = rest.into();
        }
        Ok(format!("/{}", current.join("/")))
    }
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
    fn image_paths_follow_links_and_whiteouts() {
        let mut image = ImagePaths::default();
        let dir = |mode| PathInfo { kind: PathKind::Dir, mode, uid: 0, gid: 0 };
        let link =
            |t: &str| PathInfo { kind: PathKind::Symlink(t.into()), mode: 0o777, uid: 0, gid: 0 };
        image.insert("etc".into(), dir(0o755));
        image.insert("run".into(), dir(0o755));
        image.insert("var/run".into(), link("/run"));
        image.insert("var/lock".into(), link("../run/lock"));
        image.insert("loop".into(), link("loop"));
        assert!(image.is_dir("/var"), "implied parents are directories");
        assert!(image.is_dir("/etc/"));
        assert!(image.is_dir("/"));
        assert_eq!(image.resolve("/var/run/x").unwrap(), "/run/x");
        assert_eq!(image.resolve("/var/lock").unwrap(), "/run/lock");
        assert_eq!(image.resolve("/../etc/./x/..").unwrap(), "/etc");
        assert!(image.resolve("/loop/x").is_err());
        image.insert("etc".into(), PathInfo { kind: PathKind::File, mode: 0o644, uid: 0, gid: 0 });
        assert!(!image.is_dir("/etc"));
        image.remove_below("var");
        assert!(image.get("/var/run").is_none());
        assert!(image.is_dir("/var"));
    }

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
