//! Building TeamCity locators that no input can subvert.
//!
//! A locator is TeamCity's query mini-language (`username:alice,count:10`).
//! Every value this module did not write itself is escaped as
//! `($base64:<base64url>)`, so a username, email or group name can never add a
//! dimension, unbalance a parenthesis or smuggle its own `$base64:` prefix.
//! Dimensions that TeamCity parses a second time (value conditions such as
//! `email:` and `name:`, and the parameter condition `property:`) get the
//! escape at the inner level, where the second parse reads it.
//!
//! This module must not parse locators; the emulator has its own parser so
//! that an escaping bug here shows up as a wrong match there.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Escapes an arbitrary value as a complex `$base64:` locator value.
///
/// The URL-safe alphabet has no `/` or `+`, and no padding is emitted, so the
/// result also survives a path segment and a query string unchanged.
pub fn escape(value: &str) -> String {
    format!("($base64:{})", URL_SAFE_NO_PAD.encode(value.as_bytes()))
}

/// How a value condition compares (TeamCity's `matchType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchType {
    /// Exact equality (TeamCity's default).
    Equals,
    /// Substring match.
    Contains,
    /// Prefix match.
    StartsWith,
}

impl MatchType {
    fn as_str(self) -> &'static str {
        match self {
            MatchType::Equals => "equals",
            MatchType::Contains => "contains",
            MatchType::StartsWith => "starts-with",
        }
    }
}

/// A TeamCity locator under construction; see the module docs.
///
/// Dimension names are `&'static str`, so only code can write them; values
/// are always escaped unless they are numbers or nested [`Locator`]s built by
/// this type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locator {
    text: String,
}

impl Locator {
    /// An empty locator; add dimensions with the builder methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// `id:<n>`: a user (or other entity) by its numeric id.
    pub fn by_id(id: u64) -> Self {
        Self::new().number("id", id)
    }

    /// `username:(<escaped>)`: a user by username (TeamCity compares case-insensitively).
    pub fn by_username(username: &str) -> Self {
        Self::new().value("username", username)
    }

    /// `id:<n>,username:(<escaped>)`: user `id`, but only while it still has this username.
    ///
    /// TeamCity treats `id` as the item source and `username` as a case-insensitive filter,
    /// so a pinned locator answers 404 "User not found" once id `id` has been renamed (or
    /// deleted): a write sent with a stale cached id cannot land on someone else.
    pub fn user_pinned(id: u64, username: &str) -> Self {
        Self::by_id(id).value("username", username)
    }

    /// `key:(<escaped>)`: a user group by key.
    pub fn by_key(key: &str) -> Self {
        Self::new().value("key", key)
    }

    /// `name:(<escaped>)`: a user group by name (the group locator's `name:` is a plain value).
    pub fn by_group_name(name: &str) -> Self {
        Self::new().value("name", name)
    }

    /// `email:(value:(<escaped>),matchType:equals)`: users whose email equals `email` exactly.
    pub fn by_email(email: &str) -> Self {
        Self::new().condition("email", email, MatchType::Equals, false)
    }

    /// `property:(name:..,value:..,matchType:equals)`: users whose property `name` equals `value`.
    pub fn by_property(name: &str, value: &str) -> Self {
        Self::new().property(name, value)
    }

    /// Adds `name:(<escaped value>)`.
    pub fn value(self, name: &'static str, value: &str) -> Self {
        self.push(name, &escape(value))
    }

    /// Adds `name:<n>` for numeric dimensions (`id`, `count`, `start`, `lookupLimit`).
    pub fn number(self, name: &'static str, value: u64) -> Self {
        self.push(name, &value.to_string())
    }

    /// Adds `name:true|false`.
    pub fn boolean(self, name: &'static str, value: bool) -> Self {
        self.push(name, if value { "true" } else { "false" })
    }

    /// Adds a nested locator built by this type: `name:(<inner>)`.
    pub fn nested(self, name: &'static str, inner: &Locator) -> Self {
        let wrapped = format!("({})", inner.text);
        self.push(name, &wrapped)
    }

    /// Adds a value condition (`email:`, `name:` on users), escaped at the inner level.
    pub fn condition(
        self,
        name: &'static str,
        value: &str,
        match_type: MatchType,
        ignore_case: bool,
    ) -> Self {
        let mut inner = Locator::new()
            .value("value", value)
            .push("matchType", match_type.as_str());
        if ignore_case {
            inner = inner.boolean("ignoreCase", true);
        }
        self.nested(name, &inner)
    }

    /// Adds a parameter condition `property:(name:..,value:..,matchType:equals)`.
    pub fn property(self, name: &str, value: &str) -> Self {
        let inner = Locator::new()
            .value("name", name)
            .value("value", value)
            .push("matchType", MatchType::Equals.as_str());
        self.nested("property", &inner)
    }

    /// Adds `count:<n>` (page size).
    pub fn count(self, n: u64) -> Self {
        self.number("count", n)
    }

    /// Adds `start:<n>` (page offset).
    pub fn start(self, n: u64) -> Self {
        self.number("start", n)
    }

    /// True when no dimension was added.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The locator text, to be sent as a path segment or `locator=` parameter.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn push(mut self, name: &'static str, rendered: &str) -> Self {
        debug_assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()));
        if !self.text.is_empty() {
            self.text.push(',');
        }
        self.text.push_str(name);
        self.text.push(':');
        self.text.push_str(rendered);
        self
    }
}

impl fmt::Display for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_expected_text() {
        let cases: &[(Locator, &str)] = &[
            (Locator::by_id(7), "id:7"),
            (Locator::by_username("aaa"), "username:($base64:YWFh)"),
            (
                Locator::user_pinned(5, "alice"),
                "id:5,username:($base64:YWxpY2U)",
            ),
            // Delimiters, parentheses and a smuggled escape stay inside the value.
            (
                Locator::user_pinned(7, "a,id:1(x):$base64:YQ"),
                "id:7,username:($base64:YSxpZDoxKHgpOiRiYXNlNjQ6WVE)",
            ),
            (Locator::by_username(""), "username:($base64:)"),
            (Locator::by_key("a,b"), "key:($base64:YSxi)"),
            (
                Locator::by_email("a@b"),
                "email:(value:($base64:YUBi),matchType:equals)",
            ),
            (
                Locator::by_property("scim.id", "x"),
                "property:(name:($base64:c2NpbS5pZA),value:($base64:eA),matchType:equals)",
            ),
            (
                Locator::new()
                    .nested("group", &Locator::by_key("K"))
                    .count(10)
                    .start(20),
                "group:(key:($base64:Sw)),count:10,start:20",
            ),
            (
                Locator::new().condition("name", "x", MatchType::Contains, true),
                "name:(value:($base64:eA),matchType:contains,ignoreCase:true)",
            ),
        ];
        for (locator, want) in cases {
            assert_eq!(locator.as_str(), *want);
        }
    }

    #[test]
    fn escaped_values_contain_no_delimiters() {
        for v in [
            "a,id:1",
            "bob)",
            "a(b",
            "$base64:YWFh",
            "ü ñ /+=",
            &"x".repeat(255),
        ] {
            let e = escape(v);
            let inner = &e["($base64:".len()..e.len() - 1];
            assert!(
                inner
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{inner}"
            );
        }
    }
}
