//! Setting a link up: `crosslink init` (both gateways' configurations and
//! keys from one command) and `crosslink check --reach` (every path probed
//! before it carries traffic). Tools an operator runs, beside the daemon;
//! the daemon does not use them.

pub mod init;
pub mod reach;
