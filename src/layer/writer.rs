//! Deterministic tar writing: validate, order and emit a layer's entries.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;

use super::entry::{EntryKind, LayerEntry};
use super::format::{self, typeflag, UstarFields, BLOCK};
use super::path::{self, OPAQUE_MARKER, WHITEOUT_PREFIX};
use super::LayerError;

/// Copy buffer for host file contents; large enough that per-call overhead vanishes,
/// small enough not to matter for memory.
const COPY_BUF: usize = 256 * 1024;

/// The timestamps of a build: its SOURCE_DATE_EPOCH, or none and the time the build started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epoch {
    /// SOURCE_DATE_EPOCH (seconds since 1970): a later mtime is clamped to it (BuildKit's
    /// rewrite-timestamp), an entry without an mtime of its own gets it, and so do the
    /// config's `created` and history.
    Clamp(i64),
    /// No epoch, as docker builds without SOURCE_DATE_EPOCH: mtimes are kept as they are;
    /// an entry without one (a directory the build creates) gets `now`, the build's start
    /// (seconds since 1970), as do `created` and history.
    Unset { now: i64 },
}

impl Epoch {
    /// The mtime an entry whose own is `mtime` is written with.
    pub fn mtime(self, mtime: Option<i64>) -> i64 {
        match (self, mtime) {
            (Epoch::Clamp(epoch), Some(m)) => m.min(epoch),
            (Epoch::Clamp(epoch), None) => epoch,
            (Epoch::Unset { now }, m) => m.unwrap_or(now),
        }
    }

    /// The time of things the build creates: the epoch, else the build's start.
    pub fn created(self) -> i64 {
        match self {
            Epoch::Clamp(epoch) => epoch,
            Epoch::Unset { now } => now,
        }
    }

    /// The epoch mtimes are clamped to, if any.
    pub fn clamp(self) -> Option<i64> {
        match self {
            Epoch::Clamp(epoch) => Some(epoch),
            Epoch::Unset { .. } => None,
        }
    }
}

/// Write `entries` as one uncompressed tar stream to `out`, in the canonical order, with
/// mtimes as `epoch` says (see [`Epoch::mtime`]). Equal entries (and equal host file
/// contents) give byte-identical output whatever their order in `entries`.
///
/// Entries are checked first, before anything is written: a path given twice, a path
/// that is both whited-out and present, an entry below a non-directory or below a
/// whiteout, a hard link whose target is not a regular file of this layer, and names that
/// use the reserved `.wh.` prefix are all errors naming the path.
pub fn write_tar<W: Write>(
    entries: Vec<LayerEntry>,
    epoch: Epoch,
    out: &mut W,
) -> Result<(), LayerError> {
    let plan = Plan::new(&entries)?;
    let mut buf = vec![0u8; COPY_BUF];
    let mut em = Emitter { out, epoch };
    for &i in &plan.order {
        let tar_path = &plan.tar_paths[i];
        match plan.link_role(i) {
            Some(LinkRole::Carrier { root }) => {
                em.regular_file(tar_path, &entries[root], &entries[i].path, &mut buf)?
            }
            Some(LinkRole::Link { root, carrier }) => {
                let e = &entries[root];
                em.header(tar_path, typeflag::HARDLINK, e, 0, &plan.tar_paths[carrier], (0, 0))?
            }
            None => {
                let e = &entries[i];
                match &e.kind {
                    EntryKind::HostFile(_) | EntryKind::Bytes(_) => {
                        em.regular_file(tar_path, e, &e.path, &mut buf)?
                    }
                    EntryKind::Dir => {
                        let mut name = tar_path.clone();
                        name.push(b'/');
                        em.header(&name, typeflag::DIR, e, 0, b"", (0, 0))?
                    }
                    EntryKind::Symlink { target } => em.header(
                        tar_path,
                        typeflag::SYMLINK,
                        e,
                        0,
                        target.as_os_str().as_bytes(),
                        (0, 0),
                    )?,
                    EntryKind::CharDevice { major, minor } => {
                        em.header(tar_path, typeflag::CHAR, e, 0, b"", (*major, *minor))?
                    }
                    EntryKind::BlockDevice { major, minor } => {
                        em.header(tar_path, typeflag::BLOCK, e, 0, b"", (*major, *minor))?
                    }
                    EntryKind::Fifo => em.header(tar_path, typeflag::FIFO, e, 0, b"", (0, 0))?,
                    // Whiteouts are empty regular files under their special names.
                    EntryKind::Whiteout | EntryKind::OpaqueWhiteout => {
                        em.header(tar_path, typeflag::REGULAR, e, 0, b"", (0, 0))?
                    }
                    EntryKind::Hardlink { .. } => {
                        unreachable!("every hard link belongs to a link group")
                    }
                }
            }
        }
    }
    // End of archive: two zero blocks, no further blocking-factor padding.
    em.out.write_all(&[0u8; 2 * BLOCK]).map_err(LayerError::Write)?;
    Ok(())
}

