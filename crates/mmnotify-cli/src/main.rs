//! The `mmnotify` command.
fn main() {
    println!("mmnotify {}", env!("CARGO_PKG_VERSION"));
}
