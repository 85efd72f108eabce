//! `/ServiceProviderConfig`, `/ResourceTypes` and `/Schemas` (RFC 7644 §4), generated from the
//! schema definitions in the `scim` crate and the limits in force.

use scim::list::{CURSOR_TIMEOUT_SECS, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use scim::schema::{self, LIST_RESPONSE_SCHEMA, SPC_SCHEMA};
use scim::{ResourceKind, ScimError};
use serde_json::{Value, json};

use crate::state::Limits;

/// The ServiceProviderConfig document.
pub(crate) fn service_provider_config(base: &str, limits: &Limits) -> Value {
    json!({
        "schemas": [SPC_SCHEMA],
        "documentationUri": "https://github.com/teamcity-scim/teamcity-scim/blob/main/docs/API.md",
        "patch": {"supported": true},
        "bulk": {
            "supported": true,
            "maxOperations": limits.bulk_max_operations,
            "maxPayloadSize": limits.bulk_max_payload,
        },
        "filter": {"supported": true, "maxResults": MAX_PAGE_SIZE},
        "changePassword": {"supported": false},
        "sort": {"supported": true},
        "etag": {"supported": true},
        "pagination": {
            "cursor": true,
            "index": true,
            "defaultPaginationMethod": "index",
            "defaultPageSize": DEFAULT_PAGE_SIZE,
            "maxPageSize": MAX_PAGE_SIZE,
            "cursorTimeout": CURSOR_TIMEOUT_SECS,
        },
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "Authentication with a bearer token issued by `teamcity-scim token create`.",
            "primary": true,
        }],
        "meta": {
            "resourceType": "ServiceProviderConfig",
            "location": format!("{base}/ServiceProviderConfig"),
        },
    })
}

fn list_of(items: Vec<Value>) -> Value {
    json!({
        "schemas": [LIST_RESPONSE_SCHEMA],
        "totalResults": items.len(),
        "itemsPerPage": items.len(),
        "startIndex": 1,
        "Resources": items,
    })
}

const KINDS: [ResourceKind; 2] = [ResourceKind::User, ResourceKind::Group];

/// `/ResourceTypes`.
pub(crate) fn resource_types(base: &str) -> Value {
    list_of(KINDS.iter().map(|k| k.resource_type_json(base)).collect())
}

/// `/ResourceTypes/{id}`.
pub(crate) fn resource_type(base: &str, id: &str) -> Result<Value, ScimError> {
    KINDS
        .iter()
        .find(|k| k.name().eq_ignore_ascii_case(id))
        .map(|k| k.resource_type_json(base))
        .ok_or_else(|| {
            ScimError::not_found(format!("no resource type `{id}`; there are User and Group"))
        })
}

/// `/Schemas`.
pub(crate) fn schemas(base: &str) -> Value {
    list_of(
        schema::all_schemas()
            .iter()
            .map(|s| s.to_json(base))
            .collect(),
    )
}

/// `/Schemas/{id}`.
pub(crate) fn schema_doc(base: &str, id: &str) -> Result<Value, ScimError> {
    schema::schema_by_id(id)
        .map(|s| s.to_json(base))
        .ok_or_else(|| ScimError::not_found(format!("no schema `{id}`")))
}
