//! Filter and PATCH-path parser (RFC 7644 §3.4.2.2, §3.5.2) and the canonical printer.
//!
//! A hand-written lexer and recursive-descent parser. It is schema-free: attribute names are
//! only checked for syntax here; [`super::validate`] checks them against a resource type.
//!
//! Grammar (precedence `()`/`[]` > `not` > `and` > `or`; `and`/`or` left-associative):
//!
//! ```text
//! filter  = and *("or" and)
//! and     = unary *("and" unary)
//! unary   = "not" unary / primary          ; RFC form `not (f)`, tolerant `not a eq b`
//! primary = "(" filter ")"
//!         / attrPath "[" valFilter "]" [ "." subAttr ( "pr" / compareOp compValue ) ]
//!         / attrPath "pr"
//!         / attrPath compareOp compValue
//! ```
//!
//! Tolerances (scim-interop §1.2): operators and keywords in any case; unquoted values (a bare
//! word is `true`/`false`/`null` in any case, a JSON number when it is exactly one, and a string
//! otherwise, so `meta.created gt 2015-10-10T14:38:21.86-07:00` compares a string); any
//! whitespace between tokens; attribute-name casing is kept as sent.
//!
//! Error positions are 0-based character offsets into the input.

use std::fmt;

use serde_json::{Number, Value};

use super::{CompareOp, Filter};
use crate::error::{ScimError, ScimResult};
use crate::path::{AttrPath, is_attr_name, split_urn};
use crate::schema::all_schemas;

/// Longest filter text accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 4096;
/// Deepest nesting of parentheses, `not` and value paths accepted.
pub const MAX_FILTER_DEPTH: usize = 16;

/// A PATCH `path`: `attrPath` or `valuePath [ "." subAttr ]` (RFC 7644 §3.5.2).
///
/// A bare schema URN (`urn:ietf:params:scim:schemas:extension:enterprise:2.0:User`, meaning the
/// whole extension object) is the one case where `attr.attr` is the empty string: it parses to
/// `attr.urn = Some(<the URN as sent>)`, `attr.attr = ""`, `attr.sub = None`, no filter, no sub.
/// Only URNs of schemas this service provider knows are recognised that way.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchPath {
    /// The attribute (URN and name; `attr.sub` holds a plain `a.b` sub-attribute).
    pub attr: AttrPath,
    /// The value filter in brackets, if any.
    pub filter: Option<Filter>,
    /// The sub-attribute after the brackets (`emails[type eq "work"].value`).
    pub sub: Option<String>,
}

impl PatchPath {
    /// Whether this is a bare schema URN naming a whole extension object.
    pub fn is_bare_urn(&self) -> bool {
        self.attr.attr.is_empty() && self.attr.urn.is_some()
    }
}

/// Parses a filter.
pub fn parse(input: &str) -> ScimResult<Filter> {
    let mode = Mode::Filter;
    if input.len() > MAX_FILTER_LEN {
        return Err(mode.plain(format!(
            "filter is too long ({} bytes; at most {MAX_FILTER_LEN} allowed)",
            input.len()
        )));
    }
    if input.trim().is_empty() {
        return Err(mode.plain("filter is empty"));
    }
    let mut p = Parser::new(input, mode)?;
    let f = p.parse_or(0, false)?;
    p.expect_end("`and`, `or` or end of filter")?;
    check_canonical_len(mode, &f)?;
    // The printed form may nest deeper than the input (`not x` prints as `not (x)`): accept only
    // filters whose canonical form is itself within the limits, so printing always round-trips.
    let printed = f.to_string();
    let reparsed = Parser::new(&printed, mode).and_then(|mut again| {
        let g = again.parse_or(0, false)?;
        again.expect_end("end of filter")?;
        Ok(g)
    });
    if reparsed.is_err() {
        return Err(mode.plain(format!(
            "filter is nested too deeply once normalised (at most {MAX_FILTER_DEPTH} levels)"
        )));
    }
    Ok(f)
}

