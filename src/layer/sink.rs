//! One pass from tar bytes to a stored blob: hash the tar (diffID), compress, hash the
//! blob, write it on. Nothing is buffered beyond the compressor's window.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::compress::{decompressing_reader, Compression, Encoder, LayerCompression};
use super::entry::LayerEntry;
use super::writer::{write_tar, Epoch};
use super::LayerError;
use crate::digest::{Digest, HashingWriter};

/// What packing a layer produced: its identity (diffID, the digest of the tar) and the
/// blob that was written (digest and size of the compressed bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedLayer {
    /// sha256 of the uncompressed tar: the layer's identity in image configs.
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub size: u64,
    pub blob_digest: Digest,
    pub blob_size: u64,
    pub compression: LayerCompression,
    /// The OCI media type of the blob.
    pub media_type: String,
}

/// Options for packing a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    /// How the layer's mtimes are set: clamped to SOURCE_DATE_EPOCH, or kept.
    pub source_date_epoch: Epoch,
    pub compression: LayerCompression,
}

/// A `Write` that takes an uncompressed tar and passes it on, compressed, to `W`,
/// computing the diffID, the blob digest and both sizes on the way:
/// tar → hash → encoder → hash → `W`.
pub struct LayerSink<W: Write> {
    chain: HashingWriter<Encoder<HashingWriter<W>>>,
    compression: LayerCompression,
}

impl<W: Write> LayerSink<W> {
    pub fn new(out: W, compression: LayerCompression) -> Result<LayerSink<W>, LayerError> {
        let encoder =
            Encoder::new(HashingWriter::new(out), compression).map_err(LayerError::Write)?;
        Ok(LayerSink { chain: HashingWriter::new(encoder), compression })
    }

    /// Flush the compressor and return the digests with the writer (flushed). The caller
    /// commits the blob (e.g. renames its temp file) only after this succeeded.
    pub fn finish(self) -> Result<(PackedLayer, W), LayerError> {
        let (diff_id, size, encoder) = self.chain.finish();
        let blob = encoder.finish().map_err(LayerError::Write)?;
        let (blob_digest, blob_size, mut out) = blob.finish();
        out.flush().map_err(LayerError::Write)?;
        Ok((
            PackedLayer {
                diff_id,
                size,
                blob_digest,
                blob_size,
                compression: self.compression,
                media_type: self.compression.media_type().to_string(),
            },
            out,
        ))
    }
}

impl<W: Write> Write for LayerSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.chain.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.chain.flush()
    }
}

/// Write `entries` as a deterministic layer into `out`, compressed as asked.
pub fn pack_entries<W: Write>(
    entries: Vec<LayerEntry>,
    opts: &LayerOptions,
    out: W,
) -> Result<(PackedLayer, W), LayerError> {
    let mut sink = LayerSink::new(out, opts.compression)?;
    write_tar(entries, opts.source_date_epoch, &mut sink)?;
    sink.finish()
}

/// Re-encode a layer blob in another compression (e.g. derive the gzip blob for an old
/// registry from the stored zstd one), streaming. The uncompressed stream must hash to
/// `expected_diff_id`; otherwise the result is an error, and whatever was written to `out`
/// must be discarded by the caller.
pub fn recompress<R: Read, W: Write>(
    blob: R,
    from: Compression,
    to: LayerCompression,
    expected_diff_id: &Digest,
    out: W,
) -> Result<(PackedLayer, W), LayerError> {
    let mut tar = decompressing_reader(blob, from).map_err(LayerError::Read)?;
    let mut sink = LayerSink::new(out, to)?;
    copy_stream(&mut tar, &mut sink)?;
    let (packed, out) = sink.finish()?;
    if &packed.diff_id != expected_diff_id {
        return Err(LayerError::DiffIdMismatch {
            expected: expected_diff_id.clone(),
            actual: packed.diff_id,
        });
    }
    Ok((packed, out))
}

/// Copy with read and write errors told apart (a corrupt source blob is not a full disk).
fn copy_stream(from: &mut dyn Read, to: &mut dyn Write) -> Result<u64, LayerError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LayerError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(LayerError::Write)?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(compression: LayerCompression) -> LayerOptions {
        LayerOptions { source_date_epoch: Epoch::Clamp(0), compression }
    }

    #[test]
    fn digests_match_the_bytes_written() {
        let entries = vec![LayerEntry::bytes("a", "hello"), LayerEntry::dir("d")];
        let (plain, tar) =
            pack_entries(entries.clone(), &opts(LayerCompression::None), Vec::new()).unwrap();
        assert_eq!(plain.diff_id, Digest::of(&tar));
        assert_eq!(plain.diff_id, plain.blob_digest);
        assert_eq!(plain.size, tar.len() as u64);
        for c in [LayerCompression::Gzip, LayerCompression::Zstd] {
            let (p, blob) = pack_entries(entries.clone(), &opts(c), Vec::new()).unwrap();
            assert_eq!(p.diff_id, plain.diff_id, "the diffID does not depend on compression");
            assert_eq!(p.size, plain.size);
            assert_eq!(p.blob_digest, Digest::of(&blob));
            assert_eq!(p.blob_size, blob.len() as u64);
            assert_eq!(p.media_type, c.media_type());
        }
    }

    #[test]
    fn recompress_derives_the_same_blob_as_packing_directly() {
        let entries = vec![LayerEntry::bytes("f", "x".repeat(100_000))];
        let (z, zblob) =
            pack_entries(entries.clone(), &opts(LayerCompression::Zstd), Vec::new()).unwrap();
        let (g, gblob) = pack_entries(entries, &opts(LayerCompression::Gzip), Vec::new()).unwrap();
        let (r, rblob) = recompress(
            &zblob[..],
            Compression::Zstd,
            LayerCompression::Gzip,
            &z.diff_id,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(r, g);
        assert_eq!(rblob, gblob);
    }

    #[test]
    fn recompress_refuses_a_blob_with_another_diff_id() {
        let (_, zblob) =
            pack_entries(vec![LayerEntry::dir("d")], &opts(LayerCompression::Zstd), Vec::new())
                .unwrap();
        let wrong = Digest::of(b"something else");
        let err =
            recompress(&zblob[..], Compression::Zstd, LayerCompression::Gzip, &wrong, Vec::new())
                .unwrap_err();
        assert!(matches!(err, LayerError::DiffIdMismatch { .. }), "{err}");
    }

    #[test]
    fn recompress_reports_a_corrupt_source_as_a_read_error() {
        let (p, mut zblob) = pack_entries(
            vec![LayerEntry::bytes("f", "y".repeat(10_000))],
            &opts(LayerCompression::Zstd),
            Vec::new(),
        )
        .unwrap();
        let n = zblob.len();
        zblob.truncate(n - 6);
        let err = recompress(
            &zblob[..],
            Compression::Zstd,
            LayerCompression::Gzip,
            &p.diff_id,
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, LayerError::Read(_)), "{err}");
    }
}
