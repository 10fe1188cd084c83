//! A tree COPY/ADD read from (the build context, or a stage's or image's rootfs) and the
//! resolution of source operands against it.
//!
//! Rules, as docker applies them to the context it was sent:
//! - files excluded by `.dockerignore` do not exist; a directory excluded but holding a
//!   re-included file exists only as the parent of that file;
//! - a source is relative to the root (a leading `/` changes nothing); `..` may not leave it;
//! - the source operand itself is followed if it is a symlink, and so is every directory on its
//!   way, but a link may not lead out of the root; symlinks *inside* a copied directory are
//!   copied as links;
//! - a source with glob syntax matches per path component with Go's `filepath.Match`, and a
//!   glob matching nothing copies nothing (BuildKit allows it, which the common
//!   `COPY requirements.tx[t] ./` idiom relies on) unless the directory before its first
//!   wildcard does not exist;
//! - `--exclude` patterns (docker's ignore-pattern syntax) drop whatever they match, tested
//!   against the path from the root and, inside a copied directory, the path from that
//!   directory (so `--exclude=*.md` drops `docs/a.md` when copying `docs`).

use std::collections::VecDeque;
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::glob::{self, Glob};
use super::ignore::{normalize_pattern, IgnoreFile, IgnoreMatcher};
use super::{ContextError, Result};

/// The most symlinks followed while resolving one source, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// The stat fields that identify one version of a file for the stat cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub nlink: u64,
}

impl FileStat {
    /// The modification time in whole seconds (rounded down, as tar and `stat -c %Y` do).
    pub fn mtime(&self) -> i64 {
        self.mtime_ns.div_euclid(1_000_000_000)
    }

    pub(crate) fn of(meta: &Metadata) -> FileStat {
        FileStat {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
            ctime_ns: meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec()),
            nlink: meta.nlink(),
        }
    }
}

/// One file, directory or symlink of a selection, with the metadata that goes into layers and
/// cache keys. A directory holds its visible children, sorted by name.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The file name (empty for the root of the tree).
    pub name: String,
    /// Absolute path on the host.
    pub path: PathBuf,
    /// Path relative to the tree root, `/`-separated, after following symlinks ("" = root).
    pub rel: String,
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// For a symlink: what it points to, verbatim.
    pub link_target: Option<PathBuf>,
    pub stat: FileStat,
    pub children: Vec<Entry>,
}

impl Entry {
    /// This entry and everything below it, parents before children.
    pub fn walk(&self) -> Vec<&Entry> {
        let mut out = Vec::new();
        let mut stack = vec![self];
        while let Some(entry) = stack.pop() {
            out.push(entry);
            stack.extend(entry.children.iter().rev());
        }
        out
    }
}

/// One match of one source operand.
#[derive(Debug, Clone)]
pub struct SelectedItem {
    /// The operand as written in the instruction.
    pub operand: String,
    /// The matched path relative to the root, before following a symlink ("" = the root).
    pub rel: String,
    /// What is copied: a file or a directory (a symlink operand is followed).
    pub entry: Entry,
}

/// The result of [`SourceTree::select`]: exactly the entries a COPY/ADD reads.
#[derive(Debug, Clone)]
pub struct Selection {
    pub root: PathBuf,
    /// The tree's description for messages ("build context /src/app", "stage builder").
    pub tree: String,
    /// The operands as given, in order (the destination rules count them).
    pub operands: Vec<String>,
    pub items: Vec<SelectedItem>,
    /// Whether owners (uid/gid) enter the content digest.
    pub(crate) digest_ownership: bool,
}

impl Selection {
    /// Every selected entry, parents before children, item by item.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.items.iter().flat_map(|item| item.entry.walk())
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// How absolute symlink targets and `..` at the root are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkScope {
    /// A directory of the host (the build context): an absolute target is a host path, valid
    /// only if it lies inside the root; leaving the root is an error.
    Host,
    /// A container rootfs: `/` is the root of the tree and `..` stops there, as in a chroot.
    Chroot,
}

