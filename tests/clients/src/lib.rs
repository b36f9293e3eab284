//! Nothing here: the end-to-end tests live in `tests/`, the shared harness in
//! `tests/common/mod.rs`.
