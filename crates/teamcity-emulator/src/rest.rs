//! The `/app/rest` routes: TeamCity's paths, methods, content types and
//! status codes for users, groups, memberships, roles, tokens, projects and
//! server info.
//!
//! Handlers parse the request the way the REST plugin does (`UserRequest`,
//! `GroupRequest`, `RoleRequest`, `DataUpdater`) and return JSON or a
//! [`TcError`]. They must not hold the state lock across an `.await`.

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};

use crate::Emulator;
use crate::errors::{TcError, text_response};
use crate::fields::Fields;
use crate::state::{ALL_USERS_GROUP, GroupRec, State, TokenRec, render_role, render_roles};

type Q = Query<HashMap<String, String>>;
type Res = Result<Response, TcError>;

/// Builds the `/app/rest` router.
pub(crate) fn routes(emu: Emulator) -> Router {
    Router::new()
        .route("/server", get(server))
        .route("/users", get(list_users).post(create_user))
        .route(
            "/users/{u}",
            get(get_user).put(update_user).delete(delete_user),
        )
        .route(
            "/users/{u}/{field}",
            get(get_user_field)
                .put(set_user_field)
                .delete(delete_user_field),
        )
        .route("/users/{u}/properties", get(user_properties))
        .route(
            "/users/{u}/properties/{name}",
            get(get_user_property)
                .put(set_user_property)
                .delete(delete_user_property),
        )
        .route(
            "/users/{u}/roles",
            get(user_roles)
                .put(replace_user_roles)
                .post(add_user_role_body),
        )
        .route(
            "/users/{u}/roles/{role}/{scope}",
            get(get_user_role)
                .put(put_user_role)
                .post(post_user_role)
                .delete(delete_user_role),
        )
        .route(
            "/users/{u}/groups",
            get(user_groups)
                .put(replace_user_groups)
                .post(add_user_group),
        )
        .route(
            "/users/{u}/groups/{g}",
            get(get_user_group).delete(delete_user_group),
        )
        .route(
            "/users/{u}/logout",
            post(logout_user)
                .get(get_logout_field)
                .put(set_logout_field)
                .delete(delete_logout_field),
        )
        .route("/users/{u}/debug/rememberMe", delete(delete_remember_me))
        .route("/users/{u}/tokens", get(list_tokens).post(create_token))
        .route(
            "/users/{u}/tokens/{name}",
            delete(delete_token).post(create_token_named),
        )
        .route("/userGroups", get(list_groups).post(create_group))
        .route("/userGroups/{g}", get(get_group).delete(delete_group))
        .route(
            "/userGroups/{g}/roles",
            get(group_roles)
                .put(replace_group_roles)
                .post(add_group_role_body),
        )
        .route(
            "/userGroups/{g}/roles/{role}/{scope}",
            get(get_group_role)
                .post(post_group_role)
                .delete(delete_group_role),
        )
        .route("/userGroups/{g}/properties", get(group_properties))
        .route(
            "/userGroups/{g}/properties/{name}",
            get(get_group_property)
                .put(set_group_property)
                .delete(delete_group_property),
        )
        .route("/roles", get(list_roles))
        .route("/projects", get(list_projects))
        .route("/projects/{p}", get(get_project))
        .with_state(emu)
}

// ---- content negotiation -----------------------------------------------

fn accepts(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .any(|v| v == mime || (mime == "text/plain" && (v == "*/*" || v == "text/*")))
}

/// JSON endpoints produce XML first: without an explicit JSON `Accept` a real
/// server answers XML, which the emulator does not speak, so it refuses.
fn need_json(headers: &HeaderMap) -> Result<(), TcError> {
    if accepts(headers, "application/json") {
        Ok(())
    } else {
        Err(TcError::web(
            StatusCode::NOT_ACCEPTABLE,
            "HTTP 406 Not Acceptable (the emulator only produces application/json; send Accept: application/json)",
        ))
    }
}

