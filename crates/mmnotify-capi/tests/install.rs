//! The install step and the C example: `mmnotify-install --prefix TMP` installs the libraries,
//! the header and `mmnotify.pc`; `examples/c/rcache_example.c` is then compiled with
//! `pkg-config --cflags --libs mmnotify` alone (PKG_CONFIG_PATH pointing into the prefix) and
//! run against the installed shared library.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn pkg_config(prefix: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("mmnotify")
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .unwrap_or_else(|e| {
            panic!("the install test needs pkg-config, which could not run ({e}): install it (Debian: apt-get install pkg-config)")
        });
    assert!(
        out.status.success(),
        "pkg-config {args:?} mmnotify failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn installed_header_and_pkg_config_build_the_c_example() {
    let dir = scratch("install");
    let prefix = dir.join("prefix");
    let out = run_with_timeout(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_mmnotify-install"));
            c.arg("--prefix").arg(&prefix);
            c
        },
        Duration::from_secs(600),
    );
    assert!(
        out.status.success(),
        "mmnotify-install failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "include/mmnotify.h",
        "lib/libmmnotify.so",
        "lib/libmmnotify.a",
        "lib/pkgconfig/mmnotify.pc",
    ] {
        assert!(prefix.join(f).is_file(), "{f} was not installed");
    }
    assert_eq!(
        std::fs::read_to_string(prefix.join("include/mmnotify.h")).unwrap(),
        std::fs::read_to_string(crate_dir().join("include/mmnotify.h")).unwrap(),
        "the installed header is the committed one"
    );
    let cflags = pkg_config(&prefix, &["--cflags"]);
    let libs = pkg_config(&prefix, &["--libs"]);
    assert!(
        cflags.contains(&*prefix.join("include").to_string_lossy()),
        "{cflags}"
    );
    assert!(libs.contains("-lmmnotify"), "{libs}");

    // The example, from the installed files alone: no -I or -L into the source tree.
    let example = crate_dir().join("../../examples/c/rcache_example.c");
    let exe = dir.join("rcache_example");
    let mut cc = Command::new(c_compiler());
    cc.args(["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(&example)
        .args(cflags.split_whitespace())
        .args(libs.split_whitespace());
    let built = cc.output().expect("running the C compiler");
    assert!(
        built.status.success(),
        "building the example with pkg-config's flags failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let mut run = Command::new(&exe);
    run.env("LD_LIBRARY_PATH", prefix.join("lib"));
    let ran = run_with_timeout(run, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&ran.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&ran.stderr));
    assert!(ran.status.success(), "the example failed:\n{stdout}");
    assert!(stdout.contains("hits 1 misses 2"), "{stdout}");

    // It runs against the installed library, not the build tree's.
    let ldd = Command::new("ldd")
        .arg(&exe)
        .env("LD_LIBRARY_PATH", prefix.join("lib"))
        .output();
    if let Ok(ldd) = ldd {
        let text = String::from_utf8_lossy(&ldd.stdout);
        assert!(
            text.contains(&*prefix.join("lib/libmmnotify.so").to_string_lossy()),
            "the example does not load the installed library:\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
