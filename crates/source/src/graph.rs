//! Microsoft Graph: users and groups through delta queries (to be written).
