//! The scenarios of `chaos.rs`, unchanged, against the PostgreSQL engine: every hive here
//! runs its queen on a PostgreSQL cluster of its own (the binary's name ends in
//! `_postgres`; see `hive_tests::hive_builder!`).

#[path = "chaos.rs"]
mod scenarios;
