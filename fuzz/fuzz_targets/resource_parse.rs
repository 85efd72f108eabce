//! Bytes → JSON → `scim::normalize` for both resource kinds: never panics, and normalising the
//! stored form again yields it unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scim::{ResourceKind, normalize};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for kind in [ResourceKind::User, ResourceKind::Group] {
        if let Ok(n) = normalize(kind, &body) {
            let again = normalize(kind, &n.attrs)
                .unwrap_or_else(|e| panic!("{body}: stored form {} rejected: {e}", n.attrs));
            assert_eq!(again.attrs, n.attrs, "{body}: normalize is not idempotent");
            assert_eq!(again.members, None);
        }
    }
});
