//! External base images: every FROM (or `--from`) that is not an image of the manifest is
//! pulled into the store (through mirrors) before the build and pinned by digest, so that
//! every image of one build starts from exactly the same base.

use std::collections::{BTreeMap, BTreeSet};

use crate::oci::Descriptor;
use crate::reference::Reference;
use crate::registry::{pull, PullOptions, Registry};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("base image `{reference}`: {message}")]
    Invalid { reference: String, message: String },
    #[error("base image `{reference}` cannot be pulled: {source}")]
    Pull { reference: String, source: Box<crate::registry::RegistryError> },
}

/// A base as the build uses it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PinnedBase {
    pub reference: String,
    /// The image manifest (for the build's platform).
    pub descriptor: Descriptor,
    /// Whether it was fetched by this build (false: the store had it).
    pub pulled: bool,
}

/// Make every base of `references` available in the store. A reference already in the store
/// is used as it is unless `pull` is set, or unless it has a digest the store lacks; one
/// without a registry to pull from must already be there.
pub fn ensure_bases(
    store: &Store,
    registry: Option<&dyn Registry>,
    references: &BTreeSet<String>,
    always_pull: bool,
) -> Result<BTreeMap<String, PinnedBase>, BaseError> {
    let mut pinned = BTreeMap::new();
    for word in references {
        let reference = Reference::parse(word)
            .map_err(|e| BaseError::Invalid { reference: word.clone(), message: e.to_string() })?;
        let local = if always_pull { None } else { store.resolve(word).ok() };
        let (descriptor, pulled) = match local {
            Some(resolved) => {
                let image = store.image(&resolved.descriptor).map_err(|e| BaseError::Invalid {
                    reference: word.clone(),
                    message: e.to_string(),
                })?;
                (image.descriptor.clone(), false)
            }
            None => {
                let Some(registry) = registry else {
                    return Err(BaseError::Invalid {
                        reference: word.clone(),
                        message: "it is not in the store and no registry is configured".into(),
                    });
                };
                let report =
                    pull(store, registry, &reference, &PullOptions::default()).map_err(|e| {
                        BaseError::Pull { reference: word.clone(), source: Box::new(e) }
                    })?;
                (report.descriptor, true)
            }
        };
        pinned.insert(word.clone(), PinnedBase { reference: word.clone(), descriptor, pulled });
    }
    Ok(pinned)
}
