//! Compression formats: the ones layers are stored and pushed in, and the ones archives
//! arrive in (pulled layers, `ADD local.tar.*`), detected from their magic bytes.

use std::fmt;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Compression of a layer blob ferry writes; each has its OCI media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LayerCompression {
    None,
    Gzip,
    #[default]
    Zstd,
}

/// Fixed levels: the blob digest must not depend on anything but the tar.
const GZIP_LEVEL: u32 = 6;
const ZSTD_LEVEL: i32 = 3;

pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker's schema 2 layer type, found in pulled images; always gzip.
pub const MEDIA_TYPE_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

impl LayerCompression {
    /// The OCI media type of a layer blob in this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::None => MEDIA_TYPE_TAR,
            LayerCompression::Gzip => MEDIA_TYPE_TAR_GZIP,
            LayerCompression::Zstd => MEDIA_TYPE_TAR_ZSTD,
        }
    }

    /// The compression a layer media type (OCI or docker) says its blob is in.
    pub fn from_media_type(media_type: &str) -> Option<LayerCompression> {
        match media_type {
            MEDIA_TYPE_TAR | "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
                Some(LayerCompression::None)
            }
            MEDIA_TYPE_TAR_GZIP
            | MEDIA_TYPE_DOCKER_LAYER
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(LayerCompression::Gzip)
            }
            MEDIA_TYPE_TAR_ZSTD
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(LayerCompression::Zstd)
            }
            _ => None,
        }
    }
}

impl fmt::Display for LayerCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerCompression::None => "none",
            LayerCompression::Gzip => "gzip",
            LayerCompression::Zstd => "zstd",
        })
    }
}

/// Every compression an incoming archive may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Bzip2,
    Xz,
}

impl From<LayerCompression> for Compression {
    fn from(c: LayerCompression) -> Compression {
        match c {
            LayerCompression::None => Compression::None,
            LayerCompression::Gzip => Compression::Gzip,
            LayerCompression::Zstd => Compression::Zstd,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Xz => "xz",
        })
    }
}

/// Bytes needed to tell the formats apart.
pub const MAGIC_LEN: usize = 10;

/// Recognise a compression from the first bytes of a stream. The checks go beyond the
/// shortest magic (gzip's deflate method byte, bzip2's block magic) so that a plain tar
/// whose first file happens to be called `BZh...` is not mistaken for bzip2.
pub fn detect_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Compression::Xz
    } else if head.len() >= 10
        && head.starts_with(b"BZh")
        && (b'1'..=b'9').contains(&head[3])
        && (head[4..10] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]
            || head[4..10] == [0x17, 0x72, 0x45, 0x38, 0x50, 0x90])
    {
        // A block, or the end-of-stream marker of an empty stream.
        Compression::Bzip2
    } else {
        Compression::None
    }
}

/// A reader of the uncompressed bytes of an inner reader. It is `Send` when the inner
/// reader is.
pub struct Decompressor<R: Read> {
    decoder: Decoder<R>,
}

enum Decoder<R: Read> {
    None(R),
    Gzip(flate2::read::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<R>>),
    Bzip2(bzip2::read::MultiBzDecoder<R>),
    Xz(xz2::read::XzDecoder<R>),
}

impl<R: Read> Read for Decompressor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.decoder {
            Decoder::None(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
            Decoder::Bzip2(r) => r.read(buf),
            Decoder::Xz(r) => r.read(buf),
        }
    }
}

/// A reader of the uncompressed bytes of `inner`, which is in `compression`. Concatenated
/// members/frames/streams are all read, as `gzip -d` and friends do.
pub fn decompressing_reader<R: Read>(
    inner: R,
    compression: Compression,
) -> io::Result<Decompressor<R>> {
    crate::report::work::decompression_started();
    let decoder = match compression {
        Compression::None => Decoder::None(inner),
        Compression::Gzip => Decoder::Gzip(flate2::read::MultiGzDecoder::new(inner)),
        Compression::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::new(inner)?),
        Compression::Bzip2 => Decoder::Bzip2(bzip2::read::MultiBzDecoder::new(inner)),
        Compression::Xz => Decoder::Xz(xz2::read::XzDecoder::new_multi_decoder(inner)),
    };
    Ok(Decompressor { decoder })
}

