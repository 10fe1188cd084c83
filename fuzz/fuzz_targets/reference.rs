//! Image references: parsing never panics, and every name a parsed reference prints parses
//! back to the same image.
#![no_main]

use ferry::reference::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(r) = Reference::parse(text) else { return };
    for printed in [r.store_name(), r.familiar(), r.to_string()] {
        let again = Reference::parse(&printed).unwrap_or_else(|e| {
            panic!("{text:?} parsed, but its printed form {printed:?} does not: {e}")
        });
        assert_eq!(again.repository, r.repository, "{text:?} → {printed:?}");
        assert_eq!(again.digest, r.digest, "{text:?} → {printed:?}");
        if r.digest.is_none() {
            assert_eq!(again.tag, r.tag, "{text:?} → {printed:?}");
        }
    }
    let _ = r.manifest_reference();
    let _ = r.repository.familiar();
});
