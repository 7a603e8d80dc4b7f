//! In-crate model tests: loom (`RUSTFLAGS="--cfg loom"`) runs the real engine code.
