//! Property test: every value the client's locator builder escapes reads back, through the
//! emulator's independent locator parser, as exactly one dimension with exactly that value.

use proptest::prelude::*;
use teamcity::Locator;
use teamcity_emulator::locator::parse;

type Dims = Vec<(String, Option<String>)>;

fn dims(text: &str) -> Dims {
    parse(text).unwrap_or_else(|e| panic!("locator {text:?} does not parse: {e}"))
}

fn dim(name: &str, value: &str) -> (String, Option<String>) {
    (name.to_owned(), Some(value.to_owned()))
}

/// Arbitrary unicode, text dense in locator syntax, and values posing as escapes.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[,:()$a-z ]{0,24}",
        "\\$base64:[A-Za-z0-9_=(),:$-]{0,24}",
        "\\(\\$base64:[A-Za-z0-9_=-]{0,16}\\)",
        Just("$any".to_owned()),
        Just("current".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn locator_escaping_round_trips(a in value(), b in value()) {
        prop_assert_eq!(dims(Locator::by_username(&a).as_str()), vec![dim("username", &a)]);
        prop_assert_eq!(dims(Locator::by_key(&a).as_str()), vec![dim("key", &a)]);
        prop_assert_eq!(dims(Locator::by_group_name(&a).as_str()), vec![dim("name", &a)]);

        let outer = dims(Locator::by_email(&a).as_str());
        prop_assert_eq!(outer.len(), 1);
        prop_assert_eq!(&outer[0].0, "email");
        let inner = outer[0].1.as_deref().expect("text");
        prop_assert_eq!(dims(inner), vec![dim("value", &a), dim("matchType", "equals")]);

        let outer = dims(Locator::by_property(&a, &b).as_str());
        prop_assert_eq!(outer.len(), 1);
        prop_assert_eq!(&outer[0].0, "property");
        let inner = outer[0].1.as_deref().expect("text");
        prop_assert_eq!(
            dims(inner),
            vec![dim("name", &a), dim("value", &b), dim("matchType", "equals")]
        );

        // Dimensions after an escaped value stay separate.
        let composed = Locator::by_username(&a).count(10).start(3);
        prop_assert_eq!(
            dims(composed.as_str()),
            vec![dim("username", &a), dim("count", "10"), dim("start", "3")]
        );
    }
}