/// A root directory COPY/ADD sources are resolved in.
#[derive(Debug, Clone)]
pub struct SourceTree {
    root: PathBuf,
    /// The root as the caller named it, for absolute links written with that spelling.
    given_root: PathBuf,
    label: String,
    ignore: IgnoreFile,
    scope: LinkScope,
    digest_ownership: bool,
}

impl SourceTree {
    /// The build context of a Dockerfile, with the ignore file docker would use
    /// (`<Dockerfile>.dockerignore` beside it, else `<context>/.dockerignore`).
    pub fn build_context(context: &Path, dockerfile: Option<&Path>) -> Result<SourceTree> {
        let ignore = IgnoreFile::load(context, dockerfile)?;
        SourceTree::with_ignore(context, ignore)
    }

    /// A host directory with the given ignore rules.
    pub fn with_ignore(root: &Path, ignore: IgnoreFile) -> Result<SourceTree> {
        let canonical = canonical_dir(root)?;
        Ok(SourceTree {
            label: format!("build context {}", root.display()),
            root: canonical,
            given_root: root.to_path_buf(),
            ignore,
            scope: LinkScope::Host,
            digest_ownership: true,
        })
    }

    /// A stage's or image's extracted rootfs: no ignore rules, absolute links are read
    /// relative to the tree's own `/`.
    pub fn rootfs(root: &Path, label: impl Into<String>) -> Result<SourceTree> {
        let canonical = canonical_dir(root)?;
        Ok(SourceTree {
            label: label.into(),
            root: canonical,
            given_root: root.to_path_buf(),
            ignore: IgnoreFile::none(),
            scope: LinkScope::Chroot,
            digest_ownership: true,
        })
    }

    /// Replace the description used in messages.
    pub fn with_label(mut self, label: impl Into<String>) -> SourceTree {
        self.label = label.into();
        self
    }

