//! TeamCity's locator grammar, parsed the way `Locator.java` parses it.
//!
//! This is the emulator's own parser, written from the REST plugin source
//! (`data/Locator.java`), so that an escaping bug in the client shows up here
//! as a wrong match or a 400 rather than being mirrored. It is strict: names
//! must be alphanumeric unless declared, parentheses must balance, and every
//! dimension must be consumed by the finder (see [`Parsed::check_used`]).

use std::collections::BTreeSet;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

/// A locator error, reported as `LocatorProcessException` (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocatorError(pub(crate) String);

/// One dimension value: text, or the plain `$any` keyword.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// A literal value (already `$base64`-decoded).
    Text(String),
    /// The plain `$any` keyword ("no filter").
    Any,
}

impl Value {
    pub(crate) fn text(&self) -> &str {
        match self {
            Value::Text(t) => t,
            Value::Any => "$any",
        }
    }
}

/// A parsed locator: a single value, or dimensions in order of appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub(crate) raw: String,
    pub(crate) single: Option<String>,
    pub(crate) dims: Vec<(String, Value)>,
    used: BTreeSet<String>,
}

fn decoder(alphabet: &base64::alphabet::Alphabet) -> GeneralPurpose {
    GeneralPurpose::new(
        alphabet,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    )
}

fn decode_base64(text: &str) -> Result<String, LocatorError> {
    let bytes = decoder(&base64::alphabet::URL_SAFE)
        .decode(text)
        .or_else(|_| decoder(&base64::alphabet::STANDARD).decode(text))
        .map_err(|_| LocatorError(format!("Invalid Base64url character sequence: '{text}'")))?;
    String::from_utf8(bytes).map_err(|_| {
        LocatorError(format!(
            "Error converting decoded '{text}' value bytes to UTF-8 string"
        ))
    })
}

/// `$base64:<b64>` as a whole text → decoded, else `None`.
fn base64_single(text: &str, extended: bool) -> Result<Option<String>, LocatorError> {
    if !text.starts_with("$base64:") {
        return Ok(None);
    }
    let Ok(dims) = parse_dims(text, &["$base64"], extended) else {
        return Ok(None);
    };
    if dims.iter().any(|(n, _)| n != "$base64") {
        return Ok(None);
    }
    if dims.len() != 1 {
        return Err(LocatorError(
            "More then 1 $base64 values, only single one is supported".into(),
        ));
    }
    decode_base64(dims[0].1.text()).map(Some)
}

/// Position of the stop text outside parentheses, or after the closing `)` of
/// the first group when `stop` is `None`; `Err(())` when unbalanced.
fn scan(text: &str, stop: Option<u8>) -> Result<usize, ()> {
    let bytes = text.as_bytes();
    let mut nesting = 0usize;
    let mut pos = 0;
    while pos < bytes.len() {
        match bytes[pos] {
            b'(' => {
                nesting += 1;
                pos += 1;
            }
            b')' => {
                // An out-of-order ')' is kept as text.
                nesting = nesting.saturating_sub(1);
                pos += 1;
                if nesting == 0 && stop.is_none() {
                    return Ok(pos);
                }
            }
            b if nesting == 0 && Some(b) == stop => return Ok(pos),
            _ => pos += 1,
        }
    }
    if nesting != 0 { Err(()) } else { Ok(pos) }
}

fn syntax(text: &str, pos: usize, what: &str) -> LocatorError {
    LocatorError(format!(
        "Bad locator syntax: {what}. Details: locator: '{text}', at position {pos}"
    ))
}

fn valid_name(name: &str, declared: &[&str], extended: bool) -> bool {
    declared.contains(&name)
        || name
            .chars()
            .all(|c| c.is_alphanumeric() || (extended && c == '-'))
}

