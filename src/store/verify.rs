//! `cache verify`: re-hash every blob, and check that every named image has all its blobs.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File};
use std::io::Read;
use std::path::PathBuf;

use rayon::prelude::*;

use super::refs::ref_name;
use super::{io_err, Result, Store};
use crate::digest::{Digest, Hasher};

#[derive(Debug, Clone, serde::Serialize)]
pub struct CorruptBlob {
    /// The digest the blob is stored under.
    pub digest: Digest,
    /// What its content hashes to now, or why it could not be read.
    pub problem: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MissingBlob {
    /// The name (or digest of an unnamed entry) whose image needs the blob.
    pub image: String,
    pub digest: Digest,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: Vec<CorruptBlob>,
    pub missing: Vec<MissingBlob>,
    /// Files under blobs/sha256 that are not named by a digest.
    pub stray_files: Vec<PathBuf>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty()
    }
}

impl Store {
    /// Re-hash every blob (in parallel) and walk every image for missing blobs. Corrupt blobs
    /// are reported, not removed: the user decides (`ferry rmi` / `prune`, or pull again).
    pub fn verify(&self) -> Result<VerifyReport> {
        let dir = self.root.join("blobs/sha256");
        let mut files = Vec::new();
        let mut report = VerifyReport::default();
        for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let entry = entry.map_err(io_err("read", &dir))?;
            match format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>() {
                Ok(d) => files.push((d, entry.path())),
                Err(_) => report.stray_files.push(entry.path()),
            }
        }
        files.sort();
        let results: Vec<(Digest, HashResult)> =
            files.par_iter().map(|(d, path)| (d.clone(), hash_file(path))).collect();
        for (d, r) in results {
            report.blobs_checked += 1;
            match r {
                Ok((actual, size)) => {
                    report.bytes_checked += size;
                    if actual != d {
                        report.corrupt.push(CorruptBlob {
                            digest: d,
                            problem: format!("its content hashes to {actual}"),
                        });
                    }
                }
                Err(e) => report.corrupt.push(CorruptBlob { digest: d, problem: e }),
            }
        }
        for entry in self.read_index()?.manifests {
            let image =
                ref_name(&entry).map(str::to_string).unwrap_or_else(|| entry.digest.to_string());
            let mut queue = VecDeque::from([entry.digest.clone()]);
            let mut seen = HashSet::new();
            while let Some(d) = queue.pop_front() {
                if !seen.insert(d.clone()) {
                    continue;
                }
                if !self.has_blob(&d) {
                    report.missing.push(MissingBlob { image: image.clone(), digest: d });
                    continue;
                }
                queue.extend(self.children(&d)?);
            }
        }
        Ok(report)
    }
}

/// What a blob hashes to (and its size), or why it could not be read.
type HashResult = std::result::Result<(Digest, u64), String>;

fn hash_file(path: &std::path::Path) -> HashResult {
    let mut f = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("cannot read: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}
