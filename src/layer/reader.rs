//! A streaming tar reader for untrusted archives: ustar, PAX (local records), GNU long
//! names. Extension headers are size-capped, numeric fields and checksums verified, and
//! every error says where in the archive it happened.

use std::io::{self, Read};

use super::format::{self, typeflag, BLOCK};
use super::LayerError;

/// Largest PAX or GNU long-name header accepted. Real ones are a few hundred bytes (a
/// path, some xattrs); anything near this is an attempt to exhaust memory.
pub(crate) const MAX_EXTENSION_SIZE: u64 = 1024 * 1024;

/// The kinds of entries extraction handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub devmajor: u64,
    pub devminor: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

pub(crate) struct TarReader<R> {
    inner: R,
    offset: u64,
    /// Unread data of the current entry, then its padding.
    data_left: u64,
    pad_left: u64,
    last: Option<String>,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R) -> TarReader<R> {
        TarReader { inner, offset: 0, data_left: 0, pad_left: 0, last: None, done: false }
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    fn corrupt(&self, offset: u64, reason: impl Into<String>) -> LayerError {
        LayerError::CorruptTar {
            offset,
            entry: self.last.clone(),
            in_entry: self.data_left + self.pad_left > 0,
            reason: reason.into(),
        }
    }

    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool, LayerError> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) if n == 0 => return Ok(false),
                Ok(0) => return Err(self.corrupt(self.offset + n as u64, "archive is truncated")),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LayerError::Read(e)),
            }
        }
        self.offset += buf.len() as u64;
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<(), LayerError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            if !self.read_exact_or_eof(&mut buf[..k])? {
                return Err(self.corrupt(self.offset, "archive is truncated"));
            }
            n -= k as u64;
        }
        Ok(())
    }

    /// Read the whole data of an extension header, refusing oversized ones.
    fn read_extension(&mut self, h: &format::RawHeader, at: u64) -> Result<Vec<u8>, LayerError> {
        if h.size > MAX_EXTENSION_SIZE {
            return Err(self.corrupt(
                at,
                format!(
                    "extension header of {} bytes exceeds the {} byte limit",
                    h.size, MAX_EXTENSION_SIZE
                ),
            ));
        }
        let mut data = vec![0u8; h.size as usize];
        if !self.read_exact_or_eof(&mut data)? {
            return Err(self.corrupt(self.offset, "archive is truncated"));
        }
        self.skip(padding(h.size))?;
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive. Any unread data of the
    /// previous entry is skipped.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Header>, LayerError> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.data_left + self.pad_left)?;
        self.data_left = 0;
        self.pad_left = 0;

        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let at = self.offset;
            let mut block = [0u8; BLOCK];
            if !self.read_exact_or_eof(&mut block)? {
                if !pax.is_empty() || long_name.is_some() || long_link.is_some() {
                    return Err(self.corrupt(at, "archive ends after an extension header"));
                }
                // No end-of-archive blocks: accepted, as GNU tar does, since the blob's
                // digest (not the tar framing) is what guarantees completeness.
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&c| c == 0) {
                // End of archive; the second zero block is optional in practice.
                self.done = true;
                return Ok(None);
            }
            let raw = format::decode_header(&block).map_err(|r| self.corrupt(at, r))?;
            match raw.typeflag {
                typeflag::PAX_LOCAL => {
                    let data = self.read_extension(&raw, at)?;
                    let records = format::parse_pax_records(&data)
                        .map_err(|r| self.corrupt(at, format!("bad PAX header: {r}")))?;
                    pax.extend(records);
                    continue;
                }
                typeflag::PAX_GLOBAL => {
                    // Global records (git archive's commit comment) do not describe files.
                    self.read_extension(&raw, at)?;
                    continue;
                }
                typeflag::GNU_LONGNAME => {
                    long_name = Some(trim_nul(self.read_extension(&raw, at)?));
                    continue;
                }
                typeflag::GNU_LONGLINK => {
                    long_link = Some(trim_nul(self.read_extension(&raw, at)?));
                    continue;
                }
                _ => {}
            }
            return self.finish_header(raw, at, pax, long_name, long_link).map(Some);
        }
    }

    fn finish_header(
        &mut self,
        raw: format::RawHeader,
        at: u64,
        pax: Vec<(String, Vec<u8>)>,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
    ) -> Result<Header, LayerError> {
        let mut h = Header {
            path: long_name.unwrap_or(raw.name),
            link: long_link.unwrap_or(raw.linkname),
            kind: Kind::Regular,
            mode: raw.mode,
            uid: raw.uid,
            gid: raw.gid,
            size: raw.size,
            mtime: raw.mtime,
            devmajor: raw.devmajor,
            devminor: raw.devminor,
            xattrs: Vec::new(),
        };
        let shown = String::from_utf8_lossy(&h.path).into_owned();
        let bad = |_: &Self, reason: String| LayerError::CorruptTar {
            offset: at,
            entry: Some(shown.clone()),
            in_entry: true,
            reason,
        };
        for (key, value) in pax {
            let num = |v: &[u8]| -> Option<u64> { std::str::from_utf8(v).ok()?.parse().ok() };
            match key.as_str() {
                "path" => h.path = value,
                "linkpath" => h.link = value,
                "size" => {
                    h.size = num(&value).ok_or_else(|| bad(self, "invalid PAX size".into()))?
                }
                "uid" => h.uid = num(&value).ok_or_else(|| bad(self, "invalid PAX uid".into()))?,
                "gid" => h.gid = num(&value).ok_or_else(|| bad(self, "invalid PAX gid".into()))?,
                "mtime" => {
                    // Seconds with an optional fraction; the fraction is dropped.
                    let text = std::str::from_utf8(&value).unwrap_or("");
                    let secs = text.split('.').next().unwrap_or("");
                    h.mtime =
                        secs.parse().map_err(|_| bad(self, "invalid PAX mtime".to_string()))?;
                }
                k if k.starts_with("SCHILY.xattr.") => {
                    h.xattrs.push((k["SCHILY.xattr.".len()..].to_string(), value));
                }
                k if k.starts_with("GNU.sparse.") => {
                    return Err(bad(
                        self,
                        "sparse files (GNU PAX sparse format) are not supported".into(),
                    ));
                }
                // atime, ctime, uname, gname, charset, comments: not kept in layers.
                _ => {}
            }
        }
        if h.path.contains(&0) || h.link.contains(&0) {
            return Err(bad(self, "name contains a NUL byte".into()));
        }
        h.kind = match raw.typeflag {
            typeflag::REGULAR | typeflag::REGULAR_OLD | typeflag::CONTIGUOUS => {
                // Pre-POSIX archives mark directories only by the trailing slash.
                if h.path.ends_with(b"/") {
                    Kind::Dir
                } else {
                    Kind::Regular
                }
            }
            typeflag::HARDLINK => Kind::Hardlink,
            typeflag::SYMLINK => Kind::Symlink,
            typeflag::CHAR => Kind::Char,
            typeflag::BLOCK => Kind::Block,
            typeflag::DIR | typeflag::GNU_DUMPDIR => Kind::Dir,
            typeflag::FIFO => Kind::Fifo,
            typeflag::GNU_SPARSE => {
                return Err(bad(self, "GNU sparse files are not supported".into()))
            }
            typeflag::GNU_VOLUME => Kind::Dir,
            other => {
                return Err(bad(self, format!("unsupported entry type {:?}", char::from(other))))
            }
        };
        // Only regular files (and GNU dump dirs, whose listing we skip) carry data; the
        // size field of other types is informational, as in Go's archive/tar.
        let data = match (h.kind, raw.typeflag) {
            (Kind::Regular, _) | (_, typeflag::GNU_DUMPDIR) => h.size,
            _ => 0,
        };
        if h.kind != Kind::Regular {
            h.size = 0;
        }
        self.data_left = data;
        self.pad_left = padding(data);
        self.last = Some(shown);
        if raw.typeflag == typeflag::GNU_VOLUME {
            // A volume label is not a file: move on to the next entry.
            return self.next_entry().and_then(|n| {
                n.ok_or_else(|| self.corrupt(self.offset, "archive holds only a volume label"))
            });
        }
        Ok(h)
    }

    /// Read data of the current entry.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, LayerError> {
        if self.data_left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.data_left).unwrap_or(usize::MAX));
        loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(self.corrupt(self.offset, "archive is truncated")),
                Ok(n) => {
                    self.offset += n as u64;
                    self.data_left -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LayerError::Read(e)),
            }
        }
    }
}

