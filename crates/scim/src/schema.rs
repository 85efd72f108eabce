//! The schemas this service provider implements (RFC 7643 §4, §8.7.1): User, the enterprise
//! User extension and Group, as static data.
//!
//! The same definitions drive everything schema-aware: attribute lookup (case-insensitive names,
//! URN-qualified paths), filter semantics (`caseExact`, types), PATCH and PUT mutability checks,
//! projection (`returned`) and the `/Schemas` documents. There is one source of truth; nothing
//! else lists attributes.

use serde_json::{Map, Value, json};

/// URN of the core User schema.
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// URN of the enterprise User extension.
pub const ENTERPRISE_USER_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
/// URN of the core Group schema.
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
/// URN of the ListResponse message.
pub const LIST_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
/// URN of the PatchOp message.
pub const PATCH_OP_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
/// URN of the SearchRequest message.
pub const SEARCH_REQUEST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:SearchRequest";
/// URN of the BulkRequest message.
pub const BULK_REQUEST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
/// URN of the BulkResponse message.
pub const BULK_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkResponse";
/// URN of the Schema resource schema.
pub const SCHEMA_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Schema";
/// URN of the ResourceType resource schema.
pub const RESOURCE_TYPE_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ResourceType";
/// URN of the ServiceProviderConfig schema.
pub const SPC_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";

/// An attribute's data type (RFC 7643 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    /// A Unicode string.
    String,
    /// `true` or `false`.
    Boolean,
    /// A real number.
    Decimal,
    /// A whole number.
    Integer,
    /// An `xsd:dateTime` string, compared chronologically.
    DateTime,
    /// Base64 data.
    Binary,
    /// A URI reference.
    Reference,
    /// A structure of sub-attributes.
    Complex,
}

impl AttrType {
    fn as_str(self) -> &'static str {
        match self {
            AttrType::String => "string",
            AttrType::Boolean => "boolean",
            AttrType::Decimal => "decimal",
            AttrType::Integer => "integer",
            AttrType::DateTime => "dateTime",
            AttrType::Binary => "binary",
            AttrType::Reference => "reference",
            AttrType::Complex => "complex",
        }
    }
}

/// Whether and how an attribute may be modified (RFC 7643 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutability {
    /// Set by the service provider only.
    ReadOnly,
    /// Freely writable.
    ReadWrite,
    /// Writable once; changing it later is a `mutability` error.
    Immutable,
    /// Writable but never returned.
    WriteOnly,
}

/// When an attribute is returned (RFC 7643 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// Always, even when excluded.
    Always,
    /// Never.
    Never,
    /// Unless excluded.
    Default,
    /// Only when asked for by `attributes`.
    Request,
}

/// Uniqueness scope of an attribute's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uniqueness {
    /// No uniqueness.
    None,
    /// Unique within this service provider.
    Server,
    /// Globally unique.
    Global,
}

/// One attribute definition.
#[derive(Debug)]
pub struct AttrDef {
    /// Canonical name (the casing we emit).
    pub name: &'static str,
    /// Data type.
    pub ty: AttrType,
    /// Whether the attribute holds a list.
    pub multi_valued: bool,
    /// Whether a value is required.
    pub required: bool,
    /// Whether string comparison is case-sensitive.
    pub case_exact: bool,
    /// Mutability.
    pub mutability: Mutability,
    /// Return policy.
    pub returned: Returned,
    /// Uniqueness.
    pub uniqueness: Uniqueness,
    /// Human-readable description for `/Schemas`.
    pub description: &'static str,
    /// Suggested values (`type` of emails etc.).
    pub canonical_values: &'static [&'static str],
    /// Reference types for `reference` attributes.
    pub reference_types: &'static [&'static str],
    /// Sub-attributes of a complex attribute.
    pub sub_attributes: &'static [AttrDef],
}