enum LinkRole {
    /// This entry carries the file's data; the others of its group link to it.
    Carrier {
        root: usize,
    },
    Link {
        root: usize,
        carrier: usize,
    },
}

/// The validated layout of a layer: names in the tar, order, and hard-link groups.
struct Plan {
    tar_paths: Vec<Vec<u8>>,
    order: Vec<usize>,
    /// Entry index → (root file index, carrier index) for members of a link group.
    links: HashMap<usize, (usize, usize)>,
}

impl Plan {
    fn new(entries: &[LayerEntry]) -> Result<Plan, LayerError> {
        let shown = |e: &LayerEntry| e.path.display().to_string();
        let bad = |e: &LayerEntry, reason: &str| LayerError::Entry {
            path: shown(e),
            reason: reason.to_string(),
        };

        let mut norms = Vec::with_capacity(entries.len());
        let mut tar_paths = Vec::with_capacity(entries.len());
        for e in entries {
            let norm = path::normalize(e.path.as_os_str().as_bytes()).map_err(|r| bad(e, r))?;
            if norm.is_empty() {
                return Err(bad(e, "is the image root, which a layer cannot carry as an entry"));
            }
            if norm.split(|&c| c == b'/').any(|c| c.starts_with(WHITEOUT_PREFIX)) {
                return Err(bad(e, "uses the `.wh.` prefix, which layers reserve for whiteouts"));
            }
            for name in e.xattrs.keys() {
                if name.is_empty() || name.contains(['=', '\0']) {
                    return Err(bad(e, &format!("has an invalid xattr name {name:?}")));
                }
            }
            let tar_path = match e.kind {
                EntryKind::Whiteout => {
                    let (parent, name) = path::split_last(&norm);
                    path::join(parent, &[WHITEOUT_PREFIX, name].concat())
                }
                EntryKind::OpaqueWhiteout => path::join(&norm, OPAQUE_MARKER),
                _ => norm.clone(),
            };
            norms.push(norm);
            tar_paths.push(tar_path);
        }

        let mut by_tar_path: HashSet<&[u8]> = HashSet::new();
        let mut present: HashMap<&[u8], usize> = HashMap::new();
        let mut deleted: HashSet<&[u8]> = HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            if !by_tar_path.insert(&tar_paths[i]) {
                return Err(bad(e, "appears more than once in the layer"));
            }
            match e.kind {
                EntryKind::Whiteout => {
                    deleted.insert(&norms[i]);
                }
                EntryKind::OpaqueWhiteout => {}
                _ => {
                    present.insert(&norms[i], i);
                }
            }
        }
        for (i, e) in entries.iter().enumerate() {
            let norm = &norms[i][..];
            if matches!(e.kind, EntryKind::Whiteout) && present.contains_key(norm) {
                return Err(bad(e, "is both deleted (whiteout) and present in the layer"));
            }
            if matches!(e.kind, EntryKind::OpaqueWhiteout) {
                if let Some(&j) = present.get(norm) {
                    if entries[j].kind != EntryKind::Dir {
                        return Err(bad(e, "is marked opaque but is not a directory"));
                    }
                }
            }
            for anc in path::ancestors(norm) {
                if deleted.contains(anc) {
                    return Err(bad(
                        e,
                        &format!("lies below `{}`, which the layer deletes", lossy(anc)),
                    ));
                }
                if let Some(&j) = present.get(anc) {
                    if entries[j].kind != EntryKind::Dir {
                        return Err(bad(
                            e,
                            &format!("lies below `{}`, which is not a directory", lossy(anc)),
                        ));
                    }
                }
            }
        }