/// The canonical form can be longer than the input (unquoted values gain quotes, control
/// characters become `\u00XX`); it must stay within [`MAX_FILTER_LEN`] so that it parses back.
fn check_canonical_len(mode: Mode, printed: &impl fmt::Display) -> ScimResult<()> {
    let len = printed.to_string().len();
    if len > MAX_FILTER_LEN {
        return Err(mode.plain(format!(
            "{} is too long once normalised ({len} bytes; at most {MAX_FILTER_LEN} allowed)",
            match mode {
                Mode::Filter => "filter",
                Mode::Path => "path",
            }
        )));
    }
    Ok(())
}

/// Parses a PATCH path.
pub fn parse_patch_path(input: &str) -> ScimResult<PatchPath> {
    let mode = Mode::Path;
    if input.len() > MAX_FILTER_LEN {
        return Err(mode.plain(format!(
            "path is too long ({} bytes; at most {MAX_FILTER_LEN} allowed)",
            input.len()
        )));
    }
    if input.trim().is_empty() {
        return Err(mode.plain("path is empty"));
    }
    let mut p = Parser::new(input, mode)?;
    let (text, pos) = match p.next() {
        Some(Token {
            tok: Tok::Word(w),
            pos,
            ..
        }) => (w, pos),
        other => {
            let found = p.describe(other.as_ref());
            return Err(p.err(
                other.map_or(p.end_pos, |t| t.pos),
                format!("expected an attribute path, found {found}"),
            ));
        }
    };
    if p.peek().is_none()
        && all_schemas()
            .iter()
            .any(|s| s.id.eq_ignore_ascii_case(&text))
    {
        return Ok(PatchPath {
            attr: AttrPath {
                urn: Some(text),
                attr: String::new(),
                sub: None,
            },
            filter: None,
            sub: None,
        });
    }
    let attr = p.attr_path(&text, pos)?;
    let mut out = PatchPath {
        attr,
        filter: None,
        sub: None,
    };
    if let Some(Tok::LBracket) = p.peek_tok() {
        let (filter, sub) = p.value_path_body(&out.attr, &text, 0)?;
        out.filter = Some(filter);
        out.sub = sub.map(|(s, _)| s);
    }
    p.expect_end("end of path")?;
    check_canonical_len(mode, &out)?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Filter,
    Path,
}

impl Mode {
    fn plain(self, detail: impl Into<String>) -> ScimError {
        match self {
            Mode::Filter => ScimError::invalid_filter(detail),
            Mode::Path => ScimError::invalid_path(detail),
        }
    }