/// Single-value endpoints produce `text/plain` only.
fn need_text(headers: &HeaderMap) -> Result<(), TcError> {
    if headers.get(header::ACCEPT).is_none() || accepts(headers, "text/plain") {
        Ok(())
    } else {
        Err(TcError::web(
            StatusCode::NOT_ACCEPTABLE,
            "HTTP 406 Not Acceptable",
        ))
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, TcError> {
    if content_type(headers) != "application/json" {
        return Err(TcError::web(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "HTTP 415 Unsupported Media Type",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| TcError::bad_request(format!("Could not parse JSON body: {e}")))
}

fn text_body(headers: &HeaderMap, body: &Bytes) -> Result<String, TcError> {
    if content_type(headers) != "text/plain" {
        return Err(TcError::web(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "HTTP 415 Unsupported Media Type",
        ));
    }
    String::from_utf8(body.to_vec()).map_err(|_| TcError::bad_request("Body is not UTF-8"))
}

fn fields(q: &HashMap<String, String>, default: Fields) -> Result<Fields, TcError> {
    Ok(Fields::parse(q.get("fields").map(String::as_str), default)?)
}

fn ok_json(v: Json) -> Res {
    Ok((StatusCode::OK, axum::Json(v)).into_response())
}

fn ok_text(v: String) -> Res {
    Ok(text_response(StatusCode::OK, v))
}

fn no_content() -> Res {
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn teamcity_time(t: time::OffsetDateTime) -> String {
    let f = time::macros::format_description!(
        "[year][month][day]T[hour][minute][second][offset_hour sign:mandatory][offset_minute]"
    );
    t.format(&f).unwrap_or_default()
}

// ---- posted entities -----------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct PostedProperty {
    name: Option<String>,
    value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PostedProperties {
    #[serde(default)]
    property: Vec<PostedProperty>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PostedRole {
    role_id: Option<String>,
    scope: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PostedRoles {
    #[serde(default)]
    role: Vec<PostedRole>,
}

#[derive(Debug, Default, Deserialize)]
struct PostedGroupRef {
    key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PostedGroups {
    #[serde(default)]
    group: Vec<PostedGroupRef>,
}

#[derive(Debug, Default, Deserialize)]
struct PostedUser {
    id: Option<u64>,
    username: Option<String>,
    name: Option<String>,
    email: Option<String>,
    password: Option<String>,
    properties: Option<PostedProperties>,
    roles: Option<PostedRoles>,
    groups: Option<PostedGroups>,
}

#[derive(Debug, Default, Deserialize)]
struct PostedUsers {
    #[serde(default)]
    user: Vec<PostedUser>,
}

#[derive(Debug, Default, Deserialize)]
struct PostedGroup {
    key: Option<String>,
    name: Option<String>,
    description: Option<String>,
    roles: Option<PostedRoles>,
    properties: Option<PostedProperties>,
    users: Option<PostedUsers>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PostedToken {
    name: Option<String>,
    expiration_time: Option<String>,
}

fn posted_props(p: &PostedProperties) -> Result<BTreeMap<String, String>, TcError> {
    let mut out = BTreeMap::new();
    for prop in &p.property {
        let name = prop
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| TcError::bad_request("Property name cannot be empty."))?;
        out.insert(name, prop.value.clone().unwrap_or_default());
    }
    Ok(out)
}

fn posted_roles(s: &State, r: &PostedRoles) -> Result<Vec<(String, String)>, TcError> {
    let mut out = Vec::new();
    for role in &r.role {
        let id = role.role_id.clone().unwrap_or_default();
        s.check_role(&id)?;
        let scope = role
            .scope
            .as_deref()
            .ok_or_else(|| TcError::internal("java.lang.NullPointerException", "scope is null"))?;
        out.push((id, s.parse_scope(scope)?));
    }
    Ok(out)
}

fn posted_group_keys(s: &State, g: &PostedGroups) -> Result<Vec<String>, TcError> {
    let mut out = Vec::new();
    for group in &g.group {
        let key = group.key.clone().ok_or_else(|| {
            TcError::bad_request("No 'key' attribute is supplied for the posted group.")
        })?;
        if !s.groups.contains_key(&key) {
            return Err(TcError::not_found(format!(
                "No group is found by key '{key}'"
            )));
        }
        out.push(key);
    }
    Ok(out)
}

fn posted_user_id(s: &State, u: &PostedUser) -> Result<u64, TcError> {
    if let Some(id) = u.id {
        return s
            .users
            .contains_key(&id)
            .then_some(id)
            .ok_or_else(|| TcError::not_found("User not found"));
    }
    if let Some(name) = &u.username {
        return s
            .user_by_username(name)
            .map(|u| u.id)
            .ok_or_else(|| TcError::not_found("User not found"));
    }
    Err(TcError::bad_request(
        "No 'id' or 'username' attribute is supplied for the posted user.",
    ))
}

fn duplicate_username(name: &str) -> (&'static str, String) {
    (
        "jetbrains.buildServer.users.DuplicateUserAccountException",
        format!("The specified username '{name}' is already in use by some other user."),
    )
}

// ---- server --------------------------------------------------------------

async fn server(AxState(emu): AxState<Emulator>, h: HeaderMap) -> Res {
    need_json(&h)?;
    let now = teamcity_time(time::OffsetDateTime::now_utc());
    ok_json(json!({
        "version": "2025.03 (build 186049)",
        "versionMajor": 2025,
        "versionMinor": 3,
        "buildNumber": "186049",
        "startTime": emu.inner.started,
        "currentTime": now,
        "buildDate": "20250320T000000+0000",
        "internalId": "teamcity-emulator",
        "role": "main_node",
        "webUrl": "http://localhost",
        "href": "/app/rest/server",
        // Server.java renders these links by default (2024.03 source).
        "projects": {"href": "/app/rest/projects"},
        "vcsRoots": {"href": "/app/rest/vcs-roots"},
        "builds": {"href": "/app/rest/builds"},
        "users": {"href": "/app/rest/users"},
        "userGroups": {"href": "/app/rest/userGroups"},
        "agents": {"href": "/app/rest/agents"},
        "buildQueue": {"href": "/app/rest/buildQueue"},
        "agentPools": {"href": "/app/rest/agentPools"},
        "investigations": {"href": "/app/rest/investigations"},
        "mutes": {"href": "/app/rest/mutes"},
        "nodes": {"href": "/app/rest/server/nodes"},
    }))
}

// ---- users ---------------------------------------------------------------

async fn list_users(AxState(emu): AxState<Emulator>, h: HeaderMap, Query(q): Q) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let ids = s.find_users(q.get("locator").map(String::as_str))?;
    ok_json(s.render_users(&ids, &f))
}

async fn get_user(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let id = s.find_user_item(&u)?;
    ok_json(s.render_user(&s.users[&id], &f))
}

async fn create_user(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Query(q): Q,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let posted: PostedUser = json_body(&h, &body)?;
    let mut s = emu.state();
    let username = posted.username.clone().unwrap_or_default();
    if username.is_empty() {
        return Err(TcError::bad_request(
            "Username must not be empty when creating user.",
        ));
    }
    if posted.password.as_deref().unwrap_or("").is_empty() {
        return Err(TcError::bad_request(
            "Password must not be empty when creating user.",
        ));
    }
    if s.user_by_username(&username).is_some() {
        let (ce, cm) = duplicate_username(&username);
        return Err(TcError::bad_request(
            "Cannot create user as user with the same username already exists",
        )
        .caused_by(ce, cm));
    }
    // As `DataUpdater.createUser`: the properties are part of the new account; roles and
    // groups are applied afterwards (`DataUpdater.modify`), so a failure there leaves the user
    // created, marker included. A failed role gives 400 PartialUpdateError; a group key that does
    // not exist throws `NotFoundException` from `Group.getFromPosted`, which `modify` does not
    // catch: 404 `No group is found by key '…'`.
    let props = posted.properties.as_ref().map(posted_props).transpose()?;
    let id = s.insert_user(&username, posted.name.as_deref(), posted.email.as_deref());
    if let Some(p) = props {
        s.users.get_mut(&id).expect("just inserted").properties = p;
    }
    let roles = posted
        .roles
        .as_ref()
        .map(|r| posted_roles(&s, r))
        .transpose();
    let roles_failed = match roles {
        Ok(Some(r)) => {
            s.users.get_mut(&id).expect("just inserted").roles = r.into_iter().collect();
            None
        }
        Ok(None) => None,
        Err(e) => Some(e),
    };
    if let Some(g) = &posted.groups {
        let keys = posted_group_keys(&s, g)?;
        s.set_user_groups(id, keys);
    }
    if let Some(e) = roles_failed {
        return Err(TcError::partial(format!(
            "Partial error updating user: {}",
            e.message
        )));
    }
    tracing::debug!(user.id = id, "emulator created user");
    ok_json(s.render_user(&s.users[&id], &f))
}

async fn update_user(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    Query(q): Q,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let posted: PostedUser = json_body(&h, &body)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    if let Some(name) = &posted.username {
        rename(&mut s, id, name)?;
    }
    let props = posted.properties.as_ref().map(posted_props).transpose()?;
    let roles = posted
        .roles
        .as_ref()
        .map(|r| posted_roles(&s, r))
        .transpose()?;
    let groups = posted
        .groups
        .as_ref()
        .map(|g| posted_group_keys(&s, g))
        .transpose()?;
    let user = s.users.get_mut(&id).expect("found");
    if let Some(n) = posted.name {
        user.name = Some(n);
    }
    if let Some(e) = posted.email {
        user.email = Some(e);
    }
    if posted.password.is_some() {
        user.has_password = true;
        user.password_changes += 1;
    }
    if let Some(p) = props {
        user.properties = p;
    }
    if let Some(r) = roles {
        user.roles = r.into_iter().collect();
    }
    if let Some(g) = groups {
        s.set_user_groups(id, g);
    }
    ok_json(s.render_user(&s.users[&id], &f))
}

fn rename(s: &mut State, id: u64, name: &str) -> Result<(), TcError> {
    if name.is_empty() {
        return Err(TcError::internal(
            "java.lang.IllegalArgumentException",
            "Username cannot be empty",
        ));
    }
    if let Some(other) = s.user_by_username(name)
        && other.id != id
    {
        let (ce, cm) = duplicate_username(name);
        return Err(TcError::internal(ce, cm));
    }
    s.set_username(id, name);
    Ok(())
}

async fn delete_user(AxState(emu): AxState<Emulator>, Path(u): Path<String>) -> Res {
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    if id == s.admin_id {
        return Err(TcError::forbidden(
            "You cannot delete user that has more permissions than you",
        ));
    }
    s.remove_user(id);
    no_content()
}

async fn get_user_field(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((u, field)): Path<(String, String)>,
) -> Res {
    need_text(&h)?;
    let s = emu.state();
    let id = s.find_user_item(&u)?;
    let user = &s.users[&id];
    let v = match field.as_str() {
        "id" => Some(user.id.to_string()),
        "name" => user.name.clone(),
        "username" => Some(user.username.clone()),
        "email" => user.email.clone(),
        _ => {
            return Err(TcError::bad_request(format!(
                "Unknown field '{field}'. Supported fields are: id, name, username, email"
            )));
        }
    };
    match v {
        Some(v) => ok_text(v),
        None => no_content(),
    }
}

async fn set_user_field(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((u, field)): Path<(String, String)>,
    body: Bytes,
) -> Res {
    need_text(&h)?;
    let value = text_body(&h, &body)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    match field.as_str() {
        "username" => rename(&mut s, id, &value)?,
        "name" => s.users.get_mut(&id).expect("found").name = Some(value.clone()),
        "email" => s.users.get_mut(&id).expect("found").email = Some(value.clone()),
        "password" => {
            let user = s.users.get_mut(&id).expect("found");
            user.has_password = true;
            user.password_changes += 1;
            return no_content();
        }
        _ => {
            return Err(TcError::bad_request(format!(
                "Changing field '{field}' is not supported. Supported fields are: username, name, email, password"
            )));
        }
    }
    let user = &s.users[&id];
    ok_text(if field == "username" {
        user.username.clone()
    } else {
        value
    })
}

async fn delete_user_field(
    AxState(emu): AxState<Emulator>,
    Path((u, field)): Path<(String, String)>,
) -> Res {
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    let user = s.users.get_mut(&id).expect("found");
    match field.as_str() {
        "name" => user.name = None,
        "email" => user.email = None,
        "password" => user.has_password = false,
        _ => {
            return Err(TcError::bad_request(format!(
                "Removing field '{field}' is not supported. Supported fields are: name, email, password"
            )));
        }
    }
    no_content()
}

async fn user_properties(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let id = s.find_user_item(&u)?;
    ok_json(crate::state::render_properties(
        &s.users[&id].properties,
        &format!("/app/rest/users/id:{id}/properties"),
        &f,
    ))
}

async fn get_user_property(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((u, name)): Path<(String, String)>,
) -> Res {
    need_text(&h)?;
    let s = emu.state();
    let id = s.find_user_item(&u)?;
    s.users[&id]
        .properties
        .get(&name)
        .map(|v| text_response(StatusCode::OK, v.clone()))
        .ok_or_else(|| TcError::not_found(format!("No property with name '{name}' is found.")))
}

async fn set_user_property(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((u, name)): Path<(String, String)>,
    body: Bytes,
) -> Res {
    need_text(&h)?;
    let value = text_body(&h, &body)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    if name.is_empty() {
        return Err(TcError::bad_request("Property name cannot be empty."));
    }
    s.users
        .get_mut(&id)
        .expect("found")
        .properties
        .insert(name, value.clone());
    ok_text(value)
}

async fn delete_user_property(
    AxState(emu): AxState<Emulator>,
    Path((u, name)): Path<(String, String)>,
) -> Res {
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    s.users
        .get_mut(&id)
        .expect("found")
        .properties
        .remove(&name);
    no_content()
}

// ---- user roles ------------------------------------------------------------

async fn user_roles(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let id = s.find_user_item(&u)?;
    ok_json(render_roles(
        &s.users[&id].roles,
        &format!("/app/rest/users/id:{id}"),
        &f,
    ))
}

async fn replace_user_roles(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let posted: PostedRoles = json_body(&h, &body)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    let roles = posted_roles(&s, &posted)?;
    let user = s.users.get_mut(&id).expect("found");
    user.roles = roles.into_iter().collect();
    ok_json(render_roles(
        &s.users[&id].roles,
        &format!("/app/rest/users/id:{id}"),
        &Fields::Long,
    ))
}

async fn add_user_role_body(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let posted: PostedRole = json_body(&h, &body)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    let (role, scope) = posted_roles(&s, &PostedRoles { role: vec![posted] })?.remove(0);
    s.users
        .get_mut(&id)
        .expect("found")
        .roles
        .insert((role.clone(), scope.clone()));
    ok_json(render_role(
        &role,
        &scope,
        &format!("/app/rest/users/id:{id}"),
        &Fields::Long,
    ))
}

fn user_role_target(
    s: &State,
    u: &str,
    role: &str,
    scope: &str,
) -> Result<(u64, String, String), TcError> {
    let id = s.find_user_item(u)?;
    s.check_role(role)?;
    let scope = s.parse_scope(scope)?;
    Ok((id, role.to_owned(), scope))
}

async fn get_user_role(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((u, role, scope)): Path<(String, String, String)>,
) -> Res {
    need_json(&h)?;
    let s = emu.state();
    let (id, role, scope) = user_role_target(&s, &u, &role, &scope)?;
    if !s.users[&id].roles.contains(&(role.clone(), scope.clone())) {
        return Err(TcError::not_found(format!(
            "User {u} does not have role with id: '{role}' and scope '{scope}'"
        )));
    }
    ok_json(render_role(
        &role,
        &scope,
        &format!("/app/rest/users/id:{id}"),
        &Fields::Long,
    ))
}

async fn put_user_role(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((u, role, scope)): Path<(String, String, String)>,
) -> Res {
    need_json(&h)?;
    let mut s = emu.state();
    let (id, role, scope) = user_role_target(&s, &u, &role, &scope)?;
    s.users
        .get_mut(&id)
        .expect("found")
        .roles
        .insert((role.clone(), scope.clone()));
    ok_json(render_role(
        &role,
        &scope,
        &format!("/app/rest/users/id:{id}"),
        &Fields::Long,
    ))
}

async fn post_user_role(
    AxState(emu): AxState<Emulator>,
    Path((u, role, scope)): Path<(String, String, String)>,
) -> Res {
    let mut s = emu.state();
    let (id, role, scope) = user_role_target(&s, &u, &role, &scope)?;
    s.users
        .get_mut(&id)
        .expect("found")
        .roles
        .insert((role, scope));
    no_content()
}

async fn delete_user_role(
    AxState(emu): AxState<Emulator>,
    Path((u, role, scope)): Path<(String, String, String)>,
) -> Res {
    let mut s = emu.state();
    let (id, role, scope) = user_role_target(&s, &u, &role, &scope)?;
    s.users
        .get_mut(&id)
        .expect("found")
        .roles
        .remove(&(role, scope));
    no_content()
}

// ---- user groups -------------------------------------------------------------

fn user_group_keys(s: &State, id: u64) -> Vec<String> {
    let mut keys = vec![ALL_USERS_GROUP.to_owned()];
    keys.extend(s.users[&id].groups.iter().cloned());
    keys
}

async fn user_groups(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let id = s.find_user_item(&u)?;
    ok_json(s.render_groups(&user_group_keys(&s, id), &f))
}

async fn replace_user_groups(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    Query(q): Q,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let posted: PostedGroups = json_body(&h, &body)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    let keys = posted_group_keys(&s, &posted)?;
    s.set_user_groups(id, keys);
    ok_json(s.render_groups(&user_group_keys(&s, id), &f))
}

async fn add_user_group(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    Query(q): Q,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let posted: PostedGroupRef = json_body(&h, &body)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    let key = posted_group_keys(
        &s,
        &PostedGroups {
            group: vec![posted],
        },
    )?
    .remove(0);
    s.add_member(id, &key);
    ok_json(s.render_group(&s.groups[&key], &f))
}

async fn get_user_group(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((u, g)): Path<(String, String)>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let id = s.find_user_item(&u)?;
    let key = s.find_group(&g)?;
    if !s.is_member(id, &key) {
        return Err(TcError::not_found("User does not belong to the group"));
    }
    ok_json(s.render_group(&s.groups[&key], &f))
}

async fn delete_user_group(
    AxState(emu): AxState<Emulator>,
    Path((u, g)): Path<(String, String)>,
) -> Res {
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    let key = s.find_group(&g)?;
    if !s.remove_member(id, &key) {
        return Err(TcError::not_found("User does not belong to the group"));
    }
    no_content()
}

// ---- sessions --------------------------------------------------------------------

/// `POST /users/{u}/logout`: ends the user's sessions (204). With the endpoint switched
/// off it is JAX-RS's 404 for an unknown URL, as on a server older than the endpoint.
async fn logout_user(AxState(emu): AxState<Emulator>, Path(u): Path<String>) -> Res {
    if !emu.logout_supported() {
        return Err(TcError::no_such_url());
    }
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    let user = s.users.get_mut(&id).expect("found");
    user.logouts = user.logouts.saturating_add(1);
    no_content()
}

/// `GET|PUT|DELETE /users/{u}/logout` are the `{field}` endpoints with field `logout`.
async fn get_logout_field(emu: AxState<Emulator>, h: HeaderMap, Path(u): Path<String>) -> Res {
    get_user_field(emu, h, Path((u, "logout".into()))).await
}

async fn set_logout_field(
    emu: AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    body: Bytes,
) -> Res {
    set_user_field(emu, h, Path((u, "logout".into())), body).await
}

async fn delete_logout_field(emu: AxState<Emulator>, Path(u): Path<String>) -> Res {
    delete_user_field(emu, Path((u, "logout".into()))).await
}

/// `DELETE /users/{u}/debug/rememberMe` (`UserRequest.deleteRememberMe`): `@Produces
/// text/plain`, void → 204.
async fn delete_remember_me(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
) -> Res {
    need_text(&h)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    let user = s.users.get_mut(&id).expect("found");
    user.remember_me_cleared = user.remember_me_cleared.saturating_add(1);
    no_content()
}

// ---- tokens --------------------------------------------------------------------

fn render_token(t: &TokenRec, value: Option<&str>, f: &Fields) -> Json {
    let mut m = serde_json::Map::new();
    if f.has("name", true, true) {
        m.insert("name".into(), json!(t.name));
    }
    if f.has("creationTime", false, true) {
        m.insert("creationTime".into(), json!(t.creation_time));
    }
    if let Some(exp) = &t.expiration_time
        && f.has("expirationTime", false, true)
    {
        m.insert("expirationTime".into(), json!(exp));
    }
    if let Some(v) = value {
        m.insert("value".into(), json!(v));
    }
    Json::Object(m)
}

async fn list_tokens(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let id = s.find_user_item(&u)?;
    let tokens = &s.users[&id].tokens;
    let mut m = serde_json::Map::new();
    if f.has("count", true, true) {
        m.insert("count".into(), json!(tokens.len()));
    }
    if f.has("token", true, true) {
        let tf = f.items("token");
        m.insert(
            "token".into(),
            Json::Array(tokens.iter().map(|t| render_token(t, None, &tf)).collect()),
        );
    }
    ok_json(Json::Object(m))
}

fn add_token(
    s: &mut State,
    id: u64,
    name: String,
    expiration: Option<String>,
) -> Result<Json, TcError> {
    if name.is_empty() {
        return Err(TcError::bad_request("name cannot be empty"));
    }
    if s.users[&id].tokens.iter().any(|t| t.name == name) {
        return Err(TcError::bad_request("Token already exists"));
    }
    // TeamCity's TCV2 form: base64 of `{"typ": "TCV2"}`, then two base64url parts.
    let mut rng = rand::rng();
    let token_id: [u8; 12] = rng.random();
    let secret: [u8; 32] = rng.random();
    let value = format!(
        "eyJ0eXAiOiAiVENWMiJ9.{}.{}",
        URL_SAFE_NO_PAD.encode(token_id),
        URL_SAFE_NO_PAD.encode(secret)
    );
    let rec = TokenRec {
        name,
        creation_time: teamcity_time(time::OffsetDateTime::now_utc()),
        expiration_time: expiration,
        value_sha256: Some(crate::token_digest(&value)),
    };
    let rendered = render_token(&rec, Some(&value), &Fields::Long);
    s.push_token(id, rec);
    Ok(rendered)
}

async fn create_token(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(u): Path<String>,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let posted: PostedToken = json_body(&h, &body)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    ok_json(add_token(
        &mut s,
        id,
        posted.name.unwrap_or_default(),
        posted.expiration_time,
    )?)
}

async fn create_token_named(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((u, name)): Path<(String, String)>,
) -> Res {
    need_json(&h)?;
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    ok_json(add_token(&mut s, id, name, None)?)
}

async fn delete_token(
    AxState(emu): AxState<Emulator>,
    Path((u, name)): Path<(String, String)>,
) -> Res {
    let mut s = emu.state();
    let id = s.find_user_item(&u)?;
    if !s.remove_token(id, &name) {
        return Err(TcError::not_found(format!(
            "No token found by name '{name}'"
        )));
    }
    no_content()
}

// ---- groups ----------------------------------------------------------------------

async fn list_groups(AxState(emu): AxState<Emulator>, h: HeaderMap, Query(q): Q) -> Res {
    need_json(&h)?;
    if q.contains_key("locator") {
        // GroupRequest.serveGroups takes no locator: JAX-RS ignores unknown parameters.
    }
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let keys: Vec<String> = s.groups.keys().cloned().collect();
    ok_json(s.render_groups(&keys, &f))
}

async fn get_group(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(g): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let key = s.find_group(&g)?;
    ok_json(s.render_group(&s.groups[&key], &f))
}

async fn create_group(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Query(q): Q,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    if body.is_empty() {
        return Err(TcError::bad_request(
            "Empty payload received while group details are expected.",
        ));
    }
    let posted: PostedGroup = json_body(&h, &body)?;
    let mut s = emu.state();
    let key = posted
        .key
        .clone()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            TcError::bad_request("Attribute 'key' must not be empty when creating group.")
        })?;
    let name = posted
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            TcError::bad_request("Attribute 'name' must not be empty when creating group.")
        })?;
    if s.groups.contains_key(&key) {
        return Err(TcError::bad_request(format!(
            "Cannot create group as group with key '{key}': group with the same key already exists"
        )));
    }
    if s.group_key_by_name(&name).is_some() {
        return Err(TcError::bad_request(format!(
            "Cannot create group as group with name '{name}': group with the same name already exists"
        )));
    }
    // Everything after creation is all-or-nothing: on failure the group is deleted again.
    let roles = posted
        .roles
        .as_ref()
        .map(|r| posted_roles(&s, r))
        .transpose()
        .map_err(|_| TcError::bad_request("Cannot create group with specified roles"))?;
    let props = posted
        .properties
        .as_ref()
        .map(posted_props)
        .transpose()
        .map_err(|_| TcError::bad_request("Cannot create group with specified properties"))?;
    let members = match &posted.users {
        None => Vec::new(),
        Some(users) => users
            .user
            .iter()
            .map(|u| posted_user_id(&s, u))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| TcError::bad_request("Cannot create group with specified users"))?,
    };
    s.insert_group(GroupRec {
        key: key.clone(),
        name,
        description: posted.description.clone(),
        properties: props.unwrap_or_default(),
        roles: roles.unwrap_or_default().into_iter().collect(),
    });
    for id in members {
        s.add_member(id, &key);
    }
    ok_json(s.render_group(&s.groups[&key], &f))
}

async fn delete_group(AxState(emu): AxState<Emulator>, Path(g): Path<String>) -> Res {
    let mut s = emu.state();
    let key = s.find_group(&g)?;
    if key == ALL_USERS_GROUP {
        return Err(TcError::bad_request("Cannot delete the All Users group"));
    }
    s.remove_group(&key);
    no_content()
}

async fn group_roles(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(g): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let key = s.find_group(&g)?;
    ok_json(render_roles(
        &s.groups[&key].roles,
        &format!("/app/rest/userGroups/key:{key}"),
        &f,
    ))
}

async fn replace_group_roles(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(g): Path<String>,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let posted: PostedRoles = json_body(&h, &body)?;
    let mut s = emu.state();
    let key = s.find_group(&g)?;
    let roles = posted_roles(&s, &posted)?;
    s.groups.get_mut(&key).expect("found").roles = roles.into_iter().collect();
    ok_json(render_roles(
        &s.groups[&key].roles,
        &format!("/app/rest/userGroups/key:{key}"),
        &Fields::Long,
    ))
}

async fn add_group_role_body(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(g): Path<String>,
    body: Bytes,
) -> Res {
    need_json(&h)?;
    let posted: PostedRole = json_body(&h, &body)?;
    let mut s = emu.state();
    let key = s.find_group(&g)?;
    let (role, scope) = posted_roles(&s, &PostedRoles { role: vec![posted] })?.remove(0);
    s.groups
        .get_mut(&key)
        .expect("found")
        .roles
        .insert((role.clone(), scope.clone()));
    ok_json(render_role(
        &role,
        &scope,
        &format!("/app/rest/userGroups/key:{key}"),
        &Fields::Long,
    ))
}

fn group_role_target(
    s: &State,
    g: &str,
    role: &str,
    scope: &str,
) -> Result<(String, String, String), TcError> {
    let key = s.find_group(g)?;
    s.check_role(role)?;
    let scope = s.parse_scope(scope)?;
    Ok((key, role.to_owned(), scope))
}

async fn get_group_role(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((g, role, scope)): Path<(String, String, String)>,
) -> Res {
    need_json(&h)?;
    let s = emu.state();
    let (key, role, scope) = group_role_target(&s, &g, &role, &scope)?;
    if !s.groups[&key]
        .roles
        .contains(&(role.clone(), scope.clone()))
    {
        return Err(TcError::not_found(format!(
            "Group {g} does not have role with id: '{role}' and scope '{scope}'"
        )));
    }
    ok_json(render_role(
        &role,
        &scope,
        &format!("/app/rest/userGroups/key:{key}"),
        &Fields::Long,
    ))
}

async fn post_group_role(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((g, role, scope)): Path<(String, String, String)>,
) -> Res {
    need_json(&h)?;
    let mut s = emu.state();
    let (key, role, scope) = group_role_target(&s, &g, &role, &scope)?;
    s.groups
        .get_mut(&key)
        .expect("found")
        .roles
        .insert((role.clone(), scope.clone()));
    ok_json(render_role(
        &role,
        &scope,
        &format!("/app/rest/userGroups/key:{key}"),
        &Fields::Long,
    ))
}

async fn delete_group_role(
    AxState(emu): AxState<Emulator>,
    Path((g, role, scope)): Path<(String, String, String)>,
) -> Res {
    let mut s = emu.state();
    let (key, role, scope) = group_role_target(&s, &g, &role, &scope)?;
    s.groups
        .get_mut(&key)
        .expect("found")
        .roles
        .remove(&(role, scope));
    no_content()
}

async fn group_properties(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(g): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let key = s.find_group(&g)?;
    ok_json(crate::state::render_properties(
        &s.groups[&key].properties,
        &format!("/app/rest/userGroups/key:{key}/properties"),
        &f,
    ))
}

async fn get_group_property(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((g, name)): Path<(String, String)>,
) -> Res {
    need_text(&h)?;
    let s = emu.state();
    let key = s.find_group(&g)?;
    s.groups[&key]
        .properties
        .get(&name)
        .map(|v| text_response(StatusCode::OK, v.clone()))
        .ok_or_else(|| TcError::not_found(format!("No property with name '{name}' is found.")))
}

async fn set_group_property(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path((g, name)): Path<(String, String)>,
    body: Bytes,
) -> Res {
    need_text(&h)?;
    let value = text_body(&h, &body)?;
    let mut s = emu.state();
    let key = s.find_group(&g)?;
    if name.is_empty() {
        return Err(TcError::bad_request("Property name cannot be empty."));
    }
    s.groups
        .get_mut(&key)
        .expect("found")
        .properties
        .insert(name, value.clone());
    ok_text(value)
}

async fn delete_group_property(
    AxState(emu): AxState<Emulator>,
    Path((g, name)): Path<(String, String)>,
) -> Res {
    let mut s = emu.state();
    let key = s.find_group(&g)?;
    s.groups
        .get_mut(&key)
        .expect("found")
        .properties
        .remove(&name);
    no_content()
}

// ---- roles and projects ------------------------------------------------------------

async fn list_roles(AxState(emu): AxState<Emulator>, h: HeaderMap) -> Res {
    need_json(&h)?;
    let s = emu.state();
    let roles: Vec<Json> = s
        .roles
        .iter()
        .map(
            |r| json!({"id": r.id, "name": r.name, "href": format!("/app/rest/roles/id:{}", r.id)}),
        )
        .collect();
    ok_json(json!({"count": roles.len(), "role": roles}))
}

fn render_project(p: &crate::state::ProjectRec, f: &Fields) -> Json {
    let mut m = serde_json::Map::new();
    if f.has("id", true, true) {
        m.insert("id".into(), json!(p.id));
    }
    if f.has("name", true, true) {
        m.insert("name".into(), json!(p.name));
    }
    if let Some(parent) = &p.parent
        && f.has("parentProjectId", true, true)
    {
        m.insert("parentProjectId".into(), json!(parent));
    }
    if f.has("href", true, true) {
        m.insert(
            "href".into(),
            json!(format!("/app/rest/projects/id:{}", p.id)),
        );
    }
    if f.has("webUrl", true, true) {
        m.insert(
            "webUrl".into(),
            json!(format!("http://localhost/project/{}", p.id)),
        );
    }
    Json::Object(m)
}

async fn list_projects(AxState(emu): AxState<Emulator>, h: HeaderMap, Query(q): Q) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let mut m = serde_json::Map::new();
    if f.has("count", true, true) {
        m.insert("count".into(), json!(s.projects.len()));
    }
    if f.has("href", true, true) {
        m.insert("href".into(), json!("/app/rest/projects"));
    }
    if f.has("project", true, true) {
        let pf = f.items("project");
        m.insert(
            "project".into(),
            Json::Array(s.projects.iter().map(|p| render_project(p, &pf)).collect()),
        );
    }
    ok_json(Json::Object(m))
}

async fn get_project(
    AxState(emu): AxState<Emulator>,
    h: HeaderMap,
    Path(p): Path<String>,
    Query(q): Q,
) -> Res {
    need_json(&h)?;
    let f = fields(&q, Fields::Long)?;
    let s = emu.state();
    let project = s.find_project(&p)?;
    ok_json(render_project(project, &f))
}
