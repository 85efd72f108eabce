//! A round of IdP changes → the store writes a SCIM push would make (to be written).