impl AttrDef {
    /// Finds a sub-attribute by case-insensitive name.
    pub fn sub(&self, name: &str) -> Option<&'static AttrDef> {
        // The sub-attribute slices are 'static; re-borrow through a 'static path.
        find_in(self.sub_attributes, name)
    }

    /// The `/Schemas` representation of this attribute.
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("name".into(), json!(self.name));
        o.insert("type".into(), json!(self.ty.as_str()));
        o.insert("multiValued".into(), json!(self.multi_valued));
        o.insert("description".into(), json!(self.description));
        o.insert("required".into(), json!(self.required));
        if matches!(
            self.ty,
            AttrType::String | AttrType::Reference | AttrType::Binary
        ) {
            o.insert("caseExact".into(), json!(self.case_exact));
        }
        if !self.canonical_values.is_empty() {
            o.insert("canonicalValues".into(), json!(self.canonical_values));
        }
        if !self.reference_types.is_empty() {
            o.insert("referenceTypes".into(), json!(self.reference_types));
        }
        o.insert(
            "mutability".into(),
            json!(match self.mutability {
                Mutability::ReadOnly => "readOnly",
                Mutability::ReadWrite => "readWrite",
                Mutability::Immutable => "immutable",
                Mutability::WriteOnly => "writeOnly",
            }),
        );
        o.insert(
            "returned".into(),
            json!(match self.returned {
                Returned::Always => "always",
                Returned::Never => "never",
                Returned::Default => "default",
                Returned::Request => "request",
            }),
        );
        o.insert(
            "uniqueness".into(),
            json!(match self.uniqueness {
                Uniqueness::None => "none",
                Uniqueness::Server => "server",
                Uniqueness::Global => "global",
            }),
        );
        if self.ty == AttrType::Complex {
            let subs: Vec<Value> = self.sub_attributes.iter().map(AttrDef::to_json).collect();
            o.insert("subAttributes".into(), Value::Array(subs));
        }
        Value::Object(o)
    }
}

fn find_in(attrs: &'static [AttrDef], name: &str) -> Option<&'static AttrDef> {
    attrs.iter().find(|a| a.name.eq_ignore_ascii_case(name))
}

/// A schema: an id (URN) and its attributes.
#[derive(Debug)]
pub struct SchemaDef {
    /// The schema URN.
    pub id: &'static str,
    /// Short name.
    pub name: &'static str,
    /// Description.
    pub description: &'static str,
    /// Top-level attributes.
    pub attributes: &'static [AttrDef],
}

impl SchemaDef {
    /// Finds a top-level attribute by case-insensitive name.
    pub fn attr(&'static self, name: &str) -> Option<&'static AttrDef> {
        find_in(self.attributes, name)
    }

    /// The `/Schemas/{id}` document.
    pub fn to_json(&self, base_url: &str) -> Value {
        json!({
            "schemas": [SCHEMA_SCHEMA],
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "attributes": self.attributes.iter().map(AttrDef::to_json).collect::<Vec<_>>(),
            "meta": {
                "resourceType": "Schema",
                "location": format!("{base_url}/Schemas/{}", self.id),
            }
        })
    }
}

const fn base(name: &'static str, ty: AttrType, description: &'static str) -> AttrDef {
    AttrDef {
        name,
        ty,
        multi_valued: false,
        required: false,
        case_exact: false,
        mutability: Mutability::ReadWrite,
        returned: Returned::Default,
        uniqueness: Uniqueness::None,
        description,
        canonical_values: &[],
        reference_types: &[],
        sub_attributes: &[],
    }
}

const fn string(name: &'static str, description: &'static str) -> AttrDef {
    base(name, AttrType::String, description)
}

const fn boolean(name: &'static str, description: &'static str) -> AttrDef {
    base(name, AttrType::Boolean, description)
}

const fn complex(
    name: &'static str,
    description: &'static str,
    subs: &'static [AttrDef],
) -> AttrDef {
    let mut a = base(name, AttrType::Complex, description);
    a.sub_attributes = subs;
    a
}

const fn multi(mut a: AttrDef) -> AttrDef {
    a.multi_valued = true;
    a
}

const fn read_only(mut a: AttrDef) -> AttrDef {
    a.mutability = Mutability::ReadOnly;
    a
}

const fn immutable(mut a: AttrDef) -> AttrDef {
    a.mutability = Mutability::Immutable;
    a
}

const fn reference(
    name: &'static str,
    description: &'static str,
    types: &'static [&'static str],
) -> AttrDef {
    let mut a = base(name, AttrType::Reference, description);
    a.reference_types = types;
    a
}

const fn canonical(mut a: AttrDef, values: &'static [&'static str]) -> AttrDef {
    a.canonical_values = values;
    a
}

