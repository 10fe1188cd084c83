//! Cache keys, as BuildKit derives them: a step's key is a hash of its parent step's key and
//! everything the step depends on (the instruction after expansion, the variables it sees, a
//! content digest of what it reads). Fields are length-prefixed so no two different inputs
//! can serialise alike.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hasher};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CacheKey(pub Digest);

/// Bump when the meaning of a key changes (a new field, a new layer format), so old cache
/// entries are never reused for something they are not.
const KEY_VERSION: &str = "ferry-cache-v1";

impl CacheKey {
    /// The key of an empty filesystem (`FROM scratch`) for a platform, under `epoch`.
    ///
    /// Every stage's key starts from one of these two, so the epoch is part of every
    /// step's key: a layer packed under another epoch has other mtimes (and digest), and
    /// reusing it would make a warm build differ from a clean one.
    pub fn scratch(platform: &str, epoch: Option<i64>) -> CacheKey {
        KeyBuilder::root("scratch").field("platform", platform).epoch(epoch).finish()
    }

    /// The key of an image given by its manifest digest, under `epoch`.
    pub fn image(manifest_digest: &Digest, epoch: Option<i64>) -> CacheKey {
        KeyBuilder::root("image")
            .field("digest", &manifest_digest.to_string())
            .epoch(epoch)
            .finish()
    }

    /// A step on top of `self`.
    pub fn step(&self, kind: &str) -> KeyBuilder {
        KeyBuilder::root(kind).field("parent", &self.0.to_string())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.0)
    }
}

pub struct KeyBuilder {
    hasher: Hasher,
}

impl KeyBuilder {
    fn root(kind: &str) -> KeyBuilder {
        let mut b = KeyBuilder { hasher: Hasher::new() };
        b.put(KEY_VERSION.as_bytes());
        b.put(kind.as_bytes());
        b
    }

    fn put(&mut self, bytes: &[u8]) {
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    pub fn field(mut self, name: &str, value: &str) -> KeyBuilder {
        self.put(name.as_bytes());
        self.put(value.as_bytes());
        self
    }

    /// SOURCE_DATE_EPOCH, or none (mtimes kept as they are).
    fn epoch(self, epoch: Option<i64>) -> KeyBuilder {
        match epoch {
            Some(seconds) => self.field("epoch", &seconds.to_string()),
            None => self.field("epoch", "none"),
        }
    }

    pub fn list<'a>(mut self, name: &str, values: impl IntoIterator<Item = &'a str>) -> KeyBuilder {
        self.put(name.as_bytes());
        let values: Vec<&str> = values.into_iter().collect();
        self.put(&(values.len() as u64).to_le_bytes());
        for v in values {
            self.put(v.as_bytes());
        }
        self
    }

    pub fn finish(self) -> CacheKey {
        CacheKey(self.hasher.finish().0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_field_and_on_the_parent() {
        let base = CacheKey::scratch("linux/amd64", None);
        let a = base.step("run").field("argv", "echo a").finish();
        assert_eq!(a, base.step("run").field("argv", "echo a").finish());
        assert_ne!(a, base.step("run").field("argv", "echo b").finish());
        assert_ne!(a, base.step("copy").field("argv", "echo a").finish());
        assert_ne!(
            a,
            CacheKey::scratch("linux/arm64", None).step("run").field("argv", "echo a").finish()
        );
        // A layer packed under another epoch is another layer.
        assert_ne!(CacheKey::scratch("linux/amd64", Some(1)), base);
        assert_ne!(
            CacheKey::scratch("linux/amd64", Some(1)),
            CacheKey::scratch("linux/amd64", Some(2))
        );
        let image = Digest::of(b"manifest");
        assert_ne!(CacheKey::image(&image, Some(1)), CacheKey::image(&image, None));
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        assert_ne!(
            base.step("x").field("ab", "c").finish(),
            base.step("x").field("a", "bc").finish()
        );
        assert_ne!(
            base.step("x").list("l", ["a", "b"]).finish(),
            base.step("x").list("l", ["ab"]).finish()
        );
    }
}
