//! Reading a docker archive (what `docker save` and `ferry build --output docker:FILE`
//! write) into what the comparison needs: the image config and the flattened root
//! filesystem, layers applied in order with OCI whiteouts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use sha2::Digest as _;

/// One path of the flattened root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// sha256 of a regular file's content.
    pub digest: Option<String>,
    /// Seconds since the epoch, as the layer tar records it.
    pub mtime: i64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// An image as the comparison sees it.
pub struct Image {
    pub config: serde_json::Value,
    pub tree: BTreeMap<String, Node>,
    /// Hard-link groups of the final tree: each path that shares its inode with others,
    /// mapped to the sorted list of all the group's paths.
    pub links: BTreeMap<String, Vec<String>>,
    pub layer_count: usize,
}

/// A layer's entries as read from its tar, before they are applied.
#[derive(Debug)]
struct LayerEntry {
    path: String,
    what: EntryWhat,
}

#[derive(Debug)]
enum EntryWhat {
    Node(Node),
    /// A hard link to an earlier path (of this layer or a lower one).
    Link(String),
    /// `.wh.<name>`: the path is deleted.
    Whiteout,
    /// `.wh..wh..opq` in this directory: the lower layers' children are hidden.
    Opaque,
}

/// Layers already read, by diffID: every case shares the bases' layers, which are large.
fn layer_memo() -> &'static Mutex<HashMap<String, Arc<Vec<LayerEntry>>>> {
    static MEMO: OnceLock<Mutex<HashMap<String, Arc<Vec<LayerEntry>>>>> = OnceLock::new();
    MEMO.get_or_init(Default::default)
}

/// Read a docker archive whose manifest.json has one image.
pub fn read_archive(path: &Path) -> Result<Image, String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    // First pass: manifest.json and the config (small); second: the layers it names.
    let mut small: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(path).map_err(err)?);
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let name = entry_name(&entry);
        if name == "manifest.json" || (name.ends_with(".json") && entry.size() < 4 << 20) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(err)?;
            small.insert(name, bytes);
        }
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        small
            .get("manifest.json")
            .ok_or_else(|| format!("{}: no manifest.json", path.display()))?,
    )
    .map_err(|e| format!("{}: manifest.json: {e}", path.display()))?;
    let image = &manifest[0];
    let config_name = image["Config"].as_str().ok_or("manifest.json: no Config")?;
    let config_bytes = match small.get(config_name) {
        Some(b) => b.clone(),
        None => read_member(path, config_name)?,
    };
    let config: serde_json::Value =
        serde_json::from_slice(&config_bytes).map_err(|e| format!("config: {e}"))?;
    let layer_names: Vec<String> = image["Layers"]
        .as_array()
        .ok_or("manifest.json: no Layers")?
        .iter()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect();
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    if diff_ids.len() != layer_names.len() {
        return Err(format!(
            "{}: {} layers but {} diff_ids",
            path.display(),
            layer_names.len(),
            diff_ids.len()
        ));
    }

    let mut layers: Vec<Option<Arc<Vec<LayerEntry>>>> =
        diff_ids.iter().map(|d| layer_memo().lock().unwrap().get(d).cloned()).collect();
    // A layer may be listed twice (an empty layer): every index of a name is filled.
    let mut wanted: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, n) in layer_names.iter().enumerate() {
        if layers[i].is_none() {
            wanted.entry(n.as_str()).or_default().push(i);
        }
    }
    if !wanted.is_empty() {
        let mut archive = tar::Archive::new(std::fs::File::open(path).map_err(err)?);
        for entry in archive.entries().map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry_name(&entry);
            if let Some(indexes) = wanted.get(name.as_str()) {
                let entries = read_layer(entry).map_err(|e| format!("layer {name}: {e}"))?;
                let entries = Arc::new(entries);
                for &i in indexes {
                    layer_memo().lock().unwrap().insert(diff_ids[i].clone(), entries.clone());
                    layers[i] = Some(entries.clone());
                }
            }
        }
    }
    let mut tree = Tree::default();
    for (i, layer) in layers.iter().enumerate() {
        let layer = layer.as_ref().ok_or_else(|| format!("layer {} not in the archive", i))?;
        tree.apply(layer);
    }
    Ok(tree.finish(config, layer_names.len()))
}

fn entry_name<R: Read>(entry: &tar::Entry<R>) -> String {
    let p = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    p.trim_start_matches("./").to_string()
}

fn read_member(path: &Path, name: &str) -> Result<Vec<u8>, String> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).map_err(|e| e.to_string())?);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        if entry_name(&entry) == name {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
            return Ok(bytes);
        }
    }
    Err(format!("{}: no member {name}", path.display()))
}