/// Sub-attributes shared by the simple multi-valued attributes (emails, phoneNumbers, ...).
macro_rules! mv_subs {
    ($value:expr, $types:expr) => {
        &[
            $value,
            string(
                "display",
                "A human-readable name, primarily used for display purposes.",
            ),
            canonical(
                string("type", "A label indicating the attribute's function."),
                $types,
            ),
            boolean(
                "primary",
                "Indicates the 'primary' or preferred attribute value.",
            ),
        ]
    };
}

const NAME_SUBS: &[AttrDef] = &[
    string(
        "formatted",
        "The full name, including all middle names, titles, and suffixes.",
    ),
    string("familyName", "The family name of the User."),
    string("givenName", "The given name of the User."),
    string("middleName", "The middle name(s) of the User."),
    string("honorificPrefix", "The honorific prefix(es) of the User."),
    string("honorificSuffix", "The honorific suffix(es) of the User."),
];

const EMAIL_SUBS: &[AttrDef] = mv_subs!(
    string("value", "Email address for the User."),
    &["work", "home", "other"]
);
const PHONE_SUBS: &[AttrDef] = mv_subs!(
    string("value", "Phone number of the User."),
    &["work", "home", "mobile", "fax", "pager", "other"]
);
const IMS_SUBS: &[AttrDef] = mv_subs!(
    string("value", "Instant messaging address for the User."),
    &["aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo"]
);
const PHOTO_SUBS: &[AttrDef] = mv_subs!(
    reference("value", "URL of a photo of the User.", &["external"]),
    &["photo", "thumbnail"]
);
const ADDRESS_SUBS: &[AttrDef] = &[
    string("formatted", "The full mailing address."),
    string("streetAddress", "The full street address component."),
    string("locality", "The city or locality component."),
    string("region", "The state or region component."),
    string("postalCode", "The zip code or postal code component."),
    string("country", "The country name component."),
    canonical(
        string("type", "A label indicating the attribute's function."),
        &["work", "home", "other"],
    ),
    boolean(
        "primary",
        "Indicates the 'primary' or preferred attribute value.",
    ),
];
const USER_GROUP_SUBS: &[AttrDef] = &[
    read_only(string("value", "The identifier of the User's group.")),
    read_only(reference(
        "$ref",
        "The URI of the corresponding 'Group' resource.",
        &["User", "Group"],
    )),
    read_only(string(
        "display",
        "A human-readable name, primarily used for display purposes.",
    )),
    read_only(canonical(
        string("type", "A label indicating the attribute's function."),
        &["direct", "indirect"],
    )),
];
const PLAIN_MV_SUBS: &[AttrDef] = mv_subs!(string("value", "The value of the attribute."), &[]);
const CERT_SUBS: &[AttrDef] = mv_subs!(
    base(
        "value",
        AttrType::Binary,
        "The value of an X.509 certificate."
    ),
    &[]
);

const USER_ATTRS: &[AttrDef] = &[
    {
        let mut a = string(
            "userName",
            "Unique identifier for the User, typically used by the user to directly authenticate to the service provider.",
        );
        a.required = true;
        a.uniqueness = Uniqueness::Server;
        a
    },
    complex("name", "The components of the user's real name.", NAME_SUBS),
    string(
        "displayName",
        "The name of the User, suitable for display to end-users.",
    ),
    string(
        "nickName",
        "The casual way to address the user in real life.",
    ),
    reference(
        "profileUrl",
        "A fully qualified URL pointing to a page representing the User's online profile.",
        &["external"],
    ),
    string("title", "The user's title, such as \"Vice President\"."),
    string(
        "userType",
        "Used to identify the relationship between the organization and the user.",
    ),
    string(
        "preferredLanguage",
        "Indicates the User's preferred written or spoken language.",
    ),
    string("locale", "Used to indicate the User's default location."),
    string(
        "timezone",
        "The User's time zone in the 'Olson' time zone database format.",
    ),
    boolean(
        "active",
        "A Boolean value indicating the User's administrative status.",
    ),
    {
        let mut a = string("password", "The User's cleartext password.");
        a.mutability = Mutability::WriteOnly;
        a.returned = Returned::Never;
        a
    },
    multi(complex(
        "emails",
        "Email addresses for the user.",
        EMAIL_SUBS,
    )),
    multi(complex(
        "phoneNumbers",
        "Phone numbers for the User.",
        PHONE_SUBS,
    )),
    multi(complex(
        "ims",
        "Instant messaging addresses for the User.",
        IMS_SUBS,
    )),
    multi(complex("photos", "URLs of photos of the User.", PHOTO_SUBS)),
    multi(complex(
        "addresses",
        "A physical mailing address for this User.",
        ADDRESS_SUBS,
    )),
    read_only(multi(complex(
        "groups",
        "A list of groups to which the user belongs.",
        USER_GROUP_SUBS,
    ))),
    multi(complex(
        "entitlements",
        "A list of entitlements for the User.",
        PLAIN_MV_SUBS,
    )),
    multi(complex(
        "roles",
        "A list of roles for the User.",
        PLAIN_MV_SUBS,
    )),
    multi(complex(
        "x509Certificates",
        "A list of certificates issued to the User.",
        CERT_SUBS,
    )),
];