    /// Leave uid/gid out of content digests. For the build context this is what docker's
    /// output depends on: COPY from the context writes 0:0 unless `--chown` says otherwise,
    /// so the host's owners only make caches differ between machines.
    pub fn without_ownership_in_digest(mut self) -> SourceTree {
        self.digest_ownership = false;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn ignore(&self) -> &IgnoreFile {
        &self.ignore
    }

    /// Resolve COPY/ADD sources (already word-expanded) with `--exclude` patterns.
    pub fn select(&self, sources: &[String], excludes: &[String]) -> Result<Selection> {
        let normalized: Vec<String> =
            excludes.iter().map(|e| normalize_pattern(e.trim())).collect();
        let exclude = IgnoreMatcher::new(&normalized).map_err(|(i, reason)| {
            ContextError::BadExcludePattern {
                pattern: excludes[i].clone(),
                reason: reason.to_string(),
            }
        })?;
        let mut items = Vec::new();
        for operand in sources {
            let rel = self.operand_path(operand)?;
            let matches = if glob::has_wildcards(&rel) {
                self.expand_glob(operand, &rel)?
            } else {
                vec![rel]
            };
            for rel in matches {
                if let Some(entry) = self.load_source(operand, &rel, &exclude)? {
                    items.push(SelectedItem { operand: operand.clone(), rel, entry });
                }
            }
        }
        Ok(Selection {
            root: self.root.clone(),
            tree: self.label.clone(),
            operands: sources.to_vec(),
            items,
            digest_ownership: self.digest_ownership,
        })
    }

    /// The operand as a clean path relative to the root ("" for the root itself).
    fn operand_path(&self, operand: &str) -> Result<String> {
        let cleaned = glob::clean(operand.trim_start_matches('/'));
        if cleaned == ".." || cleaned.starts_with("../") {
            return Err(self.outside(operand, "\"..\" leads out of it".to_string()));
        }
        Ok(if cleaned == "." { String::new() } else { cleaned })
    }

    fn outside(&self, operand: &str, reason: String) -> ContextError {
        ContextError::OutsideRoot { operand: operand.to_string(), tree: self.label.clone(), reason }
    }

    fn not_found(&self, operand: &str) -> ContextError {
        ContextError::NotFound { operand: operand.to_string(), tree: self.label.clone() }
    }

    fn io(path: &Path, source: std::io::Error) -> ContextError {
        ContextError::Io { path: path.to_path_buf(), source }
    }

    fn abs(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// Expand a source with glob syntax into the matching paths (lexical, relative to the
    /// root), in Go's `filepath.Glob` order.
    fn expand_glob(&self, operand: &str, rel: &str) -> Result<Vec<String>> {
        let components: Vec<&str> = rel.split('/').collect();
        let first_wild = components.iter().position(|c| glob::has_wildcards(c)).unwrap_or(0);
        let prefix = components[..first_wild].join("/");
        // As BuildKit: the directory before the first wildcard must exist.
        match self.resolve(operand, &prefix)? {
            Some((_, meta)) if meta.is_dir() => {}
            _ => return Err(self.not_found(operand)),
        }
        let mut paths = vec![prefix];
        for component in &components[first_wild..] {
            let mut next = Vec::new();
            for path in &paths {
                let Some((physical, meta)) = self.resolve(operand, path)? else { continue };
                if !meta.is_dir() {
                    continue;
                }
                if glob::has_wildcards(component) {
                    let pattern =
                        Glob::new(component).map_err(|e| ContextError::BadSourcePattern {
                            operand: operand.to_string(),
                            tree: self.label.clone(),
                            reason: e.to_string(),
                        })?;
                    for name in self.list_names(&physical)? {
                        if pattern.matches(&name) {
                            next.push(join(path, &name));
                        }
                    }
                } else {
                    next.push(join(path, &unescape(component)));
                }
            }
            // Keep what exists in the tree (a literal component may name nothing; a matched
            // name may be a dangling link), following links: one leading out is an error.
            paths = Vec::with_capacity(next.len());
            for path in next {
                if self.resolve(operand, &path)?.is_some() {
                    paths.push(path);
                }
            }
        }
        Ok(paths)
    }

    /// Names in a directory (by physical relative path), sorted, excluding entries the ignore
    /// rules hide.
    fn list_names(&self, dir_rel: &str) -> Result<Vec<String>> {
        let dir = self.abs(dir_rel);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Self::io(&dir, e))? {
            let entry = entry.map_err(|e| Self::io(&dir, e))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| ContextError::NonUtf8Name { path: entry.path() })?;
            let meta = entry.metadata().map_err(|e| Self::io(&entry.path(), e))?;
            if self.visible(&join(dir_rel, &name), &meta)? {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Whether the ignore rules leave a path (physical, relative) in the tree: not excluded,
    /// or a directory that still holds something re-included.
    fn visible(&self, rel: &str, meta: &Metadata) -> Result<bool> {
        if !self.ignore.excludes(rel) {
            return Ok(true);
        }
        if !meta.is_dir() || !self.ignore.matcher().may_reinclude_below(rel) {
            return Ok(false);
        }
        self.has_visible_descendant(rel)
    }

    fn has_visible_descendant(&self, dir_rel: &str) -> Result<bool> {
        let dir = self.abs(dir_rel);
        for entry in std::fs::read_dir(&dir).map_err(|e| Self::io(&dir, e))? {
            let entry = entry.map_err(|e| Self::io(&dir, e))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            let rel = join(dir_rel, &name);
            if !self.ignore.excludes(&rel) {
                return Ok(true);
            }
            let file_type = entry.file_type().map_err(|e| Self::io(&entry.path(), e))?;
            if file_type.is_dir()
                && self.ignore.matcher().may_reinclude_below(&rel)
                && self.has_visible_descendant(&rel)?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Follow `rel` (lexically clean, relative) through every symlink, inside the root.
    /// Returns the physical relative path and its metadata, or `None` if it does not exist in
    /// the tree (absent, or hidden by the ignore rules).
    fn resolve(&self, operand: &str, rel: &str) -> Result<Option<(String, Metadata)>> {
        let mut pending: VecDeque<String> =
            rel.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect();
        let mut current: Vec<String> = Vec::new();
        let mut links = 0;
        let mut meta =
            std::fs::symlink_metadata(&self.root).map_err(|e| Self::io(&self.root, e))?;
        while let Some(component) = pending.pop_front() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    if current.pop().is_none() && self.scope == LinkScope::Host {
                        return Err(
                            self.outside(operand, "a symlink on its path leads out of it".into())
                        );
                    }
                    let here = self.abs(&current.join("/"));
                    meta = std::fs::symlink_metadata(&here).map_err(|e| Self::io(&here, e))?;
                    continue;
                }
                _ => {}
            }
            if !meta.is_dir() {
                return Ok(None);
            }
            current.push(component);
            let here_rel = current.join("/");
            let here = self.abs(&here_rel);
            meta = match std::fs::symlink_metadata(&here) {
                Ok(meta) => meta,
                Err(e) if is_absent(&e) => return Ok(None),
                Err(e) => return Err(Self::io(&here, e)),
            };
            if !meta.file_type().is_symlink() {
                continue;
            }
            // The link itself is an entry of the tree and may be ignored.
            if self.ignore.excludes(&here_rel) {
                return Ok(None);
            }
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(ContextError::SymlinkLoop {
                    operand: operand.to_string(),
                    tree: self.label.clone(),
                });
            }
            let target = std::fs::read_link(&here).map_err(|e| Self::io(&here, e))?;
            current.pop();
            let target_str =
                target.to_str().ok_or_else(|| ContextError::NonUtf8Name { path: here.clone() })?;
            let mut rest: Vec<String> = if target.is_absolute() {
                current.clear();
                match self.scope {
                    LinkScope::Chroot => components(target_str),
                    LinkScope::Host => match self.strip_root(&target) {
                        Some(inside) => components(&inside),
                        None => {
                            return Err(self.outside(
                                operand,
                                format!("symlink {here_rel} points to {}", target.display()),
                            ))
                        }
                    },
                }
            } else {
                components(target_str)
            };
            rest.extend(pending.drain(..));
            pending = rest.into();
            let base = self.abs(&current.join("/"));
            meta = std::fs::symlink_metadata(&base).map_err(|e| Self::io(&base, e))?;
        }
        let physical = current.join("/");
        if !physical.is_empty() && !self.visible(&physical, &meta)? {
            return Ok(None);
        }
        Ok(Some((physical, meta)))
    }

    /// An absolute host path inside the root, as a relative path.
    fn strip_root(&self, target: &Path) -> Option<String> {
        for root in [&self.root, &self.given_root] {
            if let Ok(inside) = target.strip_prefix(root) {
                return inside.to_str().map(str::to_string);
            }
        }
        None
    }

    /// Load one matched source: follow it, apply the excludes, read its subtree.
    fn load_source(
        &self,
        operand: &str,
        rel: &str,
        exclude: &IgnoreMatcher,
    ) -> Result<Option<Entry>> {
        let Some((physical, meta)) = self.resolve(operand, rel)? else {
            return Err(self.not_found(operand));
        };
        let abs = self.abs(&physical);
        let kind = entry_kind(&abs, &meta)?;
        let excluded = exclude.matches(rel);
        if excluded && (kind != EntryKind::Dir || !exclude.may_reinclude_below(rel)) {
            return Ok(None);
        }
        let name = physical.rsplit('/').next().unwrap_or_default().to_string();
        let mut entry = make_entry(name, abs, physical.clone(), kind, &meta)?;
        if kind == EntryKind::Dir {
            let paths = Paths { physical, lexical: rel.to_string(), source: String::new() };
            entry.children = self.walk(&paths, exclude)?;
            if excluded && entry.children.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(entry))
    }

    /// The visible children of a directory, recursively, sorted by name.
    fn walk(&self, dir: &Paths, exclude: &IgnoreMatcher) -> Result<Vec<Entry>> {
        let abs = self.abs(&dir.physical);
        let mut listing = Vec::new();
        for entry in std::fs::read_dir(&abs).map_err(|e| Self::io(&abs, e))? {
            let entry = entry.map_err(|e| Self::io(&abs, e))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| ContextError::NonUtf8Name { path: entry.path() })?;
            listing.push((name, entry.path()));
        }
        listing.sort();
        let mut children = Vec::new();
        for (name, path) in listing {
            let paths = dir.child(&name);
            let meta = std::fs::symlink_metadata(&path).map_err(|e| Self::io(&path, e))?;
            let ignored = self.ignore.excludes(&paths.physical);
            let dropped = exclude.matches(&paths.lexical) || exclude.matches(&paths.source);
            let file_type = meta.file_type();
            if !(file_type.is_file() || file_type.is_dir() || file_type.is_symlink()) {
                if !ignored && !dropped {
                    tracing::warn!(path = %path.display(), "skipping special file (only files, directories and symlinks are copied)");
                }
                continue;
            }
            let kind = entry_kind(&path, &meta)?;
            if ignored || dropped {
                let may_reinclude = kind == EntryKind::Dir
                    && (!ignored || self.ignore.matcher().may_reinclude_below(&paths.physical))
                    && (!dropped
                        || exclude.may_reinclude_below(&paths.lexical)
                        || exclude.may_reinclude_below(&paths.source));
                if !may_reinclude {
                    continue;
                }
            }
            let mut entry = make_entry(name, path, paths.physical.clone(), kind, &meta)?;
            if kind == EntryKind::Dir {
                entry.children = self.walk(&paths, exclude)?;
                if (ignored || dropped) && entry.children.is_empty() {
                    continue;
                }
            }
            children.push(entry);
        }
        Ok(children)
    }
}

