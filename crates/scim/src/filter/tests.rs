//! Table-driven tests for the filter parser, printer, validator and evaluator, the PATCH path
//! parser, projection and sorting.

use std::cmp::Ordering;

use serde_json::{Value, json};

use super::{
    CompareOp, Filter, MAX_FILTER_DEPTH, MAX_FILTER_LEN, matches, parse, parse_patch_path, validate,
};
use crate::error::{ScimError, ScimType};
use crate::path::AttrPath;
use crate::projection::{parse_attribute_list, project, sort_cmp};
use crate::schema::{ENTERPRISE_USER_SCHEMA, ResourceKind};

const ENT: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

/// (input, canonical printed form). Every RFC 7644 §3.4.2.2 example, every operator,
/// precedence, URN paths, literals and the interop tolerances.
#[rustfmt::skip]
const PARSE_OK: &[(&str, &str)] = &[
    // RFC 7644 §3.4.2.2 examples
    (r#"userName eq "bjensen""#, r#"userName eq "bjensen""#),
    (r#"name.familyName co "O'Malley""#, r#"name.familyName co "O'Malley""#),
    (r#"userName sw "J""#, r#"userName sw "J""#),
    (r#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "J""#, r#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "J""#),
    ("title pr", "title pr"),
    (r#"meta.lastModified gt "2011-05-13T04:42:34Z""#, r#"meta.lastModified gt "2011-05-13T04:42:34Z""#),
    (r#"meta.lastModified ge "2011-05-13T04:42:34Z""#, r#"meta.lastModified ge "2011-05-13T04:42:34Z""#),
    (r#"meta.lastModified lt "2011-05-13T04:42:34Z""#, r#"meta.lastModified lt "2011-05-13T04:42:34Z""#),
    (r#"meta.lastModified le "2011-05-13T04:42:34Z""#, r#"meta.lastModified le "2011-05-13T04:42:34Z""#),
    (r#"title pr and userType eq "Employee""#, r#"title pr and userType eq "Employee""#),
    (r#"title pr or userType eq "Intern""#, r#"title pr or userType eq "Intern""#),
    (r#"schemas eq "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User""#, r#"schemas eq "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User""#),
    (r#"userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")"#, r#"userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")"#),
    (r#"userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")"#, r#"userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")"#),
    (r#"userType eq "Employee" and (emails.type eq "work")"#, r#"userType eq "Employee" and emails.type eq "work""#),
    (r#"userType eq "Employee" and emails[type eq "work" and value co "@example.com"]"#, r#"userType eq "Employee" and emails[type eq "work" and value co "@example.com"]"#),
    (r#"emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]"#, r#"emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]"#),
    // every operator, any case
    (r#"userName ne "x""#, r#"userName ne "x""#),
    (r#"userName co "x""#, r#"userName co "x""#),
    (r#"userName ew "x""#, r#"userName ew "x""#),
    (r#"userName EQ "x""#, r#"userName eq "x""#),
    (r#"userName Eq "x""#, r#"userName eq "x""#),
    (r#"userName NE "x" AND title PR"#, r#"userName ne "x" and title pr"#),
    (r#"userName Sw "x" Or userName eW "y""#, r#"userName sw "x" or userName ew "y""#),
    (r#"NOT (userName cO "x")"#, r#"not (userName co "x")"#),
    ("x GT 1 and x Ge 2 and x lT 3 and x LE 4", "x gt 1 and x ge 2 and x lt 3 and x le 4"),
    // precedence and associativity
    ("a pr or b pr and c pr", "a pr or b pr and c pr"),
    ("a pr and b pr or c pr", "a pr and b pr or c pr"),
    ("(a pr or b pr) and c pr", "(a pr or b pr) and c pr"),
    ("a pr and (b pr or c pr)", "a pr and (b pr or c pr)"),
    ("a pr or (b pr or c pr)", "a pr or (b pr or c pr)"),
    ("a pr and (b pr and c pr)", "a pr and (b pr and c pr)"),
    ("a pr and b pr and c pr", "a pr and b pr and c pr"),
    ("(a pr and b pr) or (c pr and d pr)", "a pr and b pr or c pr and d pr"),
    ("not (a pr) and b pr", "not (a pr) and b pr"),
    ("not (a pr and b pr)", "not (a pr and b pr)"),
    ("not (a pr) or not (b pr)", "not (a pr) or not (b pr)"),
    ("not a pr and b pr", "not (a pr) and b pr"),
    ("not not (a pr)", "not (not (a pr))"),
    (r#"((userName eq "x"))"#, r#"userName eq "x""#),
    ("not pr", "not pr"),
    (r#"emails[(type eq "work" or type eq "home") and primary eq true]"#, r#"emails[(type eq "work" or type eq "home") and primary eq true]"#),
    (r#"emails[not (type eq "work")]"#, r#"emails[not (type eq "work")]"#),
    // URN-qualified paths with dots in the URN
    (r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "1""#, r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "1""#),
    (r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value eq "x""#, r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value eq "x""#),
    // value paths, Entra's `[...].sub op value` form
    (r#"emails[type eq "work"].value eq "x""#, r#"emails[type eq "work" and value eq "x"]"#),
    (r#"emails[type eq "work"].value pr"#, r#"emails[type eq "work" and value pr]"#),
    (r#"members[value eq "2819c223-7f76-453a-919d-413861904646"]"#, r#"members[value eq "2819c223-7f76-453a-919d-413861904646"]"#),
    (r#"emails [type eq "work"]"#, r#"emails[type eq "work"]"#),
    // literals
    (r#"userName eq "a\"b""#, r#"userName eq "a\"b""#),
    (r#"userName eq "\u00e9\n\\""#, r#"userName eq "é\n\\""#),
    (r#"userName eq "a b (c) [d] and or""#, r#"userName eq "a b (c) [d] and or""#),
    (r#"userName eq """#, r#"userName eq """#),
    ("x eq 42", "x eq 42"),
    ("x eq -7", "x eq -7"),
    ("x eq -1.5", "x eq -1.5"),
    ("x eq 1e3", "x eq 1000.0"),
    ("x eq 2.5E-3", "x eq 0.0025"),
    ("x eq 18446744073709551615", "x eq 18446744073709551615"),
    ("active eq TRUE", "active eq true"),
    ("active eq False", "active eq false"),
    ("x eq NULL", "x eq null"),
    (r#"active eq "True""#, r#"active eq "True""#),
    // tolerances (scim-interop §1.2)
    ("externalId eq jyoung", r#"externalId eq "jyoung""#),
    ("userName sw O", r#"userName sw "O""#),
    ("emails.Value co example.com", r#"emails.Value co "example.com""#),
    ("meta.Created gt 2015-10-10T14:38:21.86-07:00", r#"meta.Created gt "2015-10-10T14:38:21.86-07:00""#),
    (r#"DisplayName eq "x""#, r#"DisplayName eq "x""#),
    ("name.FamilyName eq Employee and (emails.Value co example.com or emails.Value co example.org)", r#"name.FamilyName eq "Employee" and (emails.Value co "example.com" or emails.Value co "example.org")"#),
    ("userName eq 0123", r#"userName eq "0123""#),
    ("userName eq 1.", r#"userName eq "1.""#),
    ("members[value eq 123-abc]", r#"members[value eq "123-abc"]"#),
    ("  userName\teq \"x\"  ", r#"userName eq "x""#),
    (r#"userName eq"x"and title pr"#, r#"userName eq "x" and title pr"#),
    ("title PR", "title pr"),
    ("members.$ref pr", "members.$ref pr"),
];

/// (input, expected error position (`None` = no position), detail fragment).
#[rustfmt::skip]
const PARSE_ERR: &[(&str, Option<usize>, &str)] = &[
    ("", None, "filter is empty"),
    ("   ", None, "filter is empty"),
    (r#"userName foo "x""#, Some(9), "expected an operator after `userName`, found `foo`"),
    (r#"userName = "x""#, Some(9), "expected an operator after `userName`, found `=`"),
    ("userName", Some(8), "expected an operator after `userName`, found end of filter"),
    ("userName eq", Some(11), "expected a value after `eq`, found end of filter"),
    ("userName eq )", Some(12), "expected a value after `eq`, found `)`"),
    (r#"(userName eq "x""#, Some(16), "expected `)` to close `(` at position 0"),
    (r#"((userName eq "x")"#, Some(18), "expected `)` to close `(` at position 0"),
    (r#"userName eq "x")"#, Some(15), "unbalanced `)`"),
    (r#"emails[type eq "work""#, Some(21), "expected `]` to close `[` at position 6"),
    (r#"emails[type eq "work"]]"#, Some(22), "unbalanced `]`"),
    (r#"userName eq "x" foo"#, Some(16), "expected `and`, `or` or end of filter, found `foo`"),
    (r#"userName eq "x" "y""#, Some(16), "found string \"y\""),
    (r#"title pr "x""#, Some(9), "`pr` takes no value"),
    ("title pr foo", Some(9), "`pr` takes no value"),
    ("a[b[c eq 1]]", Some(3), "nested value paths are not allowed"),
    (r#"emails[type eq "work"].value[x eq 1]"#, Some(28), "expected an operator after `.value`"),
    (r#"userName eq "x"#, Some(12), "unterminated string literal"),
    (r#"userName eq "\q""#, Some(12), "invalid string literal"),
    ("userName eq \"a\u{1}\"", Some(12), "invalid string literal"),
    (r#"userName eq "x" and"#, Some(19), "expected an attribute path, `(` or `not`, found end of filter"),
    (r#"userName eq "x" or"#, Some(18), "expected an attribute path"),
    (r#"and userName eq "x""#, Some(4), "expected an operator after `and`, found `userName`"),
    (r#"1abc eq "x""#, Some(0), "`1abc` is not a valid attribute path"),
    (r#"a.b.c eq "x""#, Some(0), "not a valid attribute path"),
    (r#"urn:ietf:params:scim:schemas:core:2.0:User: eq "x""#, Some(0), "not a valid attribute path"),
    ("()", Some(1), "expected an attribute path, `(` or `not`, found `)`"),
    ("emails[]", Some(7), "empty value filter"),
    ("name.givenName[x eq 1]", Some(14), "has a sub-attribute"),
    (r#"emails[type eq "work"].1x eq "a""#, Some(22), "`1x` is not a valid sub-attribute"),
    (r#"emails[type eq "work"]. eq "a""#, Some(22), "is not a valid sub-attribute"),
    ("not", Some(3), "found end of filter"),
    ("not ()", Some(5), "found `)`"),
    ("[a eq 1]", Some(0), "found `[`"),
    (r#"emails[type eq "work"] .value eq "x""#, Some(23), "found `.value`"),
    (r#""x" eq "x""#, Some(0), "found string \"x\""),
];

fn err_pos(e: &ScimError) -> Option<usize> {
    let rest = e.detail.split("at position ").nth(1)?;
    rest.split(':').next()?.parse().ok()
}

#[test]
fn parse_table_prints_canonically() {
    for (input, canonical) in PARSE_OK {
        let f = parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(f.to_string(), *canonical, "printing {input}");
    }
}

#[test]
fn parse_table_round_trips() {
    for (input, _) in PARSE_OK {
        let f = parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        let printed = f.to_string();
        let again = parse(&printed).unwrap_or_else(|e| panic!("reparsing {printed}: {e}"));
        assert_eq!(again, f, "round trip of {input} via {printed}");
        assert_eq!(again.to_string(), printed);
    }
}

#[test]
fn parse_errors_name_their_position() {
    for (input, pos, fragment) in PARSE_ERR {
        let e = parse(input).expect_err(input);
        assert_eq!(e.status, 400, "{input}");
        assert_eq!(e.scim_type, Some(ScimType::InvalidFilter), "{input}");
        assert_eq!(err_pos(&e), *pos, "{input}: {}", e.detail);
        assert!(e.detail.contains(fragment), "{input}: {}", e.detail);
        if pos.is_some() {
            assert!(
                e.detail.starts_with("invalid filter at position"),
                "{}",
                e.detail
            );
        }
    }
}

#[test]
fn parse_builds_the_expected_trees() {
    let p = |s: &str| AttrPath::simple(s);
    let pr = |s: &str| Box::new(Filter::Present(p(s)));
    assert_eq!(
        parse("a pr or b pr and c pr").unwrap(),
        Filter::Or(pr("a"), Box::new(Filter::And(pr("b"), pr("c"))))
    );
    assert_eq!(
        parse("a pr and b pr and c pr").unwrap(),
        Filter::And(Box::new(Filter::And(pr("a"), pr("b"))), pr("c"))
    );
    assert_eq!(
        parse("not a pr and b pr").unwrap(),
        Filter::And(Box::new(Filter::Not(pr("a"))), pr("b"))
    );
    assert_eq!(
        parse(r#"emails[type eq "work"].value eq "x""#).unwrap(),
        Filter::ValuePath {
            path: p("emails"),
            filter: Box::new(Filter::And(
                Box::new(Filter::Compare {
                    path: p("type"),
                    op: CompareOp::Eq,
                    value: json!("work")
                }),
                Box::new(Filter::Compare {
                    path: p("value"),
                    op: CompareOp::Eq,
                    value: json!("x")
                }),
            )),
        }
    );
    let Filter::Compare { path, op, value } =
        parse(&format!("{ENT}:manager.value Ge 12.5")).unwrap()
    else {
        panic!("not a comparison");
    };
    assert_eq!(path.urn.as_deref(), Some(ENT));
    assert_eq!(
        (path.attr.as_str(), path.sub.as_deref()),
        ("manager", Some("value"))
    );
    assert_eq!(op, CompareOp::Ge);
    assert_eq!(value, json!(12.5));
    let Filter::Compare { path, value, .. } =
        parse("meta.Created gt 2015-10-10T14:38:21.86-07:00").unwrap()
    else {
        panic!("not a comparison");
    };
    assert_eq!(
        (path.attr.as_str(), path.sub.as_deref()),
        ("meta", Some("Created"))
    );
    assert_eq!(value, json!("2015-10-10T14:38:21.86-07:00"));
    let Filter::Compare { value, .. } = parse("x eq 7").unwrap() else {
        panic!("not a comparison");
    };
    assert!(value.as_u64() == Some(7));
}

#[test]
fn hostile_input_is_rejected_without_overflow() {
    let e = parse(&"(".repeat(10_000)).unwrap_err();
    assert!(e.detail.contains("too long"), "{}", e.detail);
    assert_eq!(e.scim_type, Some(ScimType::InvalidFilter));
    let e = parse(&"(".repeat(4000)).unwrap_err();
    assert!(e.detail.contains("nested deeper than 16"), "{}", e.detail);
    assert_eq!(err_pos(&e), Some(MAX_FILTER_DEPTH));
    let e = parse(&format!("{}a pr", "not ".repeat(1000))).unwrap_err();
    assert!(e.detail.contains("nested deeper"), "{}", e.detail);
    assert_eq!(err_pos(&e), Some(4 * MAX_FILTER_DEPTH));
    let e = parse(&format!("{}a pr{}", "(".repeat(17), ")".repeat(17))).unwrap_err();
    assert!(e.detail.contains("nested deeper"), "{}", e.detail);
    let ok = format!("{}a pr{}", "(".repeat(16), ")".repeat(16));
    assert_eq!(parse(&ok).unwrap(), Filter::Present(AttrPath::simple("a")));
    let e = parse(&format!("userName eq \"{}\"", "a".repeat(5000))).unwrap_err();
    assert!(e.detail.contains("too long"));
    let e = parse(&"]".repeat(3000)).unwrap_err();
    assert_eq!(err_pos(&e), Some(0));
    // Byte soup is an error, never a panic.
    for s in [
        "\"",
        "\\",
        "[",
        "]]",
        ")(",
        "a[",
        "a[b",
        "a[b eq",
        "a eq \"\\u12\"",
        "é eq 1",
        "\u{0}",
        "a eq \"\\ud800\"",
    ] {
        assert_eq!(
            parse(s).unwrap_err().scim_type,
            Some(ScimType::InvalidFilter),
            "{s}"
        );
        assert_eq!(
            parse_patch_path(s).unwrap_err().scim_type,
            Some(ScimType::InvalidPath),
            "{s}"
        );
    }
    assert_eq!(parse("a eq é").unwrap().to_string(), r#"a eq "é""#);
}

/// (path, canonical printed form, urn, attr, attr.sub, has filter, sub after brackets).
type PathRow<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a str,
    Option<&'a str>,
    bool,
    Option<&'a str>,
);
#[rustfmt::skip]
const PATCH_OK: &[PathRow<'static>] = &[
    ("members", "members", None, "members", None, false, None),
    ("name.familyName", "name.familyName", None, "name", Some("familyName"), false, None),
    (r#"emails[type eq "work"]"#, r#"emails[type eq "work"]"#, None, "emails", None, true, None),
    (r#"emails[type eq "work"].value"#, r#"emails[type eq "work"].value"#, None, "emails", None, true, Some("value")),
    (r#"members[value eq "2819c223-7f76-453a-919d-413861904646"]"#, r#"members[value eq "2819c223-7f76-453a-919d-413861904646"]"#, None, "members", None, true, None),
    ("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department", Some(ENT), "department", None, false, None),
    ("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value", Some(ENT), "manager", Some("value"), false, None),
    (r#"addresses[type eq "work"].streetAddress"#, r#"addresses[type eq "work"].streetAddress"#, None, "addresses", None, true, Some("streetAddress")),
    (ENT, ENT, Some(ENT), "", None, false, None),
    ("urn:ietf:params:scim:schemas:extension:enterprise:2.0:user", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user", Some("urn:ietf:params:scim:schemas:extension:enterprise:2.0:user"), "", None, false, None),
    ("members[value eq 123-abc]", r#"members[value eq "123-abc"]"#, None, "members", None, true, None),
    (r#"Members[Value EQ "x"]"#, r#"Members[Value eq "x"]"#, None, "Members", None, true, None),
    (r#"emails[type eq "work" and primary eq true].display"#, r#"emails[type eq "work" and primary eq true].display"#, None, "emails", None, true, Some("display")),
    ("  active ", "active", None, "active", None, false, None),
];

#[rustfmt::skip]
const PATCH_ERR: &[(&str, Option<usize>, &str)] = &[
    ("", None, "path is empty"),
    (r#"emails[type eq "work""#, Some(21), "expected `]` to close `[`"),
    (r#"emails[type eq "work"]x"#, Some(22), "expected end of path, found `x`"),
    (r#"emails[type eq "work"] .value"#, Some(23), "expected end of path"),
    ("name.givenName.x", Some(0), "not a valid attribute path"),
    ("members value", Some(8), "expected end of path, found `value`"),
    ("emails[type[a eq 1]]", Some(11), "nested value paths"),
    (r#"emails[type eq "work"]."#, Some(22), "not a valid sub-attribute"),
    ("(members)", Some(0), "expected an attribute path, found `(`"),
    ("members]", Some(7), "unbalanced `]`"),
    ("emails[]", Some(7), "empty value filter"),
];

#[test]
fn patch_paths() {
    for (input, printed, urn, attr, attr_sub, has_filter, sub) in PATCH_OK {
        let p = parse_patch_path(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(p.attr.urn.as_deref(), *urn, "{input}");
        assert_eq!(p.attr.attr, *attr, "{input}");
        assert_eq!(p.attr.sub.as_deref(), *attr_sub, "{input}");
        assert_eq!(p.filter.is_some(), *has_filter, "{input}");
        assert_eq!(p.sub.as_deref(), *sub, "{input}");
        assert_eq!(p.is_bare_urn(), attr.is_empty(), "{input}");
        assert_eq!(p.to_string(), *printed, "{input}");
        assert_eq!(parse_patch_path(&p.to_string()).unwrap(), p, "{input}");
    }
    for (input, pos, fragment) in PATCH_ERR {
        let e = parse_patch_path(input).expect_err(input);
        assert_eq!(e.scim_type, Some(ScimType::InvalidPath), "{input}");
        assert_eq!(err_pos(&e), *pos, "{input}: {}", e.detail);
        assert!(e.detail.contains(fragment), "{input}: {}", e.detail);
    }
    let p = parse_patch_path(r#"members[value eq "u1"]"#).unwrap();
    assert_eq!(
        p.filter,
        Some(Filter::Compare {
            path: AttrPath::simple("value"),
            op: CompareOp::Eq,
            value: json!("u1")
        })
    );
}

fn user1() -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENT],
        "id": "2819c223-7f76-453a-919d-413861904646",
        "externalId": "AbC-1",
        "userName": "alice@x",
        "name": {"familyName": "O'Malley", "givenName": "Alice"},
        "displayName": "Alice Ö",
        "title": "",
        "userType": "Employee",
        "active": true,
        "password": "secret",
        "emails": [
            {"value": "alice@example.com", "type": "work", "primary": true},
            {"value": "a@home.example.org", "type": "home"}
        ],
        "ims": [],
        "meta": {
            "resourceType": "User",
            "created": "2011-08-01T18:29:49.793Z",
            "lastModified": "2011-05-13T04:42:34Z",
            "version": "W/\"1\""
        },
        ENT: {
            "employeeNumber": "701984",
            "department": "Tour Operations",
            "manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d", "displayName": "John Smith"}
        }
    })
}

fn user2() -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "id": "u2",
        "externalId": "abc-1",
        "userName": "Bob",
        "title": "Boss",
        "active": "False",
        "meta": {"resourceType": "User", "lastModified": "2015-10-10T14:38:21.86-07:00"}
    })
}

fn group1() -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "id": "g1",
        "displayName": "Tour Guides",
        "members": [
            {"value": "u1", "display": "Alice", "type": "User"},
            {"value": "u2"}
        ],
        "meta": {"resourceType": "Group", "created": "2020-01-01T00:00:00Z"}
    })
}

fn group2() -> Value {
    json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "id": "g2", "displayName": "Empty", "members": []})
}

/// (document, filter, expected).
#[rustfmt::skip]
const EVAL: &[(&str, &str, bool)] = &[
    // caseExact
    ("u1", r#"userName eq "ALICE@X""#, true),
    ("u1", r#"USERNAME Eq "alice@x""#, true),
    ("u1", r#"userName eq "alice@y""#, false),
    ("u1", r#"externalId eq "AbC-1""#, true),
    ("u1", r#"externalId eq "abc-1""#, false),
    ("u2", "externalId eq abc-1", true),
    ("u1", r#"id eq "2819C223-7F76-453A-919D-413861904646""#, false),
    ("u1", r#"id eq "2819c223-7f76-453a-919d-413861904646""#, true),
    ("u1", r#"displayName eq "alice ö""#, true),
    ("u1", r#"name.familyName co "o'mal""#, true),
    ("u1", r#"name.FAMILYNAME co "O'Malley""#, true),
    ("u1", r#"userName sw "ALI""#, true),
    ("u1", r#"userName ew "@X""#, true),
    ("u1", r#"userName sw "x""#, false),
    ("u1", r#"userName gt "alice@w""#, true),
    ("u1", r#"userName lt "ALICE@W""#, false),
    ("u1", r#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "a""#, true),
    // pr
    ("u1", "title pr", false),
    ("u1", "userType pr", true),
    ("u1", "name pr", true),
    ("u1", "ims pr", false),
    ("u1", "emails pr", true),
    ("u1", "emails.type pr", true),
    ("u1", "nickName pr", false),
    ("u1", "meta pr", true),
    ("u2", "name pr", false),
    // dateTime, across offsets
    ("u1", r#"meta.lastModified gt "2011-05-13T04:42:33Z""#, true),
    ("u1", r#"meta.lastModified ge "2011-05-13T04:42:34Z""#, true),
    ("u1", r#"meta.lastModified gt "2011-05-13T04:42:34Z""#, false),
    ("u1", r#"meta.lastModified lt "2011-05-13T05:42:34+01:00""#, false),
    ("u1", r#"meta.lastModified le "2011-05-13T05:42:34+01:00""#, true),
    ("u1", r#"meta.lastModified eq "2011-05-13T06:42:34+02:00""#, true),
    ("u1", r#"meta.lastModified lt "2011-05-13T04:42:35.5Z""#, true),
    ("u1", r#"meta.lastModified gt "not a date""#, false),
    ("u1", r#"meta.lastModified lt "not a date""#, false),
    ("u1", "meta.created gt 2011-08-01", true),
    ("u1", "meta.created lt 2011-08-01", false),
    ("u2", "meta.lastModified gt 2015-10-10T21:00:00Z", true),
    ("u2", r#"meta.lastModified eq "2015-10-10T21:38:21.86Z""#, true),
    ("u2", "meta.LastModified lt 2015-10-10T14:38:21.87-07:00", true),
    ("u2", "meta.lastModified gt 2015-10-10T14:38:21.87-07:00", false),
    ("u2", "meta.created lt 2099-01-01T00:00:00Z", false),
    // multi-valued: any element
    ("u1", r#"emails co "example.com""#, true),
    ("u1", r#"emails co "example.net""#, false),
    ("u1", "emails.Value co example.org", true),
    ("u1", r#"emails.type eq "work""#, true),
    ("u1", r#"emails.type eq "other""#, false),
    ("u1", r#"emails[type eq "work" and value co "@example.com"]"#, true),
    ("u1", r#"emails[type eq "home" and value co "@example.com"]"#, false),
    ("u1", r#"emails[type eq "work"].value eq "ALICE@example.com""#, true),
    ("u1", r#"emails[type eq "home"].value eq "alice@example.com""#, false),
    ("u1", "emails[type eq work].value pr", true),
    ("u1", "emails[type eq home and primary eq true]", false),
    ("u1", r#"emails[primary eq "True"]"#, true),
    ("u1", r#"emails[not (type eq "work")]"#, true),
    ("u1", r#"schemas eq "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User""#, true),
    ("u2", r#"schemas eq "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User""#, false),
    ("u2", r#"emails co "x""#, false),
    ("u2", r#"emails[type eq "work"]"#, false),
    // ne: `not eq`, absent matches
    ("u1", r#"userType ne "Employee""#, false),
    ("u1", r#"userType ne "Intern""#, true),
    ("u1", r#"nickName ne "x""#, true),
    ("u1", r#"emails.type ne "work""#, false),
    ("u1", r#"emails.type ne "other""#, true),
    ("u2", r#"emails.type ne "work""#, true),
    // null
    ("u1", "nickName eq null", true),
    ("u1", "title eq null", true),
    ("u1", "userName eq null", false),
    ("u1", "userName ne null", true),
    ("u1", "nickName ne null", false),
    // booleans
    ("u1", "active eq true", true),
    ("u1", r#"active eq "TRUE""#, true),
    ("u1", "active ne false", true),
    ("u1", "active eq false", false),
    ("u2", "active eq false", true),
    ("u2", "active eq True", false),
    // enterprise extension
    ("u1", r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "701984""#, true),
    ("u1", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq 701984", true),
    ("u1", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user:Department sw tour", true),
    ("u1", r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value eq "26118915-6090-4610-87e4-49d8ca9f808d""#, true),
    ("u1", r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager eq "26118915-6090-4610-87e4-49d8ca9f808d""#, true),
    ("u1", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager pr", true),
    ("u2", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber pr", false),
    ("u1", r#"employeeNumber eq "701984""#, false),
    // RFC examples combined
    ("u1", r#"title pr and userType eq "Employee""#, false),
    ("u1", r#"title pr or userType eq "Intern""#, false),
    ("u2", r#"title pr or userType eq "Intern""#, true),
    ("u1", r#"userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")"#, true),
    ("u1", r#"userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")"#, false),
    ("u2", r#"userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")"#, true),
    ("u1", r#"userType eq "Employee" and emails[type eq "work" and value co "@example.com"]"#, true),
    ("u1", r#"emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]"#, true),
    // unknown attributes never match
    ("u1", r#"nope eq "x""#, false),
    ("u1", r#"nope ne "x""#, false),
    ("u1", "nope pr", false),
    ("u1", r#"emails[nope eq "x"]"#, false),
    ("u1", r#"userName[value eq "x"]"#, false),
    // groups
    ("g1", r#"members[value eq "u1"]"#, true),
    ("g1", r#"members.value eq "u2""#, true),
    ("g1", r#"members[value eq "u3"]"#, false),
    ("g1", r#"members.value eq "u3""#, false),
    ("g1", "members pr", true),
    ("g1", r#"displayName eq "tour guides""#, true),
    ("g1", r#"members[type eq "User" and display sw "al"]"#, true),
    ("g1", r#"members[type eq "Group"]"#, false),
    ("g1", r#"meta.created ge "2020-01-01T01:00:00+01:00""#, true),
    ("g2", "members pr", false),
    ("g2", r#"members.value eq "u1""#, false),
    ("g2", "not (members pr)", true),
    ("g2", r#"members[value eq "u1"]"#, false),
];

fn doc(name: &str) -> (ResourceKind, Value) {
    match name {
        "u1" => (ResourceKind::User, user1()),
        "u2" => (ResourceKind::User, user2()),
        "g1" => (ResourceKind::Group, group1()),
        "g2" => (ResourceKind::Group, group2()),
        other => panic!("no document {other}"),
    }
}

#[test]
fn evaluation_table() {
    for (name, filter, expected) in EVAL {
        let (kind, d) = doc(name);
        let f = parse(filter).unwrap_or_else(|e| panic!("{filter}: {e}"));
        assert_eq!(matches(&f, kind, &d), *expected, "{name}: {filter}");
        // The canonical form evaluates the same.
        let again = parse(&f.to_string()).unwrap();
        assert_eq!(matches(&again, kind, &d), *expected, "{name}: {f}");
    }
}

#[test]
fn evaluation_looks_keys_up_case_insensitively() {
    let d = json!({"USERNAME": "x", "Emails": [{"Value": "a@b", "TYPE": "work"}], "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user": {"EmployeeNumber": "5"}});
    for f in [
        r#"userName eq "x""#,
        r#"emails[type eq "work" and value eq "a@b"]"#,
        r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "5""#,
    ] {
        assert!(matches(&parse(f).unwrap(), ResourceKind::User, &d), "{f}");
    }
}

#[rustfmt::skip]
const VALID: &[(ResourceKind, &str)] = &[
    (ResourceKind::User, r#"userName eq "bjensen""#),
    (ResourceKind::User, r#"name.familyName co "O'Malley""#),
    (ResourceKind::User, r#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "J""#),
    (ResourceKind::User, "title pr"),
    (ResourceKind::User, r#"meta.lastModified gt "2011-05-13T04:42:34Z""#),
    (ResourceKind::User, r#"schemas eq "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User""#),
    (ResourceKind::User, r#"userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")"#),
    (ResourceKind::User, r#"emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]"#),
    (ResourceKind::User, r#"emails[type eq "work"].value eq "x""#),
    (ResourceKind::User, r#"emails gt "a""#),
    (ResourceKind::User, r#"active eq "False""#),
    (ResourceKind::User, "active eq null"),
    (ResourceKind::User, "name pr"),
    (ResourceKind::User, "name[givenName eq x]"),
    (ResourceKind::User, r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "1""#),
    (ResourceKind::User, r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value eq "x""#),
    (ResourceKind::User, "meta.Created gt 2015-10-10T14:38:21.86-07:00"),
    (ResourceKind::User, r#"externalId eq "x" and id ne "y" and meta.version eq "W/\"1\"""#),
    (ResourceKind::Group, r#"members.value eq "x""#),
    (ResourceKind::Group, r#"members[value eq "2819c223"]"#),
    (ResourceKind::Group, r#"displayName eq "Tour Guides""#),
];

#[rustfmt::skip]
const INVALID: &[(ResourceKind, &str, &str)] = &[
    (ResourceKind::User, r#"nope eq "x""#, "unknown attribute `nope` in filter"),
    (ResourceKind::User, r#"name.nope eq "x""#, "unknown attribute `name.nope`"),
    (ResourceKind::User, r#"userName.sub eq "x""#, "unknown attribute `userName.sub`"),
    (ResourceKind::User, r#"emails[nope eq "x"]"#, "unknown attribute `emails.nope`"),
    (ResourceKind::User, r#"emails[value.x eq "x"]"#, "unknown attribute"),
    (ResourceKind::User, r#"employeeNumber eq "1""#, "unknown attribute `employeeNumber`"),
    (ResourceKind::User, r#"urn:example:Other:employeeNumber eq "1""#, "unknown attribute"),
    (ResourceKind::User, r#"password eq "x""#, "`password` cannot be used in a filter"),
    (ResourceKind::User, "password pr", "cannot be used in a filter"),
    (ResourceKind::User, "active gt true", "`gt` cannot be used on the boolean attribute `active`"),
    (ResourceKind::User, r#"name gt "x""#, "complex attribute"),
    (ResourceKind::User, r#"name eq "x""#, "complex attribute"),
    (ResourceKind::User, r#"active co "t""#, "`co` needs a string attribute"),
    (ResourceKind::User, r#"meta.created sw "2011""#, "`sw` needs a string attribute"),
    (ResourceKind::User, r#"emails[primary ew "e"]"#, "`ew` needs a string attribute"),
    (ResourceKind::User, r#"userName[value eq "x"]"#, "not a complex attribute"),
    (ResourceKind::User, r#"members.value eq "x""#, "unknown attribute `members.value`"),
    (ResourceKind::User, "userName gt null", "`null` can only be compared"),
    (ResourceKind::User, r#"active eq "yes""#, "boolean"),
    (ResourceKind::User, r#"userName eq "x" and (title pr or nope pr)"#, "unknown attribute `nope`"),
    (ResourceKind::Group, r#"userName eq "x""#, "unknown attribute `userName`"),
];

#[test]
fn validation_table() {
    for (kind, f) in VALID {
        let parsed = parse(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        validate(&parsed, *kind).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    for (kind, f, fragment) in INVALID {
        let e = validate(&parse(f).unwrap(), *kind).expect_err(f);
        assert_eq!(e.scim_type, Some(ScimType::InvalidFilter), "{f}");
        assert_eq!(e.status, 400);
        assert!(e.detail.contains(fragment), "{f}: {}", e.detail);
    }
    // A hand-built nested value path (the parser rejects them) is invalid too.
    let nested = Filter::ValuePath {
        path: AttrPath::simple("emails"),
        filter: Box::new(parse(r#"emails[type eq "x"]"#).unwrap()),
    };
    assert!(validate(&nested, ResourceKind::User).is_err());
    assert!(!matches(&nested, ResourceKind::User, &user1()));
}

fn attrs(s: &str) -> Vec<AttrPath> {
    parse_attribute_list(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn attribute_lists() {
    assert!(attrs("").is_empty());
    assert!(attrs("  ").is_empty());
    let l = attrs(
        r#"userName, name.givenName ,emails[type eq "work"],,urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value"#,
    );
    let shown: Vec<String> = l.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "userName",
            "name.givenName",
            "emails",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value"
        ]
    );
    let l = attrs(r#"emails[type eq "a,b"].value,title"#);
    assert_eq!(l.len(), 2);
    assert_eq!(
        (l[0].attr.as_str(), l[0].sub.as_deref()),
        ("emails", Some("value"))
    );
    let l = attrs(ENT);
    assert_eq!((l[0].urn.as_deref(), l[0].attr.as_str()), (Some(ENT), ""));
    for bad in ["user name", "1abc", "a.b.c", "emails[type eq", "a,b]"] {
        let e = parse_attribute_list(bad).expect_err(bad);
        assert_eq!(e.scim_type, Some(ScimType::InvalidPath), "{bad}");
        assert!(
            e.detail.contains("invalid attribute list entry"),
            "{}",
            e.detail
        );
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn projection() {
    let u = user1();
    let k = ResourceKind::User;
    let none: &[AttrPath] = &[];

    // default: everything but returned-never
    let p = project(k, &u, none, none);
    let mut expected = u.clone();
    expected.as_object_mut().unwrap().remove("password");
    assert_eq!(p, expected);

    let p = project(k, &u, &attrs("USERNAME"), none);
    assert_eq!(
        p,
        json!({"schemas": u["schemas"], "id": u["id"], "userName": "alice@x"})
    );

    let p = project(k, &u, &attrs("name.givenName"), none);
    assert_eq!(p["name"], json!({"givenName": "Alice"}));
    assert_eq!(keys(&p), ["id", "name", "schemas"]);

    let p = project(k, &u, &attrs("emails.value,name.nickname"), none);
    assert_eq!(
        p["emails"],
        json!([{"value": "alice@example.com"}, {"value": "a@home.example.org"}])
    );
    assert_eq!(keys(&p), ["emails", "id", "schemas"]);

    let p = project(k, &u, &attrs(r#"emails[type eq "work"]"#), none);
    assert_eq!(p["emails"], u["emails"]);

    let p = project(
        k,
        &u,
        &attrs("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department"),
        none,
    );
    assert_eq!(p[ENT], json!({"department": "Tour Operations"}));
    assert_eq!(p["schemas"], u["schemas"]);
    assert_eq!(keys(&p), ["id", "schemas", ENT]);

    let p = project(k, &u, &attrs(&format!("{ENT}:manager.displayName")), none);
    assert_eq!(p[ENT], json!({"manager": {"displayName": "John Smith"}}));

    let p = project(k, &u, &attrs(ENT), none);
    assert_eq!(p[ENT], u[ENT]);

    let p = project(k, &u, &attrs("meta"), none);
    assert_eq!(p["meta"], u["meta"]);
    let p = project(k, &u, &attrs("userName"), none);
    assert!(p.get("meta").is_none());

    let p = project(k, &u, &attrs("nope,password"), none);
    assert_eq!(keys(&p), ["id", "schemas"]);

    let p = project(
        k,
        &u,
        none,
        &attrs("id,schemas,name.givenName,emails,password"),
    );
    assert_eq!(p["id"], u["id"]);
    assert_eq!(p["schemas"], u["schemas"]);
    assert_eq!(p["name"], json!({"familyName": "O'Malley"}));
    assert!(p.get("emails").is_none());
    assert_eq!(p["userName"], u["userName"]);

    let p = project(k, &u, none, &attrs(&format!("{ENT}:manager")));
    assert_eq!(
        p[ENT],
        json!({"employeeNumber": "701984", "department": "Tour Operations"})
    );
    let p = project(k, &u, none, &attrs(ENT));
    assert!(p.get(ENT).is_none());

    let p = project(k, &u, &attrs("userName,name"), &attrs("name.familyName"));
    assert_eq!(p["name"], json!({"givenName": "Alice"}));

    // Entra: group reads with excludedAttributes=members
    let g = group1();
    let p = project(ResourceKind::Group, &g, none, &attrs("members"));
    assert_eq!(keys(&p), ["displayName", "id", "meta", "schemas"]);
    let p = project(ResourceKind::Group, &g, &attrs("members"), none);
    assert_eq!(keys(&p), ["id", "members", "schemas"]);
    let p = project(ResourceKind::Group, &g, &attrs("members.value"), none);
    assert_eq!(p["members"], json!([{"value": "u1"}, {"value": "u2"}]));

    // unknown keys are kept by default, dropped when attributes are listed
    let odd = json!({"id": "1", "schemas": [], "x-extra": 1});
    assert_eq!(project(k, &odd, none, none), odd);
    assert_eq!(
        project(k, &odd, &attrs("userName"), none),
        json!({"id": "1", "schemas": []})
    );
}

fn sorted(kind: ResourceKind, by: &str, docs: &[Value], descending: bool) -> Vec<String> {
    let by = AttrPath::parse(by).unwrap();
    let mut v: Vec<&Value> = docs.iter().collect();
    v.sort_by(|a, b| {
        let o = sort_cmp(kind, &by, a, b);
        if descending { o.reverse() } else { o }
    });
    v.iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sorting() {
    let k = ResourceKind::User;
    let docs = [
        json!({"id": "1", "userName": "bob", "externalId": "b", "active": true,
               "emails": [{"value": "z@x", "type": "home"}, {"value": "a@x", "type": "work", "primary": true}],
               "meta": {"created": "2020-01-01T10:00:00+02:00"}, ENT: {"employeeNumber": "3"}}),
        json!({"id": "2", "userName": "Alice", "externalId": "B", "active": false,
               "emails": [{"value": "m@x"}],
               "meta": {"created": "2020-01-01T09:00:00Z"}, ENT: {"employeeNumber": "1"}}),
        json!({"id": "3", "userName": "carol", "externalId": "a", "emails": [],
               "meta": {"created": "2020-01-01T07:30:00Z"}}),
        json!({"id": "4", "userName": "", "active": true, "meta": {"created": "not a date"}}),
    ];
    assert_eq!(sorted(k, "userName", &docs, false), ["2", "1", "3", "4"]);
    assert_eq!(sorted(k, "userName", &docs, true), ["4", "3", "1", "2"]);
    assert_eq!(sorted(k, "USERNAME", &docs, false), ["2", "1", "3", "4"]);
    assert_eq!(sorted(k, "externalId", &docs, false), ["2", "3", "1", "4"]);
    assert_eq!(sorted(k, "emails", &docs, false), ["1", "2", "3", "4"]);
    assert_eq!(
        sorted(k, "emails.value", &docs, false),
        ["1", "2", "3", "4"]
    );
    assert_eq!(
        sorted(k, "meta.created", &docs, false),
        ["3", "1", "2", "4"]
    );
    assert_eq!(sorted(k, "active", &docs, false), ["2", "1", "4", "3"]);
    assert_eq!(
        sorted(k, &format!("{ENT}:employeeNumber"), &docs, false),
        ["2", "1", "3", "4"]
    );
    assert_eq!(sorted(k, "nope", &docs, false), ["1", "2", "3", "4"]);
    let by = AttrPath::simple("userName");
    assert_eq!(sort_cmp(k, &by, &docs[0], &docs[0]), Ordering::Equal);
    assert_eq!(
        sort_cmp(k, &by, &json!({"userName": "A"}), &json!({"userName": "a"})),
        Ordering::Equal
    );
    assert_eq!(ENTERPRISE_USER_SCHEMA, ENT);
}

/// Fuzz finding: an unquoted value full of control characters is within the input limit, but
/// its canonical form (`"\u0000..."`) was not, so the printed filter did not parse back.
#[test]
fn canonical_form_longer_than_limit_is_rejected() {
    let text = format!("externalId eq a{}", "\0".repeat(1000));
    assert!(text.len() <= MAX_FILTER_LEN);
    let err = parse(&text).expect_err("canonical form is too long");
    assert!(
        err.detail.contains("too long once normalised"),
        "{}",
        err.detail
    );
    let ok = format!("externalId eq a{}", "\0".repeat(100));
    let f = parse(&ok).expect("short enough");
    assert_eq!(parse(&f.to_string()).expect("round-trips"), f);
}

#[test]
fn canonical_form_deeper_than_limit_is_rejected() {
    // Bare `not`s count one level each but print as `not (…)`, two levels each.
    let deep = format!("{}userName eq \"a\"", "not ".repeat(MAX_FILTER_DEPTH - 1));
    let e = parse(&deep).unwrap_err();
    assert_eq!(e.scim_type, Some(ScimType::InvalidFilter));
    assert!(
        e.detail.contains("nested too deeply once normalised"),
        "{}",
        e.detail
    );
    let shallow = "not not userName eq \"a\"";
    let f = parse(shallow).unwrap();
    assert_eq!(parse(&f.to_string()).unwrap(), f);
}