    fn at(self, pos: usize, msg: &str) -> ScimError {
        match self {
            Mode::Filter => {
                ScimError::invalid_filter(format!("invalid filter at position {pos}: {msg}"))
            }
            Mode::Path => ScimError::invalid_path(format!("invalid path at position {pos}: {msg}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    LBracket,
    RBracket,
    /// A quoted JSON string, decoded.
    Str(String),
    /// A bare run of characters: attribute path, keyword, operator or unquoted value.
    Word(String),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// 0-based character offset.
    pos: usize,
    /// Whether whitespace precedes the token.
    space_before: bool,
}

fn lex(input: &str, mode: Mode) -> ScimResult<(Vec<Token>, usize)> {
    let mut toks = Vec::new();
    let mut chars = input.char_indices().peekable();
    let mut pos = 0usize; // character offset of the next char
    let mut space = false;
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            pos += 1;
            space = true;
            continue;
        }
        let tok_pos = pos;
        let tok = match c {
            '(' | ')' | '[' | ']' => {
                chars.next();
                pos += 1;
                match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    '[' => Tok::LBracket,
                    _ => Tok::RBracket,
                }
            }
            '"' => {
                chars.next();
                pos += 1;
                let mut end = None;
                let mut escaped = false;
                for (i, ch) in chars.by_ref() {
                    pos += 1;
                    if escaped {
                        escaped = false;
                    } else if ch == '\\' {
                        escaped = true;
                    } else if ch == '"' {
                        end = Some(i);
                        break;
                    }
                }
                let Some(end) = end else {
                    return Err(mode.at(tok_pos, "unterminated string literal"));
                };
                match serde_json::from_str::<String>(&input[start..=end]) {
                    Ok(s) => Tok::Str(s),
                    Err(_) => {
                        return Err(mode.at(
                            tok_pos,
                            "invalid string literal (bad escape or control character)",
                        ));
                    }
                }
            }
            _ => {
                let mut end = input.len();
                while let Some(&(i, ch)) = chars.peek() {
                    if ch.is_whitespace() || matches!(ch, '(' | ')' | '[' | ']' | '"') {
                        end = i;
                        break;
                    }
                    chars.next();
                    pos += 1;
                }
                Tok::Word(input[start..end].to_owned())
            }
        };
        toks.push(Token {
            tok,
            pos: tok_pos,
            space_before: space,
        });
        space = false;
    }
    Ok((toks, pos))
}

fn compare_op(word: &str) -> Option<CompareOp> {
    Some(match word.to_ascii_lowercase().as_str() {
        "eq" => CompareOp::Eq,
        "ne" => CompareOp::Ne,
        "co" => CompareOp::Co,
        "sw" => CompareOp::Sw,
        "ew" => CompareOp::Ew,
        "gt" => CompareOp::Gt,
        "ge" => CompareOp::Ge,
        "lt" => CompareOp::Lt,
        "le" => CompareOp::Le,
        _ => return None,
    })
}

fn is_kw(tok: Option<&Tok>, kw: &str) -> bool {
    matches!(tok, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
}

/// Types an unquoted value: `true`/`false`/`null` (any case), a JSON number, else a string.
fn bare_literal(word: &str) -> Value {
    if word.eq_ignore_ascii_case("true") {
        Value::Bool(true)
    } else if word.eq_ignore_ascii_case("false") {
        Value::Bool(false)
    } else if word.eq_ignore_ascii_case("null") {
        Value::Null
    } else if looks_like_json_number(word) {
        match serde_json::from_str::<Number>(word) {
            Ok(n) => Value::Number(n),
            Err(_) => Value::String(word.to_owned()),
        }
    } else {
        Value::String(word.to_owned())
    }
}

/// `-? (0 | [1-9][0-9]*) (\.[0-9]+)? ([eE][+-]?[0-9]+)?`
fn looks_like_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let s0 = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let s0 = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s0 {
            return false;
        }
    }
    i == b.len()
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
    end_pos: usize,
    mode: Mode,
}