fn parse_dims(
    text: &str,
    declared: &[&str],
    extended: bool,
) -> Result<Vec<(String, Value)>, LocatorError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let rest = &text[at..];
        let delim = rest.find([',', '(', ':']);
        let name_end = delim.map_or(text.len(), |d| at + d);
        if name_end == at {
            let found = &text[at..at + 1];
            return Err(syntax(
                text,
                at,
                &format!("Could not find dimension name, found '{found}' instead"),
            ));
        }
        let name = &text[at..name_end];
        if !valid_name(name, declared, extended) {
            return Err(syntax(
                text,
                at,
                &format!(
                    "Invalid dimension name :'{name}'. Should contain only alpha-numeric symbols"
                ),
            ));
        }
        let mut value = Value::Text(String::new());
        at = name_end;
        match text.as_bytes().get(name_end) {
            None => {}
            Some(b',') => at = name_end + 1,
            Some(&d) => {
                if d == b':' {
                    at = name_end + 1;
                }
                let value_and_rest = &text[at..];
                if value_and_rest.starts_with('(') {
                    let end = scan(value_and_rest, None)
                        .map_err(|()| syntax(text, at + 1, "Could not find matching ')'"))?;
                    value = Value::Text(value_and_rest[1..end - 1].to_owned());
                    at += end;
                    if at != text.len() {
                        if text.as_bytes()[at] != b',' {
                            return Err(syntax(
                                text,
                                at,
                                "No dimensions delimiter ',' after complex value",
                            ));
                        }
                        at += 1;
                    }
                } else {
                    let end = scan(value_and_rest, Some(b','))
                        .map_err(|()| syntax(text, at, "Could not find matching ')'"))?;
                    let plain = &value_and_rest[..end];
                    value = if plain == "$any" {
                        Value::Any
                    } else {
                        Value::Text(plain.to_owned())
                    };
                    at = if end == value_and_rest.len() {
                        text.len()
                    } else {
                        at + end + 1
                    };
                }
                if let Value::Text(t) = &value
                    && let Some(decoded) = base64_single(t, extended)?
                {
                    value = Value::Text(decoded);
                }
            }
        }
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// Parses `text` exactly as the emulator's finders do (normal mode, no declared names) and
/// returns its dimensions in order of appearance, each value `$base64`-decoded; `None` is the
/// plain `$any` keyword. A single-value locator (`alice`, `(x)`, `$base64:..`) is one entry with
/// an empty name. Errors are TeamCity's `LocatorProcessException` messages.
///
/// Public so that the client's locator builder can be checked against this independent parser
/// (fuzz target, property tests); it is not part of the emulator's HTTP surface.
pub fn parse(text: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let parsed = Parsed::parse(text, &[]).map_err(|e| e.0)?;
    if let Some(single) = parsed.single {
        return Ok(vec![(String::new(), Some(single))]);
    }
    Ok(parsed
        .dims
        .into_iter()
        .map(|(name, value)| match value {
            Value::Text(t) => (name, Some(t)),
            Value::Any => (name, None),
        })
        .collect())
}

impl Parsed {
    /// Parses a locator in normal mode; `declared` names may contain non-alphanumerics.
    pub(crate) fn parse(text: &str, declared: &[&str]) -> Result<Parsed, LocatorError> {
        Self::parse_mode(text, declared, false)
    }

    /// Parses in extended mode (for `fields=`): `-` allowed in names, no single values.
    pub(crate) fn parse_extended(text: &str) -> Result<Parsed, LocatorError> {
        Self::parse_mode(text, &["$locator"], true)
    }

    fn parse_mode(text: &str, declared: &[&str], extended: bool) -> Result<Parsed, LocatorError> {
        if text.is_empty() {
            return Err(LocatorError("Invalid locator. Cannot be empty.".into()));
        }
        let mut parsed = Parsed {
            raw: text.to_owned(),
            single: None,
            dims: Vec::new(),
            used: BTreeSet::new(),
        };
        if text.len() > 2 && text.starts_with('(') && text.ends_with(')') {
            parsed.single = Some(text[1..text.len() - 1].to_owned());
        } else if let Some(decoded) = base64_single(text, extended)? {
            parsed.single = Some(decoded);
        } else if !(extended || text.contains(':') || (text.contains('(') && text.contains(')'))) {
            parsed.single = Some(text.to_owned());
        } else {
            parsed.dims = parse_dims(text, declared, extended)?;
        }
        Ok(parsed)
    }

    /// All values of a dimension, marking it used.
    pub(crate) fn all(&mut self, name: &str) -> Vec<Value> {
        let values: Vec<Value> = self
            .dims
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect();
        if !values.is_empty() {
            self.used.insert(name.to_owned());
        }
        values
    }

    /// The single value of a dimension (error when repeated), marking it used.
    pub(crate) fn one(&mut self, name: &str) -> Result<Option<Value>, LocatorError> {
        let mut values = self.all(name);
        match values.len() {
            0 => Ok(None),
            1 => Ok(values.pop()),
            _ => Err(LocatorError(format!(
                "Only single '{name}' dimension is supported in locator. Found: {values:?}"
            ))),
        }
    }

