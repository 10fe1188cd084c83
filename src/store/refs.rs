//! Local names (refs), kept in the layout's `index.json` as descriptors annotated with
//! `org.opencontainers.image.ref.name`.
//!
//! Naming scheme: a pulled or loaded image is named by its full normalised reference
//! (`docker.io/library/alpine:3.19`, `127.0.0.1:5000/acme/api@sha256:…`); builds record
//! their own names (`api`, `acme/api:1.2.0`). A name is any string without whitespace or
//! control characters. skopeo (`oci:STORE:NAME`) and umoci (`--image STORE:NAME`) split
//! their argument at the first ':' (so the store path must not contain one) and then accept
//! names of the OCI grammar `component(/component)*` with components
//! `[A-Za-z0-9]+([-._:@+]|--)…`, which every normalised docker reference satisfies (the
//! tools' own tags like `1.0` too). Names outside that grammar work in ferry but are not
//! addressable by those tools.

use std::collections::BTreeMap;

use super::{io_err, Result, Store, StoreError};
use crate::digest::Digest;
use crate::oci::{media_type, Descriptor, ImageIndex, ANNOTATION_REF_NAME};

const NAME_MAX: usize = 1024;

fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(StoreError::InvalidRefName { name: name.to_string(), reason: reason.to_string() })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > NAME_MAX {
        return bad("it is too long");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("it contains whitespace or control characters");
    }
    Ok(())
}

impl Store {
    /// Read `index.json`. It is replaced atomically, so no lock is needed to read it.
    pub fn read_index(&self) -> Result<ImageIndex> {
        let path = self.index_path();
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Invalid {
            what: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    pub(super) fn write_index(&self, index: &ImageIndex) -> Result<()> {
        let mut index = index.clone();
        index.schema_version = 2;
        index.media_type = Some(media_type::OCI_INDEX.to_string());
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| StoreError::Invalid {
            what: "index.json".to_string(),
            reason: e.to_string(),
        })?;
        self.atomic_write(&self.index_path(), &bytes)
    }

    /// Change `index.json` under the `index` lock.
    pub(super) fn update_index<T>(
        &self,
        change: impl FnOnce(&mut ImageIndex) -> Result<T>,
    ) -> Result<T> {
        let _guard = self.lock("index")?;
        let mut index = self.read_index()?;
        let out = change(&mut index)?;
        self.write_index(&index)?;
        Ok(out)
    }

    /// Name `desc` (a manifest or index already in the store) `name`, replacing what the name
    /// pointed to before.
    pub fn set_ref(&self, name: &str, desc: &Descriptor) -> Result<()> {
        self.set_refs(&[(name.to_string(), desc.clone())])
    }

    /// Name several images in one update of `index.json`. Names that already point where
    /// asked are left alone, so a no-op build rewrites (and fsyncs) nothing.
    pub fn set_refs(&self, refs: &[(String, Descriptor)]) -> Result<()> {
        for (name, desc) in refs {
            validate_name(name)?;
            if !self.has_blob(&desc.digest) {
                return Err(StoreError::BlobNotFound { digest: desc.digest.clone() });
            }
        }
        let current = self.read_index()?;
        let unchanged = refs.iter().all(|(name, desc)| {
            current.manifests.iter().any(|m| {
                ref_name(m) == Some(name.as_str())
                    && m.digest == desc.digest
                    && m.media_type == desc.media_type
            })
        });
        if unchanged {
            return Ok(());
        }
        self.update_index(|index| {
            for (name, desc) in refs {
                let mut entry = desc.clone();
                entry.annotations.insert(ANNOTATION_REF_NAME.to_string(), name.to_string());
                index.manifests.retain(|m| ref_name(m) != Some(name.as_str()));
                index.manifests.push(entry);
            }
            Ok(())
        })?;
        for (name, desc) in refs {
            tracing::debug!(name, digest = %desc.digest, "set ref");
        }
        Ok(())
    }

    /// What `name` points to, with the ref-name annotation removed.
    pub fn get_ref(&self, name: &str) -> Result<Option<Descriptor>> {
        let index = self.read_index()?;
        Ok(index.manifests.into_iter().find(|m| ref_name(m) == Some(name)).map(strip_name))
    }

    /// Every named entry, sorted by name.
    pub fn list_refs(&self) -> Result<Vec<(String, Descriptor)>> {
        let index = self.read_index()?;
        let mut out: BTreeMap<String, Descriptor> = BTreeMap::new();
        for m in index.manifests {
            if let Some(name) = ref_name(&m).map(str::to_string) {
                out.insert(name, strip_name(m));
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Entries of `index.json` that have no name (written by other tools, or loaded from an
    /// archive without names). They keep their content alive until `prune`.
    pub fn unnamed_entries(&self) -> Result<Vec<Descriptor>> {
        Ok(self.read_index()?.manifests.into_iter().filter(|m| ref_name(m).is_none()).collect())
    }

    /// Add an unnamed entry (unless the digest already has one).
    pub fn add_unnamed(&self, desc: &Descriptor) -> Result<()> {
        if !self.has_blob(&desc.digest) {
            return Err(StoreError::BlobNotFound { digest: desc.digest.clone() });
        }
        self.update_index(|index| {
            if !index.manifests.iter().any(|m| m.digest == desc.digest && ref_name(m).is_none()) {
                let mut d = desc.clone();
                d.annotations.remove(ANNOTATION_REF_NAME);
                index.manifests.push(d);
            }
            Ok(())
        })
    }

    /// Remove a name; what it pointed to, if it existed. The content stays until pruned.
    pub fn remove_ref(&self, name: &str) -> Result<Option<Descriptor>> {
        self.update_index(|index| {
            let pos = index.manifests.iter().position(|m| ref_name(m) == Some(name));
            Ok(pos.map(|i| strip_name(index.manifests.remove(i))))
        })
    }

    /// Names pointing at `digest`.
    pub fn names_of(&self, digest: &Digest) -> Result<Vec<String>> {
        Ok(self
            .list_refs()?
            .into_iter()
            .filter(|(_, d)| d.digest == *digest)
            .map(|(n, _)| n)
            .collect())
    }
}

pub(super) fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str)
}

fn strip_name(mut d: Descriptor) -> Descriptor {
    d.annotations.remove(ANNOTATION_REF_NAME);
    d
}
