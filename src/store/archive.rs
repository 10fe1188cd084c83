//! `save` and `load`: docker archives (what `docker save` writes and `docker load` reads)
//! and OCI archives (a tar of an OCI image layout).
//!
//! A docker archive ferry writes is also an OCI layout, as docker 25+ writes them:
//! `manifest.json` and `repositories` for `docker load`, and `oci-layout`, `index.json` and
//! `blobs/sha256/` holding the image's exact manifest, config and layer blobs. Loading it
//! back therefore keeps the manifest digest. `manifest.json` points at the stored layer
//! blobs (docker load decompresses gzip itself); a zstd layer also gets an uncompressed
//! copy (named by its diffID) so that docker versions without zstd can load it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, Result, Store, StoreError};
use crate::digest::{Digest, Hasher};
use crate::oci::{
    self, chain_ids, media_type, Compression, Descriptor, ImageConfig, ImageIndex, ImageManifest,
    ParsedManifest, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME,
};
use crate::reference::Reference;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// `docker save` / `docker load` format (also an OCI layout).
    Docker,
    /// A tar of an OCI image layout (`skopeo copy oci-archive:`).
    Oci,
}

/// An image to save: its store name (if any) and what it points to.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    pub name: Option<String>,
    pub descriptor: Descriptor,
}

/// An image `load` put into the store.
#[derive(Debug, Clone, Serialize)]
pub struct LoadedImage {
    pub names: Vec<String>,
    pub digest: Digest,
    pub id: Digest,
}

/// One entry of a docker archive's `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default, deserialize_with = "null_vec")]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

fn null_vec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// Files a tar of a docker archive keeps in memory while loading; anything larger goes
/// straight into the store as a blob.
const SMALL_FILE_MAX: u64 = 8 * 1024 * 1024;

/// The largest manifest or config `load` reads (as the registry client and gc do).
const MANIFEST_MAX: u64 = 16 * 1024 * 1024;