/// The three names of one path during a walk: its physical path from the root (what
/// `.dockerignore` sees), the path from the root through the operand as written, and the path
/// from the copied directory (what `--exclude` sees).
struct Paths {
    physical: String,
    lexical: String,
    source: String,
}

impl Paths {
    fn child(&self, name: &str) -> Paths {
        Paths {
            physical: join(&self.physical, name),
            lexical: join(&self.lexical, name),
            source: join(&self.source, name),
        }
    }
}

fn canonical_dir(root: &Path) -> Result<PathBuf> {
    let canonical = std::fs::canonicalize(root)
        .map_err(|source| ContextError::Io { path: root.to_path_buf(), source })?;
    if !canonical.is_dir() {
        return Err(ContextError::Io {
            path: root.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    Ok(canonical)
}

fn entry_kind(path: &Path, meta: &Metadata) -> Result<EntryKind> {
    let t = meta.file_type();
    if t.is_file() {
        Ok(EntryKind::File)
    } else if t.is_dir() {
        Ok(EntryKind::Dir)
    } else if t.is_symlink() {
        Ok(EntryKind::Symlink)
    } else {
        let what = if t.is_fifo() {
            "a named pipe"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        Err(ContextError::UnsupportedFileType { path: path.to_path_buf(), what })
    }
}

fn make_entry(
    name: String,
    path: PathBuf,
    rel: String,
    kind: EntryKind,
    meta: &Metadata,
) -> Result<Entry> {
    let link_target = if kind == EntryKind::Symlink {
        Some(
            std::fs::read_link(&path)
                .map_err(|source| ContextError::Io { path: path.clone(), source })?,
        )
    } else {
        None
    };
    Ok(Entry {
        name,
        rel,
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: if kind == EntryKind::Dir { 0 } else { meta.len() },
        link_target,
        stat: FileStat::of(meta),
        children: Vec::new(),
        path,
    })
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

fn components(path: &str) -> Vec<String> {
    path.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect()
}

/// A literal glob component with its `\` escapes removed (`a\*` names `a*`).
fn unescape(component: &str) -> String {
    let mut out = String::new();
    let mut chars = component.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn is_absent(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory)
}

#[cfg(test)]
mod tests;
