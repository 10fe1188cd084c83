//! The tar on-disk format: ustar header blocks and PAX extended records, both ways.
//!
//! Written by hand rather than through the `tar` crate so that every byte of a layer is
//! decided here (determinism) and so that reading enforces limits on extension headers
//! (a hostile archive must not make us allocate gigabytes for a "file name").

pub(crate) const BLOCK: usize = 512;

/// Type flags of the ustar / PAX / GNU formats that ferry knows about.
pub(crate) mod typeflag {
    pub const REGULAR: u8 = b'0';
    pub const REGULAR_OLD: u8 = 0;
    pub const HARDLINK: u8 = b'1';
    pub const SYMLINK: u8 = b'2';
    pub const CHAR: u8 = b'3';
    pub const BLOCK: u8 = b'4';
    pub const DIR: u8 = b'5';
    pub const FIFO: u8 = b'6';
    pub const CONTIGUOUS: u8 = b'7';
    pub const PAX_LOCAL: u8 = b'x';
    pub const PAX_GLOBAL: u8 = b'g';
    pub const GNU_LONGNAME: u8 = b'L';
    pub const GNU_LONGLINK: u8 = b'K';
    pub const GNU_SPARSE: u8 = b'S';
    pub const GNU_DUMPDIR: u8 = b'D';
    pub const GNU_VOLUME: u8 = b'V';
}

// Field offsets and widths of a ustar header block.
const NAME: (usize, usize) = (0, 100);
const MODE: (usize, usize) = (100, 8);
const UID: (usize, usize) = (108, 8);
const GID: (usize, usize) = (116, 8);
const SIZE: (usize, usize) = (124, 12);
const MTIME: (usize, usize) = (136, 12);
const CHKSUM: (usize, usize) = (148, 8);
const TYPEFLAG: usize = 156;
const LINKNAME: (usize, usize) = (157, 100);
const MAGIC: (usize, usize) = (257, 6);
const VERSION: (usize, usize) = (263, 2);
const DEVMAJOR: (usize, usize) = (329, 8);
const DEVMINOR: (usize, usize) = (337, 8);
const PREFIX: (usize, usize) = (345, 155);

/// Largest value an octal field of `width` bytes holds (width - 1 digits and a NUL).
pub(crate) const fn octal_max(width: usize) -> u64 {
    (1u64 << (3 * (width as u32 - 1))) - 1
}

pub(crate) const MAX_SIZE_FIELD: u64 = octal_max(SIZE.1);
pub(crate) const MAX_ID_FIELD: u64 = octal_max(UID.1);
pub(crate) const MAX_MTIME_FIELD: u64 = octal_max(MTIME.1);
pub(crate) const MAX_DEV_FIELD: u64 = octal_max(DEVMAJOR.1);
pub(crate) const NAME_LEN: usize = NAME.1;
pub(crate) const PREFIX_LEN: usize = PREFIX.1;
pub(crate) const LINKNAME_LEN: usize = LINKNAME.1;

/// The fields of one ustar header as ferry writes them. Values that do not fit are the
/// caller's business: it moves them into PAX records and passes zero here.
pub(crate) struct UstarFields<'a> {
    pub name: &'a [u8],
    pub prefix: &'a [u8],
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: u64,
    pub typeflag: u8,
    pub linkname: &'a [u8],
    pub devmajor: u64,
    pub devminor: u64,
}

/// Encode a POSIX ustar header block ("ustar\0" "00"), with empty uname/gname and the
/// checksum computed. Every field is written in full, so equal inputs give equal bytes.
pub(crate) fn encode_ustar(f: &UstarFields<'_>) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    put_bytes(&mut b, NAME, f.name);
    put_octal(&mut b, MODE, u64::from(f.mode));
    put_octal(&mut b, UID, f.uid);
    put_octal(&mut b, GID, f.gid);
    put_octal(&mut b, SIZE, f.size);
    put_octal(&mut b, MTIME, f.mtime);
    b[TYPEFLAG] = f.typeflag;
    put_bytes(&mut b, LINKNAME, f.linkname);
    put_bytes(&mut b, MAGIC, b"ustar\0");
    put_bytes(&mut b, VERSION, b"00");
    put_octal(&mut b, DEVMAJOR, f.devmajor);
    put_octal(&mut b, DEVMINOR, f.devminor);
    put_bytes(&mut b, PREFIX, f.prefix);
    let sum = checksum(&b);
    // Six octal digits, NUL, space: the traditional layout every reader accepts.
    let digits = format!("{sum:06o}");
    b[CHKSUM.0..CHKSUM.0 + 6].copy_from_slice(digits.as_bytes());
    b[CHKSUM.0 + 6] = 0;
    b[CHKSUM.0 + 7] = b' ';
    b
}