        // Resolve hard links to the regular file they name, following chains.
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let EntryKind::Hardlink { target } = &e.kind else { continue };
            let mut t = path::normalize(target.as_os_str().as_bytes()).map_err(|r| {
                bad(e, &format!("has a hard link target `{}` that {r}", target.display()))
            })?;
            let mut hops = 0;
            let root = loop {
                let Some(&j) = present.get(&t[..]) else {
                    return Err(bad(
                        e,
                        &format!("is a hard link to `{}`, which is not in this layer", lossy(&t)),
                    ));
                };
                match &entries[j].kind {
                    EntryKind::Hardlink { target } if hops < entries.len() => {
                        hops += 1;
                        t = path::normalize(target.as_os_str().as_bytes())
                            .map_err(|r| bad(&entries[j], r))?;
                    }
                    EntryKind::Hardlink { .. } => {
                        return Err(bad(e, "is part of a cycle of hard links"));
                    }
                    EntryKind::HostFile(_) | EntryKind::Bytes(_) => break j,
                    _ => {
                        return Err(bad(
                            e,
                            &format!(
                                "is a hard link to `{}`, which is not a regular file",
                                lossy(&t)
                            ),
                        ))
                    }
                }
            };
            groups.entry(root).or_insert_with(|| vec![root]).push(i);
        }

        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by(|&a, &b| path::compare(&tar_paths[a], &tar_paths[b]));

        // The first name of a link group in the tar carries the data: readers need the
        // target of a hard link to exist before the link.
        let mut links = HashMap::new();
        for (root, members) in groups {
            let carrier = members
                .iter()
                .copied()
                .min_by(|&a, &b| path::compare(&tar_paths[a], &tar_paths[b]))
                .unwrap_or(root);
            for m in members {
                links.insert(m, (root, carrier));
            }
        }
        Ok(Plan { tar_paths, order, links })
    }

    fn link_role(&self, i: usize) -> Option<LinkRole> {
        let &(root, carrier) = self.links.get(&i)?;
        Some(if i == carrier {
            LinkRole::Carrier { root }
        } else {
            LinkRole::Link { root, carrier }
        })
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Emitter<'w, W> {
    out: &'w mut W,
    epoch: Epoch,
}

