//! Stateless packet views: parse and emit, never panic on bad input.
pub mod bfd;
pub mod flow;
pub mod overlay;
