//! Docker image references. (Being completed alongside the registry client.)

/// `host/path:tag@digest` → `host/path`, for matching a FROM word against repositories.
pub fn strip_tag_and_digest(reference: &str) -> &str {
    let without_digest = reference.split_once('@').map_or(reference, |(n, _)| n);
    match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    }
}