impl<W: Write> Emitter<'_, W> {
    /// A regular file at `tar_path` with the content and metadata of `e`; `shown` names
    /// the entry in errors.
    fn regular_file(
        &mut self,
        tar_path: &[u8],
        e: &LayerEntry,
        shown: &std::path::Path,
        buf: &mut [u8],
    ) -> Result<(), LayerError> {
        match &e.kind {
            EntryKind::Bytes(content) => {
                self.header(tar_path, typeflag::REGULAR, e, content.len() as u64, b"", (0, 0))?;
                self.out.write_all(content).map_err(LayerError::Write)?;
                self.pad(content.len() as u64)
            }
            EntryKind::HostFile(host) => {
                let herr = |source| LayerError::HostFile { path: host.clone(), source };
                // O_NOFOLLOW: the entry says "regular file"; a symlink swapped in since the
                // context was scanned must not be read through.
                let mut file = File::options()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(host)
                    .map_err(herr)?;
                let meta = file.metadata().map_err(herr)?;
                if !meta.is_file() {
                    return Err(LayerError::Entry {
                        path: shown.display().to_string(),
                        reason: format!("host file `{}` is not a regular file", host.display()),
                    });
                }
                let size = meta.len();
                self.header(tar_path, typeflag::REGULAR, e, size, b"", (0, 0))?;
                let mut left = size;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = match file.read(&mut buf[..want]) {
                        Ok(0) => return Err(LayerError::HostFileChanged { path: host.clone() }),
                        Ok(n) => n,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(err) => return Err(herr(err)),
                    };
                    self.out.write_all(&buf[..n]).map_err(LayerError::Write)?;
                    left -= n as u64;
                }
                // A file that grew while being packed would leave the layer disagreeing
                // with what the cache key was computed from.
                if file.read(&mut buf[..1]).map_err(herr)? != 0 {
                    return Err(LayerError::HostFileChanged { path: host.clone() });
                }
                self.pad(size)
            }
            _ => unreachable!("regular_file is only called for regular files"),
        }
    }

    fn pad(&mut self, size: u64) -> Result<(), LayerError> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem]).map_err(LayerError::Write)?;
        }
        Ok(())
    }

    /// Write the header of one entry, preceded by a PAX header when some value does not
    /// fit ustar (long names, large sizes or ids, out-of-range mtimes) or xattrs exist.
    fn header(
        &mut self,
        name: &[u8],
        flag: u8,
        e: &LayerEntry,
        size: u64,
        linkname: &[u8],
        (major, minor): (u32, u32),
    ) -> Result<(), LayerError> {
        let mtime = self.epoch.mtime(e.mtime);
        let mut pax = Vec::new();
        let mut binary = false;

        let (prefix, short_name) = match format::split_ustar_path(name) {
            Some(split) => split,
            None => {
                format::push_pax_record(&mut pax, "path", name);
                binary |= std::str::from_utf8(name).is_err();
                (&b""[..], &name[..name.len().min(format::NAME_LEN)])
            }
        };
        let short_link = if linkname.len() > format::LINKNAME_LEN {
            format::push_pax_record(&mut pax, "linkpath", linkname);
            binary |= std::str::from_utf8(linkname).is_err();
            &linkname[..format::LINKNAME_LEN]
        } else {
            linkname
        };
        let fit = |v: u64, max: u64, key: &str, pax: &mut Vec<u8>| {
            if v > max {
                format::push_pax_record(pax, key, v.to_string().as_bytes());
                0
            } else {
                v
            }
        };
        let size_field = fit(size, format::MAX_SIZE_FIELD, "size", &mut pax);
        let uid = fit(u64::from(e.uid), format::MAX_ID_FIELD, "uid", &mut pax);
        let gid = fit(u64::from(e.gid), format::MAX_ID_FIELD, "gid", &mut pax);
        let mtime_field = match u64::try_from(mtime) {
            Ok(m) if m <= format::MAX_MTIME_FIELD => m,
            _ => {
                format::push_pax_record(&mut pax, "mtime", mtime.to_string().as_bytes());
                0
            }
        };
        if u64::from(major) > format::MAX_DEV_FIELD || u64::from(minor) > format::MAX_DEV_FIELD {
            return Err(LayerError::Entry {
                path: e.path.display().to_string(),
                reason: format!("device number {major}:{minor} does not fit a tar header"),
            });
        }
        for (k, v) in &e.xattrs {
            format::push_pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
        }
        if binary {
            // The PAX default charset is UTF-8; say so when a name is raw bytes.
            format::push_pax_record(&mut pax, "hdrcharset", b"BINARY");
        }

        if !pax.is_empty() {
            let base = path::split_last(name.strip_suffix(b"/").unwrap_or(name)).1;
            let mut pax_name = b"PaxHeaders/".to_vec();
            pax_name.extend_from_slice(base);
            pax_name.truncate(format::NAME_LEN);
            let block = format::encode_ustar(&UstarFields {
                name: &pax_name,
                prefix: b"",
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: pax.len() as u64,
                mtime: mtime_field,
                typeflag: typeflag::PAX_LOCAL,
                linkname: b"",
                devmajor: 0,
                devminor: 0,
            });
            self.out.write_all(&block).map_err(LayerError::Write)?;
            self.out.write_all(&pax).map_err(LayerError::Write)?;
            self.pad(pax.len() as u64)?;
        }
        let block = format::encode_ustar(&UstarFields {
            name: short_name,
            prefix,
            mode: e.mode & 0o7777,
            uid,
            gid,
            size: size_field,
            mtime: mtime_field,
            typeflag: flag,
            linkname: short_link,
            devmajor: u64::from(major),
            devminor: u64::from(minor),
        });
        self.out.write_all(&block).map_err(LayerError::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: Vec<LayerEntry>) -> Vec<u8> {
        let mut out = Vec::new();
        write_tar(entries, Epoch::Clamp(1000), &mut out).unwrap();
        out
    }

    fn names(tar: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                String::from_utf8(e.path_bytes().into_owned()).unwrap()
            })
            .collect()
    }

    #[test]
    fn entries_are_sorted_and_output_is_independent_of_input_order() {
        let a = vec![
            LayerEntry::bytes("b/x", "1"),
            LayerEntry::dir("b"),
            LayerEntry::dir("a"),
            LayerEntry::bytes("a-b", "2"),
            LayerEntry::whiteout("a/gone"),
        ];
        let mut b = a.clone();
        b.reverse();
        let ta = tar_of(a);
        assert_eq!(ta, tar_of(b));
        assert_eq!(names(&ta), vec!["a/", "a/.wh.gone", "a-b", "b/", "b/x"]);
    }

    fn mtimes(epoch: Epoch) -> Vec<u64> {
        let mut t = Vec::new();
        let entries = vec![
            LayerEntry::bytes("new", "").with_mtime(5000),
            LayerEntry::bytes("old", "").with_mtime(10),
            LayerEntry::bytes("unset", ""),
            LayerEntry::dir("zero").with_mtime(0),
        ];
        write_tar(entries, epoch, &mut t).unwrap();
        let mut a = tar::Archive::new(&t[..]);
        a.entries().unwrap().map(|e| e.unwrap().header().mtime().unwrap()).collect()
    }

    #[test]
    fn mtime_is_clamped_to_the_epoch() {
        // new, old, unset, zero: later mtimes clamp, earlier ones stay, no mtime is the epoch.
        assert_eq!(mtimes(Epoch::Clamp(1000)), vec![1000, 10, 1000, 0]);
        // An epoch of 0 is an explicit ask for 1970 everywhere.
        assert_eq!(mtimes(Epoch::Clamp(0)), vec![0, 0, 0, 0]);
    }

    #[test]
    fn without_an_epoch_mtimes_are_kept_and_unset_ones_are_the_build_time() {
        assert_eq!(mtimes(Epoch::Unset { now: 7000 }), vec![5000, 10, 7000, 0]);
        // `now` is no clamp: an mtime after the build's start stays.
        assert_eq!(mtimes(Epoch::Unset { now: 20 }), vec![5000, 10, 20, 0]);
    }

    #[test]
    fn epoch_gives_created_and_clamp() {
        assert_eq!((Epoch::Clamp(5).created(), Epoch::Clamp(5).clamp()), (5, Some(5)));
        let unset = Epoch::Unset { now: 9 };
        assert_eq!((unset.created(), unset.clamp()), (9, None));
    }

    #[test]
    fn invalid_layers_are_refused_naming_the_path() {
        let cases: Vec<(Vec<LayerEntry>, &str)> = vec![
            (vec![LayerEntry::bytes("a", ""), LayerEntry::bytes("/a", "")], "more than once"),
            (vec![LayerEntry::bytes("a", ""), LayerEntry::whiteout("a")], "both deleted"),
            (vec![LayerEntry::bytes("a", ""), LayerEntry::bytes("a/b", "")], "not a directory"),
            (vec![LayerEntry::whiteout("a"), LayerEntry::bytes("a/b", "")], "deletes"),
            (vec![LayerEntry::hardlink("l", "missing")], "not in this layer"),
            (vec![LayerEntry::dir("d"), LayerEntry::hardlink("l", "d")], "not a regular file"),
            (vec![LayerEntry::bytes("x/.wh.y", "")], "which layers reserve"),
            (vec![LayerEntry::bytes("../x", "")], "`..`"),
            (vec![LayerEntry::dir("/")], "image root"),
            (vec![LayerEntry::hardlink("a", "b"), LayerEntry::hardlink("b", "a")], "cycle"),
        ];
        for (entries, want) in cases {
            let err = write_tar(entries.clone(), Epoch::Clamp(0), &mut Vec::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{entries:?}: {err}");
        }
    }

    #[test]
    fn hard_link_data_goes_to_the_first_name_in_tar_order() {
        // The file is `z`, the link `a`: `a` comes first in the tar so it must carry the data.
        let t = tar_of(vec![LayerEntry::bytes("z", "data"), LayerEntry::hardlink("a", "/z")]);
        let mut ar = tar::Archive::new(&t[..]);
        let got: Vec<(String, u8, Vec<u8>)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                let link = e.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                let p = String::from_utf8(e.path_bytes().into_owned()).unwrap();
                (p, e.header().entry_type().as_byte(), [data, link].concat())
            })
            .collect();
        assert_eq!(
            got,
            vec![("a".into(), b'0', b"data".to_vec()), ("z".into(), b'1', b"a".to_vec())]
        );
    }

    #[test]
    fn pax_is_used_only_when_needed() {
        let plain = tar_of(vec![LayerEntry::bytes("short", "x").with_owner(1000, 1000)]);
        assert_eq!(plain.len(), 512 * 2 + 1024, "one header, one data block, end blocks");
        assert_eq!(plain[156], b'0');

        let long = format!("{}/{}", "d".repeat(200), "f");
        let t = tar_of(vec![LayerEntry::bytes(&long, "x")
            .with_owner(3_000_000, 7)
            .with_xattr("user.k", "v")]);
        assert_eq!(t[156], b'x');
        let mut ar = tar::Archive::new(&t[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path_bytes().as_ref(), long.as_bytes());
        assert_eq!(e.header().uid().unwrap(), 3_000_000);
        let exts: Vec<(String, Vec<u8>)> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.key().unwrap().to_string(), x.value_bytes().to_vec())
            })
            .collect();
        assert!(exts.contains(&("SCHILY.xattr.user.k".to_string(), b"v".to_vec())));
    }

    #[test]
    fn sizes_and_mtimes_beyond_ustar_go_to_pax() {
        let mut out = Vec::new();
        let e = LayerEntry::bytes("big", "").with_mtime(-5);
        let mut em = Emitter { out: &mut out, epoch: Epoch::Clamp(1000) };
        em.header(b"big", typeflag::REGULAR, &e, 9 << 30, b"", (0, 0)).unwrap();
        let mut r = crate::layer::reader::TarReader::new(&out[..]);
        let h = r.next_entry().unwrap().unwrap();
        assert_eq!((h.size, h.mtime), (9 << 30, -5));
        let records = format::parse_pax_records(&out[512..1024]).unwrap();
        let keys: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["size", "mtime"]);
    }
}