const MANAGER_SUBS: &[AttrDef] = &[
    string(
        "value",
        "The id of the SCIM resource representing the User's manager.",
    ),
    reference(
        "$ref",
        "The URI of the SCIM resource representing the User's manager.",
        &["User"],
    ),
    read_only(string(
        "displayName",
        "The displayName of the User's manager.",
    )),
];

const ENTERPRISE_ATTRS: &[AttrDef] = &[
    string(
        "employeeNumber",
        "Numeric or alphanumeric identifier assigned to a person.",
    ),
    string("costCenter", "Identifies the name of a cost center."),
    string("organization", "Identifies the name of an organization."),
    string("division", "Identifies the name of a division."),
    string("department", "Identifies the name of a department."),
    complex("manager", "The User's manager.", MANAGER_SUBS),
];

const MEMBER_SUBS: &[AttrDef] = &[
    immutable(string("value", "Identifier of the member of this Group.")),
    immutable(reference(
        "$ref",
        "The URI corresponding to a SCIM resource that is a member of this Group.",
        &["User", "Group"],
    )),
    read_only(string("display", "A human-readable name for the member.")),
    immutable(canonical(
        string("type", "A label indicating the type of resource."),
        &["User", "Group"],
    )),
];

const GROUP_ATTRS: &[AttrDef] = &[
    {
        let mut a = string("displayName", "A human-readable name for the Group.");
        a.required = true;
        a.uniqueness = Uniqueness::Server;
        a
    },
    multi(complex(
        "members",
        "A list of members of the Group.",
        MEMBER_SUBS,
    )),
];

/// The core User schema.
pub static USER: SchemaDef = SchemaDef {
    id: USER_SCHEMA,
    name: "User",
    description: "User Account",
    attributes: USER_ATTRS,
};

/// The enterprise User extension.
pub static ENTERPRISE_USER: SchemaDef = SchemaDef {
    id: ENTERPRISE_USER_SCHEMA,
    name: "EnterpriseUser",
    description: "Enterprise User",
    attributes: ENTERPRISE_ATTRS,
};

/// The core Group schema.
pub static GROUP: SchemaDef = SchemaDef {
    id: GROUP_SCHEMA,
    name: "Group",
    description: "Group",
    attributes: GROUP_ATTRS,
};

const META_SUBS: &[AttrDef] = &[
    read_only(string(
        "resourceType",
        "The name of the resource type of the resource.",
    )),
    read_only(base(
        "created",
        AttrType::DateTime,
        "When the resource was added.",
    )),
    read_only(base(
        "lastModified",
        AttrType::DateTime,
        "When the resource was last updated.",
    )),
    read_only(reference("location", "The URI of the resource.", &["uri"])),
    {
        let mut a = read_only(string("version", "The version (ETag) of the resource."));
        a.case_exact = true;
        a
    },
];

/// The common attributes of every resource (RFC 7643 §3.1). They are not part of any schema
/// document, but filters, sorting and projection address them.
static COMMON_ATTRS: &[AttrDef] = &[
    {
        let mut a = read_only(string(
            "id",
            "Unique identifier for the resource, assigned by the service provider.",
        ));
        a.case_exact = true;
        a.returned = Returned::Always;
        a.uniqueness = Uniqueness::Server;
        a
    },
    {
        let mut a = string(
            "externalId",
            "Identifier of the resource as defined by the provisioning client.",
        );
        a.case_exact = true;
        a
    },
    read_only(complex("meta", "Resource metadata.", META_SUBS)),
    {
        let mut a = read_only(multi(reference(
            "schemas",
            "The schemas of the resource.",
            &["uri"],
        )));
        a.returned = Returned::Always;
        a.case_exact = true;
        a
    },
];

