//! A Microsoft Graph fake (to be written).