/// A layer blob, plain or gzip or zstd compressed, as entries.
fn read_layer(mut blob: impl Read) -> std::io::Result<Vec<LayerEntry>> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match blob.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let whole = std::io::Cursor::new(head[..got].to_vec()).chain(blob);
    let reader: Box<dyn Read> = if head[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(whole))
    } else if head == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::new(whole)?)
    } else {
        Box::new(whole)
    };
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path()?.to_string_lossy().into_owned();
        let path = normalise(&raw);
        let (dir, base) = match path.rsplit_once('/') {
            Some((d, b)) => (d.to_string(), b.to_string()),
            None => (String::new(), path.clone()),
        };
        if base == ".wh..wh..opq" {
            out.push(LayerEntry { path: dir, what: EntryWhat::Opaque });
            continue;
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let victim =
                if dir.is_empty() { hidden.to_string() } else { format!("{dir}/{hidden}") };
            out.push(LayerEntry { path: victim, what: EntryWhat::Whiteout });
            continue;
        }
        if path.is_empty() {
            continue; // the root directory itself
        }
        let header = entry.header().clone();
        let ty = header.entry_type();
        if ty.is_hard_link() {
            let target =
                entry.link_name()?.map(|l| normalise(&l.to_string_lossy())).unwrap_or_default();
            out.push(LayerEntry { path, what: EntryWhat::Link(target) });
            continue;
        }
        let mut xattrs = BTreeMap::new();
        let mut mtime = header.mtime().unwrap_or(0) as i64;
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let key = ext.key().unwrap_or("");
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_string(), ext.value_bytes().to_vec());
                } else if key == "mtime" {
                    if let Some(secs) = ext.value().ok().and_then(|v| v.split('.').next()) {
                        mtime = secs.parse().unwrap_or(mtime);
                    }
                }
            }
        }
        let kind = if ty.is_dir() {
            NodeKind::Dir
        } else if ty.is_symlink() {
            NodeKind::Symlink(
                entry.link_name()?.map(|l| l.to_string_lossy().into_owned()).unwrap_or_default(),
            )
        } else if ty.is_character_special() {
            NodeKind::Char(header.device_major()?.unwrap_or(0), header.device_minor()?.unwrap_or(0))
        } else if ty.is_block_special() {
            NodeKind::Block(
                header.device_major()?.unwrap_or(0),
                header.device_minor()?.unwrap_or(0),
            )
        } else if ty.is_fifo() {
            NodeKind::Fifo
        } else {
            NodeKind::File
        };
        let (size, digest) = if kind == NodeKind::File {
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut size = 0u64;
            loop {
                match entry.read(&mut buf)? {
                    0 => break,
                    n => {
                        hasher.update(&buf[..n]);
                        size += n as u64;
                    }
                }
            }
            (size, Some(hex::encode(hasher.finalize())))
        } else {
            (0, None)
        };
        let node = Node {
            kind,
            mode: header.mode()? & 0o7777,
            uid: header.uid()?,
            gid: header.gid()?,
            size,
            digest,
            mtime,
            xattrs,
        };
        out.push(LayerEntry { path, what: EntryWhat::Node(node) });
    }
    Ok(out)
}

/// `./a/b/`, `/a/b`, `a//b` → `a/b`.
fn normalise(p: &str) -> String {
    p.split('/').filter(|c| !c.is_empty() && *c != ".").collect::<Vec<_>>().join("/")
}

/// The root filesystem while layers are applied.
#[derive(Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
    /// Path → inode id; paths sharing an id are hard links of each other.
    inode: BTreeMap<String, usize>,
    next_inode: usize,
}

impl Tree {
    fn remove_subtree(&mut self, path: &str) {
        let prefix = format!("{path}/");
        let doomed: Vec<String> = self
            .nodes
            .range(path.to_string()..)
            .take_while(|(k, _)| k.as_str() == path || k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
            self.inode.remove(&k);
        }
    }

    fn remove_children(&mut self, dir: &str) {
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let doomed: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| k.as_str() != dir)
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
            self.inode.remove(&k);
        }
    }

    /// Whiteouts first (they hide what the lower layers have), then the layer's entries.
    fn apply(&mut self, layer: &[LayerEntry]) {
        for e in layer {
            match &e.what {
                EntryWhat::Opaque => self.remove_children(&e.path),
                EntryWhat::Whiteout => self.remove_subtree(&e.path),
                _ => {}
            }
        }
        for e in layer {
            match &e.what {
                EntryWhat::Node(node) => {
                    match self.nodes.get(&e.path) {
                        Some(old) if old.kind == NodeKind::Dir && node.kind == NodeKind::Dir => {}
                        Some(_) => self.remove_subtree(&e.path),
                        None => {}
                    }
                    self.nodes.insert(e.path.clone(), node.clone());
                    self.next_inode += 1;
                    self.inode.insert(e.path.clone(), self.next_inode);
                }
                EntryWhat::Link(target) => {
                    let Some(node) = self.nodes.get(target).cloned() else { continue };
                    self.remove_subtree(&e.path);
                    self.nodes.insert(e.path.clone(), node);
                    let id = self.inode[target];
                    self.inode.insert(e.path.clone(), id);
                }
                EntryWhat::Whiteout | EntryWhat::Opaque => {}
            }
        }
    }

    fn finish(self, config: serde_json::Value, layer_count: usize) -> Image {
        let mut groups: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for (path, id) in &self.inode {
            groups.entry(*id).or_default().insert(path.clone());
        }
        let mut links = BTreeMap::new();
        for members in groups.values().filter(|m| m.len() > 1) {
            let list: Vec<String> = members.iter().cloned().collect();
            for p in members {
                links.insert(p.clone(), list.clone());
            }
        }
        Image { config, tree: self.nodes, links, layer_count }
    }
}