impl Store {
    /// Write `images` to `out` (atomically: a failed save leaves no file behind).
    pub fn save_archive(
        &self,
        images: &[ArchiveImage],
        format: ArchiveFormat,
        out: &Path,
    ) -> Result<()> {
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".ferry-save-")
            .tempfile_in(dir)
            .map_err(io_err("create a temp file in", dir))?;
        let file = tmp.as_file().try_clone().map_err(io_err("open", tmp.path()))?;
        let mut tar = tar::Builder::new(io::BufWriter::new(file));
        self.write_archive(images, format, &mut tar).map_err(|e| match e {
            StoreError::Io { action, path, source } if path.as_os_str().is_empty() => {
                StoreError::Io { action, path: out.to_path_buf(), source }
            }
            other => other,
        })?;
        let mut w = tar.into_inner().map_err(io_err("write", out))?;
        w.flush().map_err(io_err("write", out))?;
        drop(w);
        tmp.as_file().sync_all().map_err(io_err("sync", tmp.path()))?;
        tmp.persist(out).map_err(|e| io_err("write", out)(e.error))?;
        Ok(())
    }

    fn write_archive<W: Write>(
        &self,
        images: &[ArchiveImage],
        format: ArchiveFormat,
        tar: &mut tar::Builder<W>,
    ) -> Result<()> {
        let no_path = PathBuf::new();
        let mut index = ImageIndex::new_oci();
        let mut blobs: BTreeSet<Digest> = BTreeSet::new();
        // Per image (by manifest digest, in order of first appearance): docker entry.
        let mut docker: Vec<(Digest, DockerArchiveEntry)> = Vec::new();
        let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut extra: Vec<(Digest, PathBuf)> = Vec::new(); // uncompressed copies of zstd layers
        let mut temps = Vec::new();
        for item in images {
            let img = self.image(&item.descriptor)?;
            let mut desc = img.descriptor.clone();
            desc.annotations.remove(ANNOTATION_REF_NAME);
            let parsed = item.name.as_deref().and_then(|n| Reference::parse(n).ok());
            if let Some(name) = &item.name {
                desc.annotations.insert(ANNOTATION_REF_NAME.to_string(), name.clone());
            }
            if let Some(r) = parsed.as_ref().filter(|r| r.digest.is_none()) {
                desc.annotations.insert(ANNOTATION_CONTAINERD_NAME.to_string(), r.store_name());
            }
            index.manifests.push(desc);
            blobs.extend(
                img.blobs()
                    .into_iter()
                    .filter(|d| Some(d) != img.index.as_ref().map(|i| &i.digest)),
            );
            if format == ArchiveFormat::Oci {
                continue;
            }
            let diff_ids = &img.config.rootfs.diff_ids;
            if diff_ids.len() != img.manifest.layers.len() {
                return Err(StoreError::Invalid {
                    what: format!("image {}", item.name.as_deref().unwrap_or(img.digest().hex())),
                    reason: format!(
                        "its config lists {} layers but its manifest {}",
                        diff_ids.len(),
                        img.manifest.layers.len()
                    ),
                });
            }
            let repo_tag = parsed.filter(|r| r.digest.is_none()).map(|r| r.familiar());
            if let Some(pos) = docker.iter().position(|(d, _)| d == img.digest()) {
                if let Some(t) = repo_tag {
                    docker[pos].1.repo_tags.push(t);
                }
                continue;
            }
            let mut layers = Vec::new();
            for (layer, diff_id) in img.manifest.layers.iter().zip(diff_ids) {
                let compression = Compression::of_layer_media_type(&layer.media_type)
                    .unwrap_or(Compression::Gzip);
                if compression == Compression::Zstd {
                    if !extra.iter().any(|(d, _)| d == diff_id) {
                        let t = self.decompress_to_temp(layer, diff_id)?;
                        extra.push((diff_id.clone(), t.path().to_path_buf()));
                        temps.push(t);
                    }
                    layers.push(format!("blobs/sha256/{}", diff_id.hex()));
                } else {
                    layers.push(format!("blobs/sha256/{}", layer.digest.hex()));
                }
            }
            let top = chain_ids(diff_ids).last().cloned().unwrap_or_else(|| img.id().clone());
            if let Some(t) = &repo_tag {
                if let Ok(r) = Reference::parse(t) {
                    if let Some(tag) = &r.tag {
                        repositories
                            .entry(r.repository.familiar())
                            .or_default()
                            .insert(tag.clone(), top.hex().to_string());
                    }
                }
            }
            docker.push((
                img.digest().clone(),
                DockerArchiveEntry {
                    config: format!("blobs/sha256/{}", img.id().hex()),
                    repo_tags: repo_tag.into_iter().collect(),
                    layers,
                },
            ));
        }
        let layout = serde_json::json!({"imageLayoutVersion": media_type::OCI_LAYOUT_VERSION});
        append_bytes(tar, "oci-layout", layout.to_string().as_bytes(), &no_path)?;
        append_dir(tar, "blobs/", &no_path)?;
        append_dir(tar, "blobs/sha256/", &no_path)?;
        for d in &blobs {
            let path = self.blob_path(d);
            let f = self.open_blob(d)?;
            append_file(tar, &format!("blobs/sha256/{}", d.hex()), f, &path)?;
        }
        for (d, path) in &extra {
            if blobs.contains(d) {
                continue;
            }
            let f = File::open(path).map_err(io_err("open", path))?;
            append_file(tar, &format!("blobs/sha256/{}", d.hex()), f, path)?;
        }
        let index_bytes = to_json(&index)?;
        append_bytes(tar, "index.json", &index_bytes, &no_path)?;
        if format == ArchiveFormat::Docker {
            let entries: Vec<&DockerArchiveEntry> = docker.iter().map(|(_, e)| e).collect();
            append_bytes(tar, "manifest.json", &to_json(&entries)?, &no_path)?;
            append_bytes(tar, "repositories", &to_json(&repositories)?, &no_path)?;
        }
        Ok(())
    }

    /// Decompress a zstd layer into a temp file, checking it against its diffID.
    fn decompress_to_temp(
        &self,
        layer: &Descriptor,
        diff_id: &Digest,
    ) -> Result<tempfile::NamedTempFile> {
        let dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("save-")
            .tempfile_in(&dir)
            .map_err(io_err("create a temp file in", &dir))?;
        let src = self.open_blob(&layer.digest)?;
        let mut dec = Compression::Zstd
            .decoder(BufReader::new(src))
            .map_err(io_err("decompress", &self.blob_path(&layer.digest)))?;
        let mut w = crate::digest::HashingWriter::new(io::BufWriter::new(tmp.as_file_mut()));
        io::copy(&mut dec, &mut w).map_err(io_err("decompress", &self.blob_path(&layer.digest)))?;
        let (d, _, mut inner) = w.finish();
        inner.flush().map_err(io_err("write", &dir))?;
        drop(inner);
        if d != *diff_id {
            return Err(StoreError::Invalid {
                what: format!("layer {}", layer.digest),
                reason: format!("it decompresses to {d}, but the image config says {diff_id}"),
            });
        }
        tmp.as_file_mut().rewind().map_err(io_err("read", &dir))?;
        Ok(tmp)
    }

    /// Read a docker or OCI archive (plain, gzip or zstd compressed) from `input` into the
    /// store and name its images. Every blob is verified; nothing is named unless the
    /// whole image is stored. `source` names the input in errors.
    pub fn load_archive(&self, input: impl Read, source: &Path) -> Result<Vec<LoadedImage>> {
        let _gc = self.gc_guard()?;
        let archive_err =
            |reason: String| StoreError::Archive { path: source.to_path_buf(), reason };
        let mut buffered = BufReader::with_capacity(256 * 1024, input);
        let head = buffered.fill_buf().map_err(io_err("read", source))?;
        let compression = Compression::sniff(head);
        let reader = compression.decoder(buffered).map_err(io_err("decompress", source))?;
        let mut tar = tar::Archive::new(reader);
        let mut files = ArchiveFiles::default();
        for entry in tar.entries().map_err(io_err("read", source))? {
            let mut entry = entry.map_err(io_err("read", source))?;
            let path = normalize(&entry.path().map_err(io_err("read", source))?.to_string_lossy());
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(io_err("read", source))?
                    .map(|t| t.to_string_lossy().to_string())
                    .unwrap_or_default();
                let target = if kind.is_symlink() {
                    join_relative(&path, &target)
                } else {
                    normalize(&target)
                };
                files.links.insert(path, target);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                let expected: Digest = format!("sha256:{hex}")
                    .parse()
                    .map_err(|_| archive_err(format!("{path} is not named by a sha256 digest")))?;
                self.put_blob_reader(&mut entry, Some(&expected)).map_err(|e| match e {
                    StoreError::DigestMismatch { actual, .. } => archive_err(format!(
                        "{path} does not match its digest (its content is {actual})"
                    )),
                    other => other,
                })?;
                files.blobs.insert(path, expected);
            } else if entry.header().size().unwrap_or(u64::MAX) <= SMALL_FILE_MAX {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(io_err("read", source))?;
                files.small.insert(path, bytes);
            } else {
                let (d, _) = self.put_blob_reader(&mut entry, None)?;
                files.blobs.insert(path, d);
            }
        }
        if files.small.contains_key("manifest.json") {
            self.load_docker(&files, &archive_err)
        } else if files.small.contains_key("index.json") {
            self.load_oci(&files, &archive_err)
        } else if files.small.contains_key("repositories") {
            Err(archive_err(
                "it is a legacy docker archive without manifest.json (docker before 1.10); \
                 save it again with a current docker"
                    .to_string(),
            ))
        } else {
            Err(archive_err(
                "it has neither manifest.json nor index.json: not a docker or OCI archive"
                    .to_string(),
            ))
        }
    }

    fn load_docker(
        &self,
        files: &ArchiveFiles,
        archive_err: &dyn Fn(String) -> StoreError,
    ) -> Result<Vec<LoadedImage>> {
        let manifest_json = files.bytes(self, "manifest.json", archive_err)?;
        let entries: Vec<DockerArchiveEntry> = serde_json::from_slice(&manifest_json)
            .map_err(|e| archive_err(format!("manifest.json is not valid: {e}")))?;
        // Exact manifests the archive also carries (docker 25+, ferry), by config digest.
        let mut exact: HashMap<Digest, Descriptor> = HashMap::new();
        if files.small.contains_key("index.json") {
            if let Ok(index) = serde_json::from_slice::<ImageIndex>(&files.small["index.json"]) {
                for d in self.flatten_index(index.manifests) {
                    if let Ok(img) = self.image(&d) {
                        // An exact manifest that does not hold up is ignored: the entry's
                        // own layers (checked against its diffIDs) make a new one.
                        if self.verify_loaded(&d).is_ok() {
                            exact.insert(img.id().clone(), img.descriptor.clone());
                        }
                    }
                }
            }
        }
        let mut loaded = Vec::new();
        for entry in entries {
            let config_bytes = files.bytes(self, &entry.config, archive_err)?;
            let config_digest = self.put_blob_bytes(&config_bytes, None)?;
            let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
                archive_err(format!("{} is not an image config: {e}", entry.config))
            })?;
            let desc = match exact.get(&config_digest) {
                Some(d) => d.clone(),
                None => {
                    self.synthesize_manifest(files, &entry, &config, &config_bytes, archive_err)?
                }
            };
            let mut names = Vec::new();
            for t in &entry.repo_tags {
                let r = Reference::parse(t).map_err(|e| {
                    archive_err(format!("manifest.json has an invalid RepoTag: {e}"))
                })?;
                names.push(r.store_name());
            }
            self.name_loaded(&desc, &names)?;
            loaded.push(LoadedImage { names, digest: desc.digest.clone(), id: config_digest });
        }
        Ok(loaded)
    }

    /// Build an OCI manifest for a docker archive entry that has no exact manifest,
    /// checking each layer against the config's diffIDs.
    fn synthesize_manifest(
        &self,
        files: &ArchiveFiles,
        entry: &DockerArchiveEntry,
        config: &ImageConfig,
        config_bytes: &[u8],
        archive_err: &dyn Fn(String) -> StoreError,
    ) -> Result<Descriptor> {
        if config.rootfs.diff_ids.len() != entry.layers.len() {
            return Err(archive_err(format!(
                "{} lists {} layers but its config {} diffIDs",
                entry.config,
                entry.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (path, diff_id) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
            let digest = files.blob(self, path, archive_err)?;
            let size = self.blob_size(&digest)?.unwrap_or(0);
            let mut f = BufReader::new(self.open_blob(&digest)?);
            let head = f.fill_buf().map_err(io_err("read", &self.blob_path(&digest)))?;
            let compression = Compression::sniff(head);
            let mut dec =
                compression.decoder(f).map_err(io_err("read", &self.blob_path(&digest)))?;
            let mut hasher = Hasher::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n =
                    dec.read(&mut buf).map_err(io_err("decompress", &self.blob_path(&digest)))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let (actual, _) = hasher.finish();
            if actual != *diff_id {
                return Err(archive_err(format!(
                    "layer {path} has content {actual}, but the image config says {diff_id}"
                )));
            }
            layers.push(Descriptor::new(compression.oci_layer_media_type(), digest, size));
        }
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config: Descriptor::of_bytes(media_type::OCI_CONFIG, config_bytes),
            layers,
            subject: None,
            annotations: BTreeMap::new(),
        };
        self.put_json(media_type::OCI_MANIFEST, &manifest)
    }

    fn load_oci(
        &self,
        files: &ArchiveFiles,
        archive_err: &dyn Fn(String) -> StoreError,
    ) -> Result<Vec<LoadedImage>> {
        let index: ImageIndex = serde_json::from_slice(&files.small["index.json"])
            .map_err(|e| archive_err(format!("index.json is not valid: {e}")))?;
        // Everything is checked before anything is named: a bad image fails the whole load.
        for entry in &index.manifests {
            self.verify_loaded(entry).map_err(|reason| {
                archive_err(format!("index.json names {}: {reason}", entry.digest))
            })?;
        }
        let mut loaded = Vec::new();
        for entry in index.manifests {
            let ref_name = entry.annotations.get(ANNOTATION_REF_NAME);
            let full = entry.annotations.get(ANNOTATION_CONTAINERD_NAME);
            // docker 25+ writes a bare tag as ref.name and the full name for containerd.
            let name = match (ref_name, full) {
                (Some(r), Some(f)) if f.ends_with(&format!(":{r}")) => {
                    Some(Reference::parse(f).map(|x| x.store_name()).unwrap_or_else(|_| f.clone()))
                }
                (Some(r), _) => Some(r.clone()),
                (None, Some(f)) => {
                    Some(Reference::parse(f).map(|x| x.store_name()).unwrap_or_else(|_| f.clone()))
                }
                (None, None) => None,
            };
            let mut desc = entry.clone();
            desc.annotations.remove(ANNOTATION_REF_NAME);
            let names: Vec<String> = name.into_iter().collect();
            self.name_loaded(&desc, &names)?;
            let id =
                self.image(&desc).map(|i| i.id().clone()).unwrap_or_else(|_| desc.digest.clone());
            loaded.push(LoadedImage { names, digest: desc.digest.clone(), id });
        }
        Ok(loaded)
    }

    /// Check that every blob `root` reaches is in the store and is what its descriptor
    /// says: its size, and for an image, that each layer uncompresses to the diffID its
    /// config lists (digests themselves were checked as the blobs were stored). Without
    /// this, an archive that lies would be named in the store and fail later, far from
    /// its cause: in a build, a push, or another tool reading the store.
    fn verify_loaded(&self, root: &Descriptor) -> std::result::Result<(), String> {
        let mut missing = Vec::new();
        let mut seen = BTreeSet::new();
        let mut queue = vec![(root.clone(), true)];
        while let Some((d, is_root)) = queue.pop() {
            if !seen.insert(d.digest.clone()) {
                continue;
            }
            let Some(size) = self.blob_size(&d.digest).map_err(|e| e.to_string())? else {
                missing.push(d.digest.to_string());
                continue;
            };
            if size != d.size {
                return Err(format!(
                    "{} is {size} bytes where its descriptor says size {}",
                    d.digest, d.size
                ));
            }
            let is_manifest =
                media_type::is_manifest(&d.media_type) || media_type::is_index(&d.media_type);
            if !is_root && !is_manifest {
                continue;
            }
            if size > MANIFEST_MAX {
                return Err(format!("manifest {} is {size} bytes, too large", d.digest));
            }
            let bytes = self.read_blob(&d.digest).map_err(|e| e.to_string())?;
            let (_, parsed) = oci::parse_manifest(&bytes, Some(&d.media_type))
                .map_err(|reason| format!("manifest {}: {reason}", d.digest))?;
            match parsed {
                ParsedManifest::Index(i) => {
                    queue.extend(i.manifests.into_iter().map(|m| (m, false)));
                    queue.extend(i.subject.map(|s| (s, false)));
                }
                ParsedManifest::Image(m) => {
                    queue.push((m.config.clone(), false));
                    queue.extend(m.layers.iter().cloned().map(|l| (l, false)));
                    queue.extend(m.subject.clone().map(|s| (s, false)));
                    // Sizes first: a config or layer that is not there, or not the size it
                    // claims, is reported as such rather than as a wrong diffID.
                    if self.verify_sizes(&m)? {
                        self.verify_diff_ids(&d.digest, &m)?;
                    }
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("the archive lacks {}", missing.join(", ")))
        }
    }

    /// Whether the config and layers of `m` are all stored (the walk reports those that
    /// are not), erring on one of the wrong size.
    fn verify_sizes(&self, m: &ImageManifest) -> std::result::Result<bool, String> {
        let mut all = true;
        for d in std::iter::once(&m.config).chain(&m.layers) {
            match self.blob_size(&d.digest).map_err(|e| e.to_string())? {
                None => all = false,
                Some(size) if size != d.size => {
                    return Err(format!(
                        "{} is {size} bytes where its descriptor says size {}",
                        d.digest, d.size
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(all)
    }

    /// Each layer of an image against the diffID its config lists.
    fn verify_diff_ids(
        &self,
        manifest_digest: &Digest,
        m: &ImageManifest,
    ) -> std::result::Result<(), String> {
        if !oci::is_image_config(&m.config.media_type) {
            return Ok(()); // an artifact: its "layers" are not filesystem layers
        }
        if m.config.size > MANIFEST_MAX {
            return Err(format!(
                "config {} is {} bytes, too large",
                m.config.digest, m.config.size
            ));
        }
        let config: ImageConfig =
            serde_json::from_slice(&self.read_blob(&m.config.digest).map_err(|e| e.to_string())?)
                .map_err(|e| format!("config {} is not an image config: {e}", m.config.digest))?;
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != m.layers.len() {
            return Err(format!(
                "manifest {manifest_digest} has {} layers but its config {} diffIDs",
                m.layers.len(),
                diff_ids.len()
            ));
        }
        for (layer, diff_id) in m.layers.iter().zip(diff_ids) {
            let Some(compression) = Compression::of_layer_media_type(&layer.media_type) else {
                continue;
            };
            let actual = if compression == Compression::None {
                layer.digest.clone()
            } else {
                let path = self.blob_path(&layer.digest);
                let blob = self.open_blob(&layer.digest).map_err(|e| e.to_string())?;
                let mut dec = compression
                    .decoder(BufReader::new(blob))
                    .map_err(|e| format!("layer {}: {e}", layer.digest))?;
                let mut w = crate::digest::HashingWriter::new(io::sink());
                io::copy(&mut dec, &mut w).map_err(|e| {
                    format!("layer {} ({}): cannot decompress: {e}", layer.digest, path.display())
                })?;
                w.finish().0
            };
            if actual != *diff_id {
                return Err(format!(
                    "layer {} uncompresses to {actual}, not to the diffID {diff_id} its config lists",
                    layer.digest
                ));
            }
        }
        Ok(())
    }

    fn name_loaded(&self, desc: &Descriptor, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return self.add_unnamed(desc);
        }
        for n in names {
            self.set_ref(n, desc)?;
        }
        Ok(())
    }

    /// Image manifests of a list of descriptors, following indexes one level.
    fn flatten_index(&self, entries: Vec<Descriptor>) -> Vec<Descriptor> {
        let mut out = Vec::new();
        for d in entries {
            if media_type::is_index(&d.media_type) {
                if let Ok(bytes) = self.read_blob(&d.digest) {
                    if let Ok((_, ParsedManifest::Index(i))) = oci::parse_manifest(&bytes, None) {
                        out.extend(
                            i.manifests
                                .into_iter()
                                .filter(|m| media_type::is_manifest(&m.media_type)),
                        );
                    }
                }
            } else {
                out.push(d);
            }
        }
        out
    }
}

/// What a loaded tar held, by normalised path.
#[derive(Default)]
struct ArchiveFiles {
    blobs: HashMap<String, Digest>,
    small: HashMap<String, Vec<u8>>,
    links: HashMap<String, String>,
}

impl ArchiveFiles {
    fn follow(&self, path: &str) -> String {
        let mut p = normalize(path);
        for _ in 0..16 {
            match self.links.get(&p) {
                Some(t) => p = t.clone(),
                None => break,
            }
        }
        p
    }

    fn bytes(
        &self,
        store: &Store,
        path: &str,
        err: &dyn Fn(String) -> StoreError,
    ) -> Result<Vec<u8>> {
        let p = self.follow(path);
        if let Some(b) = self.small.get(&p) {
            return Ok(b.clone());
        }
        match self.blobs.get(&p) {
            Some(d) => store.read_blob(d),
            None => Err(err(format!("it refers to {path}, which it does not contain"))),
        }
    }

    /// The file as a stored blob (storing it now if it was kept in memory).
    fn blob(
        &self,
        store: &Store,
        path: &str,
        err: &dyn Fn(String) -> StoreError,
    ) -> Result<Digest> {
        let p = self.follow(path);
        if let Some(d) = self.blobs.get(&p) {
            return Ok(d.clone());
        }
        match self.small.get(&p) {
            Some(b) => store.put_blob_bytes(b, None),
            None => Err(err(format!("it refers to {path}, which it does not contain"))),
        }
    }
}

fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn join_relative(link: &str, target: &str) -> String {
    if target.starts_with('/') {
        return normalize(target);
    }
    let parent = link.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    normalize(&format!("{parent}/{target}"))
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Invalid {
        what: "archive metadata".to_string(),
        reason: e.to_string(),
    })
}

fn base_header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
    err_path: &Path,
) -> Result<()> {
    let mut h = base_header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
    tar.append_data(&mut h, path, bytes).map_err(io_err("write", err_path))
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str, err_path: &Path) -> Result<()> {
    let mut h = base_header(tar::EntryType::Directory, 0, 0o755);
    tar.append_data(&mut h, path, io::empty()).map_err(io_err("write", err_path))
}

fn append_file<W: Write>(tar: &mut tar::Builder<W>, path: &str, f: File, src: &Path) -> Result<()> {
    let size = f.metadata().map_err(io_err("stat", src))?.len();
    let mut h = base_header(tar::EntryType::Regular, size, 0o644);
    tar.append_data(&mut h, path, BufReader::new(f)).map_err(io_err("read", src))
}