/// A stream whose first bytes were read to detect its compression, then put back.
pub type Peeked<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// Detect the compression of `inner` from its first bytes and return it with a reader of
/// the uncompressed stream. Only the magic bytes are buffered.
pub fn decompress<R: Read>(mut inner: R) -> io::Result<(Compression, Decompressor<Peeked<R>>)> {
    let mut head = [0u8; MAGIC_LEN];
    let mut n = 0;
    while n < head.len() {
        match inner.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let compression = detect_compression(&head[..n]);
    let whole = io::Cursor::new(head[..n].to_vec()).chain(inner);
    Ok((compression, decompressing_reader(whole, compression)?))
}

/// The encoder stage of a layer sink.
pub(crate) enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub(crate) fn new(out: W, compression: LayerCompression) -> io::Result<Encoder<W>> {
        Ok(match compression {
            LayerCompression::None => Encoder::None(out),
            // GzBuilder's defaults are what determinism needs: mtime 0, no file name, no
            // comment, OS "unknown".
            LayerCompression::Gzip => Encoder::Gzip(
                flate2::GzBuilder::new().write(out, flate2::Compression::new(GZIP_LEVEL)),
            ),
            LayerCompression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
                // Single-threaded (no workers), no dictionary, and no pledged size: the
                // frame depends only on the input bytes. The checksum is itself a
                // function of the content and lets readers detect corruption.
                enc.include_checksum(true)?;
                enc.include_contentsize(false)?;
                Encoder::Zstd(enc)
            }
        })
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(data: &[u8], c: LayerCompression) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new(), c).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn detects_what_it_writes_and_round_trips() {
        let data = b"some tar bytes".repeat(1000);
        for c in [LayerCompression::None, LayerCompression::Gzip, LayerCompression::Zstd] {
            let blob = compress(&data, c);
            let (got, mut r) = decompress(&blob[..]).unwrap();
            assert_eq!(got, Compression::from(c));
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn detects_bzip2_and_xz() {
        let data = b"hello".repeat(100);
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz.write_all(&data).unwrap();
        let bz = bz.finish().unwrap();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&data).unwrap();
        let xz = xz.finish().unwrap();
        for (blob, want) in [(bz, Compression::Bzip2), (xz, Compression::Xz)] {
            let (got, mut r) = decompress(&blob[..]).unwrap();
            assert_eq!(got, want);
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn a_tar_named_like_a_magic_is_not_compressed() {
        let mut head = b"BZh9file".to_vec();
        head.resize(512, 0);
        assert_eq!(detect_compression(&head), Compression::None);
        assert_eq!(detect_compression(b""), Compression::None);
    }

    #[test]
    fn compressed_output_is_deterministic() {
        let data = b"abc".repeat(100_000);
        for c in [LayerCompression::Gzip, LayerCompression::Zstd] {
            assert_eq!(compress(&data, c), compress(&data, c));
        }
        let gz = compress(b"x", LayerCompression::Gzip);
        assert_eq!(&gz[3..10], &[0, 0, 0, 0, 0, 0, 255], "no flags, mtime 0, OS unknown");
    }

    #[test]
    fn media_types_round_trip() {
        for c in [LayerCompression::None, LayerCompression::Gzip, LayerCompression::Zstd] {
            assert_eq!(LayerCompression::from_media_type(c.media_type()), Some(c));
        }
        assert_eq!(
            LayerCompression::from_media_type(MEDIA_TYPE_DOCKER_LAYER),
            Some(LayerCompression::Gzip)
        );
    }

    #[test]
    fn decompressing_a_sendable_reader_is_sendable() {
        fn send<T: Send>(_: &T) {}
        let (_, r) = decompress(io::Cursor::new(vec![0u8; 10])).unwrap();
        send(&r);
    }
}
