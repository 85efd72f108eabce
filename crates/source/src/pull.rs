//! The pull loop: every `interval`, pull a round and apply it (to be written).
