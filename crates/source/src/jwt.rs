//! Signed client assertions (RFC 7523 `private_key_jwt`) for certificate / private-key
//! credentials (to be written).
