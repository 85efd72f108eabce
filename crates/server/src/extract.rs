//! Request parsing: SCIM JSON bodies and query parameters, with SCIM errors for every failure.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use scim::projection::parse_attribute_list;
use scim::{AttrPath, ScimError, ScimResult, ScimType};
use serde_json::Value;

/// Reads a JSON body: the media type must be JSON (`application/scim+json` or
/// `application/json`; a missing Content-Type is tolerated), the size within `limit`.
pub(crate) async fn read_json(headers: &HeaderMap, body: Body, limit: usize) -> ScimResult<Value> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !(essence == "application/scim+json"
            || essence == "application/json"
            || essence.ends_with("+json"))
        {
            return Err(ScimError::new(
                415,
                None,
                format!(
                    "unsupported Content-Type `{essence}`: send application/scim+json or application/json"
                ),
            ));
        }
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(limit))?;
    parse_json(&bytes)
}

/// 413 with the limit in the detail.
pub(crate) fn too_large(limit: usize) -> ScimError {
    ScimError::new(
        413,
        None,
        format!("the request body is larger than the limit of {limit} bytes"),
    )
}

/// Parses JSON, naming the line and column of a syntax error.
pub(crate) fn parse_json(bytes: &[u8]) -> ScimResult<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ScimError::invalid_syntax(
            "the request body is empty; a JSON object is required",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ScimError::invalid_syntax(format!(
            "the request body is not valid JSON: {} at line {}, column {}",
            match e.classify() {
                serde_json::error::Category::Eof => "unexpected end of input",
                _ => "syntax error",
            },
            e.line(),
            e.column()
        ))
    })
}

/// Query parameters, keys compared case-insensitively; unknown ones (e.g. `aadOptscim062020`)
/// are ignored.
#[derive(Debug, Default)]
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    /// From the raw query string.
    pub(crate) fn from_query(query: Option<&str>) -> Self {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded_pairs(query.unwrap_or("")) {
            map.insert(k.to_ascii_lowercase(), v);
        }
        Params(map)
    }

    /// A parameter's value.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.get(&key.to_ascii_lowercase()).map(String::as_str)
    }

    /// `attributes` and `excludedAttributes`.
    pub(crate) fn projection(&self) -> ScimResult<Projection> {
        Ok(Projection {
            attributes: self
                .get("attributes")
                .map(parse_attribute_list)
                .transpose()?
                .unwrap_or_default(),
            excluded: self
                .get("excludedAttributes")
                .map(parse_attribute_list)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

/// Splits `a=b&c=d`, percent-decoding and turning `+` into a space.
fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which attributes a response carries.
#[derive(Debug, Default, Clone)]
pub(crate) struct Projection {
    /// `attributes`.
    pub(crate) attributes: Vec<AttrPath>,
    /// `excludedAttributes`.
    pub(crate) excluded: Vec<AttrPath>,
}

impl Projection {
    /// From a `.search` body's `attributes`/`excludedAttributes` (arrays or comma strings).
    pub(crate) fn from_body(body: &Value) -> ScimResult<Self> {
        let list = |key: &str| -> ScimResult<Vec<AttrPath>> {
            match get_ci(body, key) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::String(s)) => parse_attribute_list(s),
                Some(Value::Array(items)) => {
                    let mut out = vec![];
                    for item in items {
                        let s = item.as_str().ok_or_else(|| {
                            ScimError::bad_request(
                                ScimType::InvalidValue,
                                format!("`{key}` must list attribute names"),
                            )
                        })?;
                        out.extend(parse_attribute_list(s)?);
                    }
                    Ok(out)
                }
                Some(_) => Err(ScimError::bad_request(
                    ScimType::InvalidValue,
                    format!("`{key}` must be an array of strings"),
                )),
            }
        };
        Ok(Projection {
            attributes: list("attributes")?,
            excluded: list("excludedAttributes")?,
        })
    }

    /// Whether `name` (a top-level attribute) is asked for explicitly.
    pub(crate) fn requests(&self, name: &str) -> bool {
        self.attributes
            .iter()
            .any(|p| p.urn.is_none() && p.attr.eq_ignore_ascii_case(name))
    }

    /// Whether `name` is excluded.
    pub(crate) fn excludes(&self, name: &str) -> bool {
        self.excluded
            .iter()
            .any(|p| p.urn.is_none() && p.attr.eq_ignore_ascii_case(name) && p.sub.is_none())
    }

    /// Whether the projection would keep `name` in a default response.
    pub(crate) fn keeps(&self, name: &str) -> bool {
        if self.excludes(name) {
            return false;
        }
        self.attributes.is_empty() || self.requests(name)
    }
}

/// Case-insensitive key lookup in a JSON object.
pub(crate) fn get_ci<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}