    /// A text dimension; `$any` reads as `None`.
    pub(crate) fn text(&mut self, name: &str) -> Result<Option<String>, LocatorError> {
        Ok(match self.one(name)? {
            Some(Value::Text(t)) => Some(t),
            _ => None,
        })
    }

    /// A non-negative number dimension.
    pub(crate) fn number(&mut self, name: &str) -> Result<Option<u64>, LocatorError> {
        match self.text(name)? {
            None => Ok(None),
            Some(t) => t.parse().map(Some).map_err(|_| {
                LocatorError(format!(
                    "Invalid value of dimension '{name}': '{t}'. Should be a number."
                ))
            }),
        }
    }

    /// Fails like `checkLocatorFullyProcessed` when a dimension was not consumed.
    pub(crate) fn check_used(&self, supported: &[&str]) -> Result<(), LocatorError> {
        let unused: BTreeSet<&str> = self
            .dims
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !self.used.contains(*n))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let list = unused.iter().copied().collect::<Vec<_>>().join(", ");
        let verb = if unused.len() == 1 {
            "dimension"
        } else {
            "dimensions"
        };
        let is = if unused.len() == 1 { "is" } else { "are" };
        Err(LocatorError(format!(
            "Error processing locator '{}': Locator {verb} [{list}] {is} unknown. Supported dimensions are: [{}]",
            self.raw,
            supported.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(text: &str) -> String {
        match Parsed::parse(text, &[]) {
            Err(e) => format!("error: {}", e.0),
            Ok(p) => match p.single {
                Some(s) => format!("single={s}"),
                None => p
                    .dims
                    .iter()
                    .map(|(n, v)| match v {
                        Value::Any => format!("{n}=<any>"),
                        Value::Text(t) => format!("{n}={t}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" | "),
            },
        }
    }

    #[test]
    fn parses_like_teamcity() {
        let cases = [
            ("aaa", "single=aaa"),
            ("aaa(x", "single=aaa(x"),
            ("($base64:YWFh)", "single=$base64:YWFh"),
            ("$base64:YWFh", "single=aaa"),
            ("$base64:(YWFh)", "single=aaa"),
            ("a:b", "a=b"),
            ("name:,x:y", "name= | x=y"),
            ("a:b,c", "a=b | c="),
            ("x:y:z", "x=y:z"),
            ("x:y:(z,a:b)", "x=y:(z,a:b)"),
            ("a:b)", "a=b)"),
            ("a:(b,c),d:e", "a=b,c | d=e"),
            ("a(b,c)", "a=b,c"),
            ("a:$any", "a=<any>"),
            ("a:($any)", "a=$any"),
            ("a:($base64:YSxpZDox)", "a=a,id:1"),
            ("a:$base64:YWFh", "a=aaa"),
            ("a:b,a:c", "a=b | a=c"),
            ("username:alice,id:1", "username=alice | id=1"),
            (
                "a:(b",
                "error: Bad locator syntax: Could not find matching ')'. Details: locator: 'a:(b', at position 3",
            ),
            (
                "a:(b)x",
                "error: Bad locator syntax: No dimensions delimiter ',' after complex value. Details: locator: 'a:(b)x', at position 5",
            ),
            (
                ":b",
                "error: Bad locator syntax: Could not find dimension name, found ':' instead. Details: locator: ':b', at position 0",
            ),
            (
                "$aaa:b",
                "error: Bad locator syntax: Invalid dimension name :'$aaa'. Should contain only alpha-numeric symbols. Details: locator: '$aaa:b', at position 0",
            ),
            (
                "a:($base64:!!)",
                "error: Invalid Base64url character sequence: '!!'",
            ),
            ("", "error: Invalid locator. Cannot be empty."),
        ];
        for (text, want) in cases {
            assert_eq!(show(text), want, "locator {text:?}");
        }
    }

    #[test]
    fn reports_unused_dimensions() {
        let mut p = Parsed::parse("id:1,foo:2", &[]).expect("parses");
        assert_eq!(p.number("id"), Ok(Some(1)));
        let err = p.check_used(&["id"]).expect_err("foo unused");
        assert!(
            err.0.contains("Locator dimension [foo] is unknown"),
            "{}",
            err.0
        );
    }
}