/// Whether `first_block` (the first 512 bytes of an uncompressed stream) is a tar header
/// with a valid checksum: how `ADD` tells an archive to unpack from a file to copy, as
/// docker does after decompressing.
pub fn looks_like_tar(first_block: &[u8]) -> bool {
    let Ok(block) = <&[u8; BLOCK]>::try_from(first_block) else {
        return false;
    };
    !block.iter().all(|&c| c == 0) && format::decode_header(block).is_ok()
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{write_tar, Epoch, LayerEntry};

    fn read_all(tar: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, LayerError> {
        let mut r = TarReader::new(tar);
        let mut out = Vec::new();
        while let Some(h) = r.next_entry()? {
            let mut data = Vec::new();
            let mut buf = [0u8; 100];
            loop {
                let n = r.read_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((h, data));
        }
        Ok(out)
    }

    #[test]
    fn reads_what_the_writer_writes_including_pax() {
        let long = format!("{}/file", "d".repeat(300));
        let mut tar = Vec::new();
        write_tar(
            vec![
                LayerEntry::bytes(&long, "content")
                    .with_owner(5_000_000, 3)
                    .with_xattr("user.a", "b"),
                LayerEntry::symlink("s", "x".repeat(150)),
                LayerEntry::dir("d"),
            ],
            Epoch::Clamp(100),
            &mut tar,
        )
        .unwrap();
        let got = read_all(&tar).unwrap();
        assert_eq!(got.len(), 3);
        let (h, data) = &got[1];
        assert_eq!(h.path, long.as_bytes());
        assert_eq!((h.kind, h.uid, h.gid, h.mtime), (Kind::Regular, 5_000_000, 3, 100));
        assert_eq!(h.xattrs, vec![("user.a".to_string(), b"b".to_vec())]);
        assert_eq!(data, b"content");
        assert_eq!(got[0].0.kind, Kind::Dir);
        assert_eq!(got[2].0.link, "x".repeat(150).as_bytes());
    }

    #[test]
    fn oversized_extension_header_is_refused_before_allocating() {
        let block = format::encode_ustar(&format::UstarFields {
            name: b"PaxHeaders/x",
            prefix: b"",
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: (1 << 33) - 1,
            mtime: 0,
            typeflag: typeflag::PAX_LOCAL,
            linkname: b"",
            devmajor: 0,
            devminor: 0,
        });
        let err = read_all(&block).unwrap_err().to_string();
        assert!(err.contains("exceeds"), "{err}");
    }

    #[test]
    fn truncated_data_is_an_error() {
        let mut tar = Vec::new();
        write_tar(vec![LayerEntry::bytes("f", vec![7u8; 2000])], Epoch::Clamp(0), &mut tar)
            .unwrap();
        let err = read_all(&tar[..1200]).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn tar_sniffing() {
        let mut tar = Vec::new();
        write_tar(vec![LayerEntry::bytes("a", "x")], Epoch::Clamp(0), &mut tar).unwrap();
        assert!(looks_like_tar(&tar[..512]));
        assert!(!looks_like_tar(&[0u8; 512]));
        assert!(!looks_like_tar(&[b'a'; 512]));
        assert!(!looks_like_tar(&tar[..100]));
    }
}
