//! Contract tests: the `teamcity` client against the emulator over real HTTP.
//!
//! Each test spawns its own emulator on `127.0.0.1:0`. Assertions check the
//! emulator's state (not just the client's view), so a client bug cannot be
//! hidden by a matching emulator bug in the response path.

mod errors;
mod fidelity;
mod injection;
mod operations;
mod paging;

use std::time::Duration;

use teamcity::{Client, ClientConfig, Token};
use teamcity_emulator::{Emulator, EmulatorOptions};

pub(crate) const TOKEN: &str = "test-token";

pub(crate) fn options() -> EmulatorOptions {
    EmulatorOptions {
        token: TOKEN.into(),
        read_only_tokens: vec!["viewer-token".into()],
        projects: vec!["Backend".into(), "Frontend".into()],
        ..EmulatorOptions::default()
    }
}

pub(crate) fn client_for(base: &str, token: &str) -> Client {
    teamcity::install_crypto_provider();
    let mut config = ClientConfig::new(base, Token::new(token));
    config.request_timeout = Duration::from_secs(2);
    config.connect_timeout = Duration::from_secs(1);
    Client::new(config).expect("client")
}

pub(crate) async fn start_with(opts: EmulatorOptions) -> (Client, Emulator, String) {
    let (base, emu) = teamcity_emulator::spawn(opts)
        .await
        .expect("spawn emulator");
    (client_for(&base, TOKEN), emu, base)
}

pub(crate) async fn start() -> (Client, Emulator) {
    let (client, emu, _) = start_with(options()).await;
    (client, emu)
}