fn put_bytes(b: &mut [u8; BLOCK], (off, width): (usize, usize), value: &[u8]) {
    debug_assert!(value.len() <= width, "caller must fit the field");
    let n = value.len().min(width);
    b[off..off + n].copy_from_slice(&value[..n]);
}

fn put_octal(b: &mut [u8; BLOCK], (off, width): (usize, usize), value: u64) {
    debug_assert!(value <= octal_max(width), "caller must fit the field");
    let digits = format!("{:0w$o}", value.min(octal_max(width)), w = width - 1);
    b[off..off + width - 1].copy_from_slice(digits.as_bytes());
    b[off + width - 1] = 0;
}

/// Unsigned sum of the header bytes with the checksum field taken as spaces.
fn checksum(b: &[u8; BLOCK]) -> u64 {
    b.iter()
        .enumerate()
        .map(|(i, &c)| {
            if (CHKSUM.0..CHKSUM.0 + CHKSUM.1).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(c)
            }
        })
        .sum()
}

/// Historic writers summed signed chars; accept that too when reading.
fn checksum_signed(b: &[u8; BLOCK]) -> i64 {
    b.iter()
        .enumerate()
        .map(|(i, &c)| {
            if (CHKSUM.0..CHKSUM.0 + CHKSUM.1).contains(&i) {
                i64::from(b' ')
            } else {
                i64::from(c as i8)
            }
        })
        .sum()
}

/// Split a path into ustar (prefix, name) if it fits without PAX. Splits at the last
/// slash that leaves a name of at most 100 bytes, as Go's archive/tar does, so that a
/// path's header does not depend on anything but the path.
pub(crate) fn split_ustar_path(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.len() <= NAME_LEN {
        return Some((&[], path));
    }
    let mut limit = path.len().min(PREFIX_LEN + 1);
    // A trailing slash (directories) must stay with the name.
    if limit == path.len() && path[limit - 1] == b'/' {
        limit -= 1;
    }
    let i = path[..limit].iter().rposition(|&c| c == b'/')?;
    let (prefix, name) = (&path[..i], &path[i + 1..]);
    if i == 0 || name.is_empty() || name.len() > NAME_LEN || prefix.len() > PREFIX_LEN {
        return None;
    }
    Some((prefix, name))
}

/// Append one PAX record (`"<len> <key>=<value>\n"`, where len counts the whole record).
pub(crate) fn push_pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let body = key.len() + value.len() + 3; // space, '=', newline
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A decoded header block, before extension headers are applied.
#[derive(Debug, Clone)]
pub(crate) struct RawHeader {
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub typeflag: u8,
    pub linkname: Vec<u8>,
    pub devmajor: u64,
    pub devminor: u64,
}

/// Decode a header block, verifying its checksum and numeric fields. The error is a short
/// reason; the reader adds where in the archive it happened.
pub(crate) fn decode_header(b: &[u8; BLOCK]) -> Result<RawHeader, String> {
    let stored = parse_numeric(&b[CHKSUM.0..CHKSUM.0 + CHKSUM.1])
        .ok_or_else(|| "the header checksum field is not a number".to_string())?;
    if stored != checksum(b) as i64 && stored != checksum_signed(b) {
        return Err("header checksum mismatch (corrupt or not a tar archive)".into());
    }
    let field = |(off, width): (usize, usize)| &b[off..off + width];
    let num = |what: &str, f: (usize, usize)| {
        parse_numeric(field(f)).ok_or_else(|| format!("invalid {what} field"))
    };
    let unsigned = |what: &str, f: (usize, usize)| {
        let v = num(what, f)?;
        u64::try_from(v).map_err(|_| format!("negative {what} field"))
    };
    let magic = field(MAGIC);
    let is_posix = magic == b"ustar\0";
    let mut name = cstr(field(NAME)).to_vec();
    if is_posix {
        let prefix = cstr(field(PREFIX));
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let mode = unsigned("mode", MODE)?;
    Ok(RawHeader {
        name,
        mode: (mode & 0o7777) as u32,
        uid: unsigned("uid", UID)?,
        gid: unsigned("gid", GID)?,
        size: unsigned("size", SIZE)?,
        mtime: num("mtime", MTIME)?,
        typeflag: b[TYPEFLAG],
        linkname: cstr(field(LINKNAME)).to_vec(),
        devmajor: if is_posix || magic.starts_with(b"ustar") {
            unsigned("devmajor", DEVMAJOR)?
        } else {
            0
        },
        devminor: if is_posix || magic.starts_with(b"ustar") {
            unsigned("devminor", DEVMINOR)?
        } else {
            0
        },
    })
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    &field[..end]
}

/// Parse a numeric header field: octal text (space/NUL padded), or GNU base-256 when the
/// top bit of the first byte is set. `None` if it is neither.
pub(crate) fn parse_numeric(field: &[u8]) -> Option<i64> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            // Base-256, big-endian; a first byte of 0xff marks a negative two's complement.
            let mut acc: i128 = if first == 0xff { -1 } else { i128::from(first & 0x7f) };
            for &c in &field[1..] {
                acc = acc.checked_mul(256)?.checked_add(i128::from(c))?;
            }
            return i64::try_from(acc).ok();
        }
    }
    let pad = |c: &u8| *c == b' ' || *c == 0;
    let start = field.iter().position(|c| !pad(c)).unwrap_or(field.len());
    let text = &field[start..];
    let end = text.iter().position(pad).unwrap_or(text.len());
    let (digits, rest) = text.split_at(end);
    // After the digits only padding may follow.
    if !rest.iter().all(pad) {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(i64::from(c - b'0'))?;
    }
    Some(v)
}