impl Parser {
    fn new(input: &str, mode: Mode) -> ScimResult<Parser> {
        let (toks, end_pos) = lex(input, mode)?;
        Ok(Parser {
            toks,
            i: 0,
            end_pos,
            mode,
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.i)
    }

    fn peek_tok(&self) -> Option<&Tok> {
        self.peek().map(|t| &t.tok)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.toks.get(self.i).cloned();
        if t.is_some() {
            self.i += 1;
        }
        t
    }

    fn pos(&self) -> usize {
        self.peek().map_or(self.end_pos, |t| t.pos)
    }

    fn err(&self, pos: usize, msg: impl AsRef<str>) -> ScimError {
        self.mode.at(pos, msg.as_ref())
    }

    fn describe(&self, t: Option<&Token>) -> String {
        match t.map(|t| &t.tok) {
            None => match self.mode {
                Mode::Filter => "end of filter".to_owned(),
                Mode::Path => "end of path".to_owned(),
            },
            Some(Tok::LParen) => "`(`".to_owned(),
            Some(Tok::RParen) => "`)`".to_owned(),
            Some(Tok::LBracket) => "`[`".to_owned(),
            Some(Tok::RBracket) => "`]`".to_owned(),
            Some(Tok::Str(s)) => format!("string {}", Value::String(s.clone())),
            Some(Tok::Word(w)) => format!("`{w}`"),
        }
    }

    fn found(&self) -> String {
        self.describe(self.peek())
    }

    fn expect_end(&self, expected: &str) -> ScimResult<()> {
        match self.peek_tok() {
            None => Ok(()),
            Some(Tok::RParen) => Err(self.err(self.pos(), "unbalanced `)`")),
            Some(Tok::RBracket) => Err(self.err(self.pos(), "unbalanced `]`")),
            Some(_) => Err(self.err(
                self.pos(),
                format!("expected {expected}, found {}", self.found()),
            )),
        }
    }

    fn check_depth(&self, depth: usize, pos: usize) -> ScimResult<()> {
        if depth > MAX_FILTER_DEPTH {
            Err(self.err(
                pos,
                format!("nested deeper than {MAX_FILTER_DEPTH} levels of parentheses, `not` and value paths"),
            ))
        } else {
            Ok(())
        }
    }

    fn parse_or(&mut self, depth: usize, in_vp: bool) -> ScimResult<Filter> {
        let mut left = self.parse_and(depth, in_vp)?;
        while is_kw(self.peek_tok(), "or") {
            self.next();
            let right = self.parse_and(depth, in_vp)?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn parse_and(&mut self, depth: usize, in_vp: bool) -> ScimResult<Filter> {
        let mut left = self.parse_unary(depth, in_vp)?;
        while is_kw(self.peek_tok(), "and") {
            self.next();
            let right = self.parse_unary(depth, in_vp)?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn parse_unary(&mut self, depth: usize, in_vp: bool) -> ScimResult<Filter> {
        // `not` is the operator unless it is itself used as an attribute name (`not pr`).
        let next_is_op = match self.toks.get(self.i + 1).map(|t| &t.tok) {
            Some(Tok::Word(w)) => compare_op(w).is_some() || w.eq_ignore_ascii_case("pr"),
            _ => false,
        };
        if is_kw(self.peek_tok(), "not") && !next_is_op {
            let pos = self.pos();
            self.check_depth(depth + 1, pos)?;
            self.next();
            let inner = self.parse_unary(depth + 1, in_vp)?;
            return Ok(Filter::Not(Box::new(inner)));
        }
        self.parse_primary(depth, in_vp)
    }

    fn parse_primary(&mut self, depth: usize, in_vp: bool) -> ScimResult<Filter> {
        let pos = self.pos();
        match self.peek_tok().cloned() {
            Some(Tok::LParen) => {
                self.check_depth(depth + 1, pos)?;
                self.next();
                let inner = self.parse_or(depth + 1, in_vp)?;
                match self.peek_tok() {
                    Some(Tok::RParen) => {
                        self.next();
                        Ok(inner)
                    }
                    _ => Err(self.err(
                        self.pos(),
                        format!(
                            "expected `)` to close `(` at position {pos}, found {}",
                            self.found()
                        ),
                    )),
                }
            }
            Some(Tok::Word(w)) => {
                self.next();
                let path = self.attr_path(&w, pos)?;
                if let Some(Tok::LBracket) = self.peek_tok() {
                    if in_vp {
                        return Err(self.err(self.pos(), "nested value paths are not allowed"));
                    }
                    let (inner, sub) = self.value_path_body(&path, &w, depth)?;
                    let filter = match sub {
                        None => inner,
                        Some((sub, sub_text)) => {
                            let tail = self.attr_tail(AttrPath::simple(sub), &sub_text)?;
                            Filter::And(Box::new(inner), Box::new(tail))
                        }
                    };
                    return Ok(Filter::ValuePath {
                        path,
                        filter: Box::new(filter),
                    });
                }
                self.attr_tail(path, &w)
            }
            _ => Err(self.err(
                pos,
                format!(
                    "expected an attribute path, `(` or `not`, found {}",
                    self.found()
                ),
            )),
        }
    }

    /// Parses `[valFilter]` and an optional adjacent `.subAttr`; the `[` is next.
    fn value_path_body(
        &mut self,
        path: &AttrPath,
        text: &str,
        depth: usize,
    ) -> ScimResult<(Filter, Option<(String, String)>)> {
        let open = self.pos();
        if path.sub.is_some() {
            return Err(self.err(
                open,
                format!("`{text}` has a sub-attribute and cannot take a `[` value filter"),
            ));
        }
        self.check_depth(depth + 1, open)?;
        self.next();
        if let Some(Tok::RBracket) = self.peek_tok() {
            return Err(self.err(self.pos(), "empty value filter `[]`"));
        }
        let inner = self.parse_or(depth + 1, true)?;
        match self.peek_tok() {
            Some(Tok::RBracket) => {
                self.next();
            }
            _ => {
                return Err(self.err(
                    self.pos(),
                    format!(
                        "expected `]` to close `[` at position {open}, found {}",
                        self.found()
                    ),
                ));
            }
        }
        let sub = match self.peek() {
            Some(Token {
                tok: Tok::Word(w),
                space_before: false,
                pos,
            }) if w.starts_with('.') => {
                let (w, pos) = (w.clone(), *pos);
                let name = &w[1..];
                if !is_attr_name(name) {
                    return Err(self.err(
                        pos,
                        format!("`{name}` is not a valid sub-attribute name after `]`"),
                    ));
                }
                self.next();
                Some((name.to_owned(), w))
            }
            _ => None,
        };
        Ok((inner, sub))
    }

    /// Parses `pr` or `compareOp compValue` after an attribute path.
    fn attr_tail(&mut self, path: AttrPath, text: &str) -> ScimResult<Filter> {
        let pos = self.pos();
        let op_word = match self.peek_tok() {
            Some(Tok::Word(w)) => w.clone(),
            _ => {
                return Err(self.err(
                    pos,
                    format!(
                        "expected an operator after `{text}`, found {}",
                        self.found()
                    ),
                ));
            }
        };
        if op_word.eq_ignore_ascii_case("pr") {
            self.next();
            let takes_value = match self.peek_tok() {
                Some(Tok::Str(_)) => true,
                Some(Tok::Word(w)) => {
                    !(w.eq_ignore_ascii_case("and") || w.eq_ignore_ascii_case("or"))
                }
                _ => false,
            };
            if takes_value {
                return Err(self.err(
                    self.pos(),
                    format!("`pr` takes no value, found {}", self.found()),
                ));
            }
            return Ok(Filter::Present(path));
        }
        let Some(op) = compare_op(&op_word) else {
            return Err(self.err(
                pos,
                format!("expected an operator after `{text}`, found `{op_word}`"),
            ));
        };
        self.next();
        let value = match self.peek_tok() {
            Some(Tok::Str(s)) => Value::String(s.clone()),
            Some(Tok::Word(w)) => bare_literal(w),
            _ => {
                return Err(self.err(
                    self.pos(),
                    format!(
                        "expected a value after `{}`, found {}",
                        op.as_str(),
                        self.found()
                    ),
                ));
            }
        };
        self.next();
        Ok(Filter::Compare { path, op, value })
    }

    /// Parses `[urn:]attr[.sub]`, keeping the casing as sent.
    fn attr_path(&self, text: &str, pos: usize) -> ScimResult<AttrPath> {
        let bad = || self.err(pos, format!("`{text}` is not a valid attribute path"));
        let (urn, rest) = split_urn(text);
        let (attr, sub) = match rest.split_once('.') {
            Some((a, s)) => (a, Some(s)),
            None => (rest, None),
        };
        if !is_attr_name(attr) || sub.is_some_and(|s| !is_attr_name(s)) {
            return Err(bad());
        }
        Ok(AttrPath {
            urn: urn.map(str::to_owned),
            attr: attr.to_owned(),
            sub: sub.map(str::to_owned),
        })
    }
}

fn prec(f: &Filter) -> u8 {
    match f {
        Filter::Or(..) => 1,
        Filter::And(..) => 2,
        _ => 3,
    }
}

fn write_child(f: &mut fmt::Formatter<'_>, child: &Filter, parens: bool) -> fmt::Result {
    if parens {
        write!(f, "({child})")
    } else {
        write!(f, "{child}")
    }
}

/// Canonical form: lower-case keywords, strings JSON-quoted, `not (..)` always parenthesised,
/// and parentheses wherever precedence or associativity would otherwise change the tree, so
/// that `parse(&f.to_string()) == Ok(f)` for every parsed filter.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                let p = prec(self);
                write_child(f, a, prec(a) < p)?;
                f.write_str(if p == 1 { " or " } else { " and " })?;
                write_child(f, b, prec(b) <= p)
            }
            Filter::Not(inner) => write!(f, "not ({inner})"),
            Filter::Compare { path, op, value } => {
                write!(f, "{path} {} {value}", op.as_str())
            }
            Filter::Present(path) => write!(f, "{path} pr"),
            Filter::ValuePath { path, filter } => write!(f, "{path}[{filter}]"),
        }
    }
}

impl fmt::Display for PatchPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attr.attr.is_empty()
            && let Some(urn) = &self.attr.urn
        {
            return f.write_str(urn);
        }
        write!(f, "{}", self.attr)?;
        if let Some(filter) = &self.filter {
            write!(f, "[{filter}]")?;
        }
        if let Some(sub) = &self.sub {
            write!(f, ".{sub}")?;
        }
        Ok(())
    }
}
