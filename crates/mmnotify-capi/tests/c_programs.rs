//! The C test programs of `tests/c/`, compiled with the system C compiler against
//! `include/mmnotify.h` and `libmmnotify.so` (`-Wall -Wextra -Werror`, and a second time with
//! `-fsanitize=address,undefined`), run with a timeout, judged by exit status and output.
//!
//! Each program prints what it checked and exits 0 only if every check held; exit 77 means
//! "skipped" (the program says why), which is accepted only when not running as root
//! (CI runs as root, where nothing may skip).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn run_program(name: &str, timeout: Duration) {
    let lib = library_dir();
    let src = crate_dir().join("tests/c").join(format!("{name}.c"));
    let include = crate_dir().join("include");
    let dir = scratch(name);
    let mut variants = vec![("plain", Vec::<&str>::new())];
    match sanitizers_available(&dir) {
        Ok(()) => variants.push((
            "asan+ubsan",
            vec!["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        )),
        Err(why) => panic!(
            "the C compiler cannot build -fsanitize=address,undefined programs here ({why}); \
             install the sanitizer runtimes (Debian: they come with gcc: libasan8, libubsan1)"
        ),
    }
    for (variant, flags) in variants {
        let exe = dir.join(format!("{name}-{}", variant.replace('+', "-")));
        compile(&src, &exe, &include, lib, &flags);
        let mut cmd = Command::new(&exe);
        // Leaks: the library's process-wide tables and thread-locals live until exit, by
        // design; the programs free everything they own, which ASan checks for errors.
        cmd.env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
            .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1");
        let out = run_with_timeout(cmd, timeout);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("--- {name} ({variant}) ---\n{stdout}{stderr}");
        match out.status.code() {
            Some(0) => {}
            Some(77) if !is_root() => {
                println!("{name} ({variant}) SKIPPED (not root): {stdout}");
            }
            other => panic!(
                "{name} ({variant}) failed with {other:?} (status {:?}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
                out.status
            ),
        }
        assert!(
            !stderr.contains("runtime error:") && !stderr.contains("AddressSanitizer"),
            "{name} ({variant}): a sanitizer reported a problem:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn subscribe_munmap_and_the_callback_is_seen() {
    run_program("subscribe_munmap", Duration::from_secs(60));
}

#[test]
fn read_begin_read_retry_collide_after_a_remap() {
    run_program("read_retry_remap", Duration::from_secs(60));
}

#[test]
fn registration_cache_stale_address_matrix_has_no_stale_hit() {
    run_program("rcache_matrix", Duration::from_secs(90));
}

#[test]
fn two_thread_race_of_get_put_against_munmap_and_remap_has_no_stale_hit() {
    run_program("rcache_race", Duration::from_secs(90));
}

#[test]
fn every_error_code_is_provoked() {
    run_program("errors", Duration::from_secs(60));
}

#[test]
fn the_static_archive_links_a_c_program() {
    let lib = library_dir();
    let dir = scratch("static");
    let exe = dir.join("static_link");
    let out = Command::new(c_compiler())
        .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(crate_dir().join("include"))
        .arg("-o")
        .arg(&exe)
        .arg(crate_dir().join("tests/c/subscribe_munmap.c"))
        .arg(lib.join("libmmnotify.a"))
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-lgcc_s"])
        .output()
        .expect("running the C compiler");
    assert!(
        out.status.success(),
        "linking against libmmnotify.a failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = run_with_timeout(Command::new(&exe), Duration::from_secs(60));
    assert!(
        run.status.success(),
        "the statically linked program failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!Path::new(&exe).with_extension("so").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn several_libraries_share_one_reference_counted_watcher() {
    run_program("shared_init", Duration::from_secs(60));
}
