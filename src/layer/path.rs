//! Paths inside a layer: normalisation, whiteout names and the canonical entry order.

use std::cmp::Ordering;

pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
pub(crate) const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Normalise a path inside the image to its relative, slash-separated form without empty
/// or `.` components (`/usr//bin/./x` → `usr/bin/x`). A leading `/` is dropped as docker
/// does. `..` is refused outright: no legitimate layer needs it and resolving it is how
/// archives escape their destination. The root itself yields an empty path.
pub(crate) fn normalize(path: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(path.len());
    for comp in path.split(|&c| c == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err("contains a `..` component"),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(comp);
            }
        }
    }
    Ok(out)
}

/// The (parent, final name) of a normalised, non-empty path.
pub(crate) fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

pub(crate) fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        out.extend_from_slice(parent);
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// Every proper ancestor of a normalised path, nearest last (`a/b/c` → `a`, `a/b`).
pub(crate) fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter().enumerate().filter(|(_, &c)| c == b'/').map(move |(i, _)| &path[..i])
}

/// The canonical order of entries in a layer: component by component (so a directory is
/// immediately followed by its contents), and within a directory the opaque marker first,
/// then names in byte order. The opaque marker leads so that a reader applying the layer
/// in one pass clears the lower contents before this layer's own files arrive.
pub(crate) fn compare(a: &[u8], b: &[u8]) -> Ordering {
    let mut ai = a.split(|&c| c == b'/');
    let mut bi = b.split(|&c| c == b'/');
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let ord = match (x == OPAQUE_MARKER, y == OPAQUE_MARKER) {
                    (true, true) => Ordering::Equal,
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                    (false, false) => x.cmp(y),
                };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_root_and_dots_and_refuses_dotdot() {
        assert_eq!(normalize(b"/usr//bin/./x/").unwrap(), b"usr/bin/x");
        assert_eq!(normalize(b"./a").unwrap(), b"a");
        assert_eq!(normalize(b"/").unwrap(), b"");
        assert!(normalize(b"a/../b").is_err());
        assert!(normalize(b"../etc/passwd").is_err());
    }

    #[test]
    fn order_keeps_directories_together_and_opaque_first() {
        let mut v: Vec<&[u8]> =
            vec![b"a/b", b"a-b", b"a", b"a/.wh..wh..opq", b"a/!x", b"a/.wh.c", b"b"];
        v.sort_by(|x, y| compare(x, y));
        let want: Vec<&[u8]> =
            vec![b"a", b"a/.wh..wh..opq", b"a/!x", b"a/.wh.c", b"a/b", b"a-b", b"b"];
        assert_eq!(v, want);
    }

    #[test]
    fn ancestors_lists_proper_prefixes() {
        let got: Vec<&[u8]> = ancestors(b"a/b/c").collect();
        assert_eq!(got, vec![b"a" as &[u8], b"a/b"]);
    }
}
