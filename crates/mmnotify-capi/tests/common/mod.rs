//! Shared by the C tests: build the library artifacts, find the C compiler, compile and run a C
//! program with a timeout.
//!
//! `cargo test` builds this crate's library only as the test harness needs it, not its
//! `cdylib` / `staticlib` artifacts, so the first test that needs them runs
//! `cargo build -p mmnotify-capi --lib` (same profile, same target directory: the directory
//! that holds this test executable's `deps/`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The crate's directory.
pub(crate) fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`: where `libmmnotify.so` and `libmmnotify.a` are.
pub(crate) fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Builds `libmmnotify.{so,a}` once per test process; returns the directory holding them.
pub(crate) fn library_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = profile_dir();
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let target_dir = dir.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "mmnotify-capi", "--lib"])
            .env("CARGO_TARGET_DIR", target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("running cargo build for the C library");
        assert!(
            status.success(),
            "cargo build -p mmnotify-capi --lib failed"
        );
        for lib in ["libmmnotify.so", "libmmnotify.a"] {
            assert!(
                dir.join(lib).exists(),
                "{lib} was not built in {}",
                dir.display()
            );
        }
        dir
    })
}

/// The system C compiler (`$CC`, else `cc`), checked once; a clear failure if there is none.
pub(crate) fn c_compiler() -> String {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let ok = Command::new(&cc)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the C tests need a C compiler, and `{cc} --version` failed: install one \
         (Debian: apt-get install gcc) or point $CC at it"
    );
    cc
}

/// Whether the C compiler can build and run an AddressSanitizer program here.
pub(crate) fn sanitizers_available(out_dir: &Path) -> Result<(), String> {
    let src = out_dir.join("asan_probe.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let exe = out_dir.join("asan_probe");
    let out = Command::new(c_compiler())
        .args(["-fsanitize=address,undefined", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let run = Command::new(&exe).output().map_err(|e| e.to_string())?;
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).into_owned());
    }
    Ok(())
}

/// A scratch directory under the target directory, fresh per name and process (remove it
/// when the test passed).
pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = profile_dir()
        .join("capi-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles `src` against the header in `include` and the shared library in `lib`, with
/// `-Wall -Wextra -Werror` plus `extra` flags.
pub(crate) fn compile(src: &Path, exe: &Path, include: &Path, lib: &Path, extra: &[&str]) {
    let out = Command::new(c_compiler())
        .args(["-std=gnu11", "-g", "-O1", "-Wall", "-Wextra", "-Werror"])
        .args(extra)
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(exe)
        .arg(src)
        .arg("-L")
        .arg(lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lmmnotify", "-pthread"])
        .output()
        .expect("running the C compiler");
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd`, killing it after `timeout`; returns its output, or panics on a timeout.
pub(crate) fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the C program");
    let deadline = Instant::now() + timeout;
    loop {
        if child
            .try_wait()
            .expect("waiting for the C program")
            .is_some()
        {
            return child.wait_with_output().expect("collecting output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collecting output");
            panic!(
                "{cmd:?} did not finish within {timeout:?} (a hang); stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
