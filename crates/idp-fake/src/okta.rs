//! An Okta API fake (to be written).
