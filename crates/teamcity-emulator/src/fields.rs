//! TeamCity's `fields=` partial-response selector (`model/Fields.java`), as far
//! as users, groups, roles, tokens and projects need it.
//!
//! Supported: `$short` (or empty), `$long`, `*`, `**`, `-`, and explicit lists
//! such as `count,user(id,username,properties(property))` parsed with the
//! locator grammar in extended mode. `$locator(...)` is accepted and ignored.
//! It must not know about entities; renderers ask it per field.

use crate::locator::{LocatorError, Parsed};

/// A field selection at one nesting level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fields {
    /// `$short`: the reference form.
    Short,
    /// `$long`: the default for top-level responses.
    Long,
    /// `*`: every field, nested in short form.
    All,
    /// `**`: everything, nested too.
    AllNested,
    /// `-`: nothing.
    None,
    /// An explicit list of fields with their nested selections.
    Custom(Vec<(String, Fields)>),
}

impl Fields {
    /// Parses the `fields` parameter; `None` means the given default.
    pub(crate) fn parse(text: Option<&str>, default: Fields) -> Result<Fields, LocatorError> {
        match text {
            None => Ok(default),
            Some(t) => Self::parse_text(t),
        }
    }

    fn parse_text(text: &str) -> Result<Fields, LocatorError> {
        Ok(match text {
            "" | "$short" => Fields::Short,
            "$long" => Fields::Long,
            "*" => Fields::All,
            "**" => Fields::AllNested,
            "-" => Fields::None,
            _ => {
                let parsed = Parsed::parse_extended(text)?;
                let mut items = Vec::new();
                for (name, value) in parsed.dims {
                    let nested = match value.text() {
                        "" => Fields::Short,
                        inner => Self::parse_text(inner)?,
                    };
                    items.push((name, nested));
                }
                Fields::Custom(items)
            }
        })
    }

    /// Whether field `name` is included, given its defaults in short and long form.
    pub(crate) fn has(&self, name: &str, in_short: bool, in_long: bool) -> bool {
        match self {
            Fields::Short => in_short,
            Fields::Long => in_long,
            Fields::All | Fields::AllNested => true,
            Fields::None => false,
            Fields::Custom(items) => items.iter().any(|(n, _)| n == name),
        }
    }

    /// The selection for a nested object or collection `name`.
    pub(crate) fn nested(&self, name: &str) -> Fields {
        match self {
            Fields::Short | Fields::Long | Fields::All => Fields::Short,
            Fields::AllNested => Fields::AllNested,
            Fields::None => Fields::None,
            Fields::Custom(items) => items
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, f)| f.clone())
                .unwrap_or(Fields::None),
        }
    }

    /// The selection for the items of a collection (e.g. `user` inside `users`).
    /// Items of a top-level `$long` list are short, as in TeamCity.
    pub(crate) fn items(&self, name: &str) -> Fields {
        self.nested(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_selections() {
        let f = Fields::parse(
            Some("count,user(id,username,properties(property))"),
            Fields::Long,
        )
        .expect("parses");
        assert!(f.has("count", false, false));
        assert!(!f.has("href", true, true));
        let user = f.items("user");
        assert!(user.has("id", false, false) && !user.has("email", true, true));
        let props = user.nested("properties");
        assert!(props.has("property", false, false));
        assert_eq!(props.nested("property"), Fields::Short);
        assert_eq!(Fields::parse(None, Fields::Long), Ok(Fields::Long));
        assert_eq!(
            Fields::parse(Some("$long"), Fields::Short),
            Ok(Fields::Long)
        );
        assert!(Fields::parse(Some("user(id"), Fields::Long).is_err());
        let dashed = Fields::parse(Some("parent-groups"), Fields::Long).expect("dash allowed");
        assert!(dashed.has("parent-groups", false, false));
    }
}
