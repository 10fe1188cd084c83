//! Where COPY/ADD puts what it selected, with docker's rules:
//! - a relative destination is resolved against WORKDIR;
//! - the destination is a directory when it ends with `/` (or is `.`, or is `/`), or when it
//!   already is one in the image, or once an earlier source of the same COPY made it one.
//!   Several sources without the trailing `/` are copied onto the destination one after the
//!   other, as BuildKit does (the Dockerfile reference asks for the `/`; docker never
//!   enforced it): files replace each other, the last wins; a directory source makes the
//!   destination a directory that later files go into; a directory onto a file an earlier
//!   source wrote is an error;
//! - a directory source copies its *contents* into the destination, not itself;
//! - a file copied into a directory keeps its name; otherwise the destination is its new name;
//! - the parent directories of every target are listed (mode 0755, owned by the copier), so the
//!   layer writer emits them the way BuildKit creates them;
//! - symlinks inside a copied directory stay symlinks; a symlink operand was already followed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::glob;
use super::tree::{Entry, EntryKind, Selection};
use super::{ContextError, Result};

/// The mode BuildKit gives directories it has to create on the way to a target.
const PARENT_DIR_MODE: u32 = 0o755;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyKind {
    File,
    Dir,
    Symlink,
    /// A directory created only because a target lies below it: mode 0755, owned by the copier
    /// (the engine applies `--chown`), and left alone if the image already has it.
    ParentDir,
}

/// One entry the COPY writes into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyItem {
    /// Absolute path on the host; `None` for a [`CopyKind::ParentDir`].
    pub source: Option<PathBuf>,
    /// Absolute, clean path in the image.
    pub target: String,
    pub kind: CopyKind,
    /// Permission bits with setuid/setgid/sticky, from the source (0755 for parents).
    pub mode: u32,
    /// Owner of the source (0 for parents). COPY from the build context writes 0:0 unless
    /// `--chown` is given; COPY `--from` keeps these: that choice is the engine's.
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Modification time of the source (seconds since 1970), which the layer keeps (clamped
    /// to SOURCE_DATE_EPOCH, if any); `None` for a parent the copy creates.
    pub mtime: Option<i64>,
    pub link_target: Option<PathBuf>,
    /// If the image already has a directory here, keep it and its metadata (true for parent
    /// directories and for the directory a directory source's contents are copied into).
    pub keep_existing: bool,
}

/// Map a selection to image paths, as if nothing existed at the destination yet.
pub fn map_to_destination(
    selection: &Selection,
    dest: &str,
    workdir: &str,
) -> Result<Vec<CopyItem>> {
    map_to_destination_with(selection, dest, workdir, &|_| false)
}

/// Map a selection to image paths; `is_dir_in_image(path)` says whether the image being built
/// already has a directory at an absolute path (docker then copies a file *into* it:
/// `COPY app.conf /etc` writes `/etc/app.conf`).
pub fn map_to_destination_with(
    selection: &Selection,
    dest: &str,
    workdir: &str,
    is_dir_in_image: &dyn Fn(&str) -> bool,
) -> Result<Vec<CopyItem>> {
    let dir_syntax = dest.is_empty() || dest == "." || dest.ends_with('/') || dest.ends_with("/.");
    let workdir = if workdir.is_empty() { "/" } else { workdir };
    let base = if dest.starts_with('/') { dest.to_string() } else { format!("{workdir}/{dest}") };
    let target_root = glob::clean(&format!("/{base}"));
    let mut into_dir = dir_syntax || target_root == "/" || is_dir_in_image(&target_root);

    let mut plan = Plan::default();
    for item in &selection.items {
        let entry = &item.entry;
        match entry.kind {
            EntryKind::Dir => {
                if !into_dir && plan.items.contains_key(&key(&target_root)) {
                    return Err(ContextError::DestinationNotDirectory { dest: dest.to_string() });
                }
                // The directory's contents go into the destination, which is one from now on.
                into_dir = true;
                plan.add_parents(&target_root);
                if target_root != "/" {
                    let mut top = copy_item(entry, target_root.clone());
                    top.keep_existing = true;
                    plan.insert(top);
                }
                for child in &entry.children {
                    plan.add_tree(child, &target_root);
                }
            }
            EntryKind::File | EntryKind::Symlink => {
                let target = if into_dir {
                    let name = item.rel.rsplit('/').next().unwrap_or(&item.rel);
                    join_abs(&target_root, name)
                } else {
                    target_root.clone()
                };
                plan.add_parents(&target);
                plan.insert(copy_item(entry, target));
            }
        }
    }
    Ok(plan.items.into_values().collect())
}

/// Targets keyed by path components, so iteration yields parents before children.
#[derive(Default)]
struct Plan {
    items: BTreeMap<Vec<String>, CopyItem>,
}

impl Plan {
    fn add_tree(&mut self, entry: &Entry, parent_target: &str) {
        let target = join_abs(parent_target, &entry.name);
        self.insert(copy_item(entry, target.clone()));
        for child in &entry.children {
            self.add_tree(child, &target);
        }
    }

    /// List every directory above `target` that the plan does not already create.
    fn add_parents(&mut self, target: &str) {
        let parts = key(target);
        for n in 1..parts.len() {
            let parent = parts[..n].to_vec();
            let is_dir = self
                .items
                .get(&parent)
                .is_some_and(|i| matches!(i.kind, CopyKind::Dir | CopyKind::ParentDir));
            if !is_dir {
                let path = format!("/{}", parent.join("/"));
                self.items.insert(parent, parent_dir(path));
            }
        }
    }

    /// Later sources win, as later writes do in docker; a non-directory replacing a directory
    /// takes its subtree with it.
    fn insert(&mut self, item: CopyItem) {
        let k = key(&item.target);
        if !matches!(item.kind, CopyKind::Dir | CopyKind::ParentDir) {
            let below: Vec<Vec<String>> = self
                .items
                .range(k.clone()..)
                .take_while(|(other, _)| other.starts_with(&k))
                .filter(|(other, _)| other.len() > k.len())
                .map(|(other, _)| other.clone())
                .collect();
            for other in below {
                self.items.remove(&other);
            }
        }
        self.items.insert(k, item);
    }
}

fn key(target: &str) -> Vec<String> {
    target.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect()
}

fn join_abs(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn copy_item(entry: &Entry, target: String) -> CopyItem {
    CopyItem {
        source: Some(entry.path.clone()),
        target,
        kind: match entry.kind {
            EntryKind::File => CopyKind::File,
            EntryKind::Dir => CopyKind::Dir,
            EntryKind::Symlink => CopyKind::Symlink,
        },
        mode: entry.mode,
        uid: entry.uid,
        gid: entry.gid,
        size: entry.size,
        mtime: Some(entry.stat.mtime()),
        link_target: entry.link_target.clone(),
        keep_existing: false,
    }
}

fn parent_dir(target: String) -> CopyItem {
    CopyItem {
        source: None,
        target,
        kind: CopyKind::ParentDir,
        mode: PARENT_DIR_MODE,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: None,
        link_target: None,
        keep_existing: true,
    }
}

#[cfg(test)]
mod tests;
