//! Arbitrary strings → the client's locator builder → the emulator's independent locator
//! parser, which must see exactly the dimensions the builder wrote, with the original values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teamcity::Locator;
use teamcity_emulator::locator::parse;

fn dims(text: &str) -> Vec<(String, Option<String>)> {
    parse(text).unwrap_or_else(|e| panic!("locator {text:?} does not parse: {e}"))
}

fn one(text: &str, name: &str) -> String {
    match dims(text).as_slice() {
        [(n, Some(v))] if n == name => v.clone(),
        other => panic!("locator {text:?}: expected one `{name}` dimension, got {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\0').unwrap_or((&text, ""));

    assert_eq!(one(Locator::by_username(a).as_str(), "username"), a);
    assert_eq!(one(Locator::by_key(a).as_str(), "key"), a);
    assert_eq!(one(Locator::by_group_name(a).as_str(), "name"), a);

    let email = one(Locator::by_email(a).as_str(), "email");
    assert_eq!(
        dims(&email),
        vec![
            ("value".to_owned(), Some(a.to_owned())),
            ("matchType".to_owned(), Some("equals".to_owned())),
        ],
        "email condition {email:?}"
    );

    let property = one(Locator::by_property(a, b).as_str(), "property");
    assert_eq!(
        dims(&property),
        vec![
            ("name".to_owned(), Some(a.to_owned())),
            ("value".to_owned(), Some(b.to_owned())),
            ("matchType".to_owned(), Some("equals".to_owned())),
        ],
        "property condition {property:?}"
    );
});
