//! Okta: users and groups through the Users and Groups APIs (to be written).