/// The common attributes (`id`, `externalId`, `meta`, `schemas`; RFC 7643 §3.1).
pub fn common_attributes() -> &'static [AttrDef] {
    COMMON_ATTRS
}

/// The two resource types this service provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// `/Users`.
    User,
    /// `/Groups`.
    Group,
}

impl ResourceKind {
    /// The resource type name (`User`, `Group`).
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::User => "User",
            ResourceKind::Group => "Group",
        }
    }

    /// The endpoint path segment (`/Users`).
    pub fn endpoint(self) -> &'static str {
        match self {
            ResourceKind::User => "/Users",
            ResourceKind::Group => "/Groups",
        }
    }

    /// The core schema.
    pub fn core(self) -> &'static SchemaDef {
        match self {
            ResourceKind::User => &USER,
            ResourceKind::Group => &GROUP,
        }
    }

    /// The schema extensions (never required here).
    pub fn extensions(self) -> &'static [&'static SchemaDef] {
        static USER_EXTENSIONS: [&SchemaDef; 1] = [&ENTERPRISE_USER];
        match self {
            ResourceKind::User => &USER_EXTENSIONS,
            ResourceKind::Group => &[],
        }
    }

    /// Finds the extension schema whose URN equals `urn` (case-insensitively).
    pub fn extension(self, urn: &str) -> Option<&'static SchemaDef> {
        self.extensions()
            .iter()
            .copied()
            .find(|s| s.id.eq_ignore_ascii_case(urn))
    }

    /// Whether `urn` names the core schema or one of the extensions.
    pub fn knows_schema(self, urn: &str) -> bool {
        self.core().id.eq_ignore_ascii_case(urn) || self.extension(urn).is_some()
    }

    /// Resolves a top-level attribute: a common attribute, a core attribute, or (with `urn`)
    /// an extension attribute. Returns the schema that owns it (`None` for common attributes
    /// and the core schema) and the definition.
    pub fn resolve(self, urn: Option<&str>, name: &str) -> Option<Resolved> {
        match urn {
            Some(u) if self.core().id.eq_ignore_ascii_case(u) => {
                self.core().attr(name).map(|def| Resolved {
                    extension: None,
                    def,
                })
            }
            Some(u) => {
                let ext = self.extension(u)?;
                ext.attr(name).map(|def| Resolved {
                    extension: Some(ext),
                    def,
                })
            }
            None => find_in(COMMON_ATTRS, name)
                .or_else(|| self.core().attr(name))
                .map(|def| Resolved {
                    extension: None,
                    def,
                }),
        }
    }

    /// The `/ResourceTypes/{name}` document.
    pub fn resource_type_json(self, base_url: &str) -> Value {
        let exts: Vec<Value> = self
            .extensions()
            .iter()
            .map(|s| json!({"schema": s.id, "required": false}))
            .collect();
        let mut doc = json!({
            "schemas": [RESOURCE_TYPE_SCHEMA],
            "id": self.name(),
            "name": self.name(),
            "endpoint": self.endpoint(),
            "description": match self { ResourceKind::User => "User Account", ResourceKind::Group => "Group" },
            "schema": self.core().id,
            "meta": {
                "resourceType": "ResourceType",
                "location": format!("{base_url}/ResourceTypes/{}", self.name()),
            }
        });
        if !exts.is_empty() {
            doc["schemaExtensions"] = Value::Array(exts);
        }
        doc
    }
}

/// A resolved top-level attribute.
#[derive(Debug, Clone, Copy)]
pub struct Resolved {
    /// The extension schema that owns the attribute, if any.
    pub extension: Option<&'static SchemaDef>,
    /// The attribute definition.
    pub def: &'static AttrDef,
}

/// Every schema served at `/Schemas`.
pub fn all_schemas() -> [&'static SchemaDef; 3] {
    [&USER, &GROUP, &ENTERPRISE_USER]
}

/// Finds a schema document by URN (case-insensitive).
pub fn schema_by_id(id: &str) -> Option<&'static SchemaDef> {
    all_schemas()
        .into_iter()
        .find(|s| s.id.eq_ignore_ascii_case(id))
}