/// Iterate over the records of a PAX extended header's data.
pub(crate) fn parse_pax_records(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        // Some writers pad the data with NULs; nothing after them is a record.
        if data[0] == 0 {
            break;
        }
        let space = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or_else(|| "PAX record without a length".to_string())?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "PAX record with an invalid length".to_string())?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("PAX record length does not match its content".into());
        }
        let record = &data[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|&c| c == b'=')
            .ok_or_else(|| "PAX record without '='".to_string())?;
        let key = std::str::from_utf8(&record[..eq])
            .map_err(|_| "PAX record key is not UTF-8".to_string())?;
        out.push((key.to_string(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(name: &'a [u8]) -> UstarFields<'a> {
        UstarFields {
            name,
            prefix: b"",
            mode: 0o755,
            uid: 1000,
            gid: 100,
            size: 12345,
            mtime: 1_700_000_000,
            typeflag: typeflag::REGULAR,
            linkname: b"",
            devmajor: 0,
            devminor: 0,
        }
    }

    #[test]
    fn header_round_trips_and_checksum_verifies() {
        let block = encode_ustar(&fields(b"usr/bin/tool"));
        let h = decode_header(&block).unwrap();
        assert_eq!(h.name, b"usr/bin/tool");
        assert_eq!(
            (h.mode, h.uid, h.gid, h.size, h.mtime),
            (0o755, 1000, 100, 12345, 1_700_000_000)
        );
        assert_eq!(&block[257..265], b"ustar\x0000");
        // uname and gname are empty.
        assert!(block[265..329].iter().all(|&c| c == 0));
    }

    #[test]
    fn corrupt_header_is_rejected() {
        let mut block = encode_ustar(&fields(b"a"));
        block[0] = b'b';
        assert!(decode_header(&block).unwrap_err().contains("checksum"));
    }

    #[test]
    fn ustar_split_uses_prefix_only_when_it_fits() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        let (p, n) = split_ustar_path(long.as_bytes()).unwrap();
        assert_eq!(p.len(), 120);
        assert_eq!(n.len(), 90);
        assert!(split_ustar_path("x".repeat(101).as_bytes()).is_none());
        let dir = format!("{}/{}/", "d".repeat(120), "e".repeat(99));
        let (p, n) = split_ustar_path(dir.as_bytes()).unwrap();
        assert_eq!((p.len(), n), (120, format!("{}/", "e".repeat(99)).as_bytes()));
        assert!(split_ustar_path(format!("{}/f", "d".repeat(200)).as_bytes()).is_none());
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for vlen in [0usize, 1, 5, 6, 7, 90, 95, 96, 97, 990, 995, 996] {
            let mut out = Vec::new();
            push_pax_record(&mut out, "path", &vec![b'a'; vlen]);
            let recs = parse_pax_records(&out).unwrap();
            assert_eq!(recs, vec![("path".to_string(), vec![b'a'; vlen])]);
        }
    }

    #[test]
    fn numeric_fields_parse_octal_and_base256() {
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"   644 \0"), Some(0o644));
        assert_eq!(parse_numeric(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_numeric(b"12x4\0"), None);
        assert_eq!(parse_numeric(b"0009\0"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[8..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_numeric(&big), Some(0xffff_ffff));
        let neg = [0xffu8; 12];
        assert_eq!(parse_numeric(&neg), Some(-1));
    }
}
