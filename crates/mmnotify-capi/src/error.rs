//! Errors at the boundary: negative errno-style codes, `mmn_strerror`, and a thread-local
//! message that names the failing values.
//!
//! Every entry point returns `int`: `0` (or a documented non-negative answer) on success, a
//! negative code on failure. The code says *what kind* of failure (it is stable, and a C
//! caller can switch on it); the thread-local message says *which values* failed, as a
//! sentence (`mmn_last_error()`), and is replaced by the next failing call on the same thread.
//! A failing system call inside a cooperative wrapper returns its own negated `errno`
//! (`-EINVAL` from `munmap`, ...), which may fall outside the list below; `mmn_strerror`
//! knows those too.
//!
//! Nothing unwinds across the boundary: [`ffi`] runs every entry point's body under
//! `catch_unwind`, and a panic (a bug in this library) becomes [`MMN_EPANIC`] with its
//! message, leaving the library usable.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Success.
pub const MMN_OK: c_int = 0;
/// The watcher could not be created: the kernel refused a userfaultfd to this process
/// (EPERM/EACCES, e.g. a seccomp filter or a security module).
pub const MMN_EPERM: c_int = -1;
/// A handle is not valid: never issued, already released (stale), of another kind (an
/// interval where a cache is expected), or zero.
pub const MMN_EBADF: c_int = -9;
/// This process is a fork of the one that initialised the library: the child's memory is not
/// watched, and every check fails closed.
pub const MMN_ECHILD: c_int = -10;
/// The memory kept changing while it was being registered (every attempt collided with an
/// invalidation); try again.
pub const MMN_EAGAIN: c_int = -11;
/// Part of the range is not mapped.
pub const MMN_ENOMEM: c_int = -12;
/// A pointer argument that must not be NULL was NULL.
pub const MMN_EFAULT: c_int = -14;
/// The object is in use: the memory belongs to another userfaultfd; or the last `mmn_fini`,
/// or `mmn_rcache_destroy`, found objects still alive.
pub const MMN_EBUSY: c_int = -16;
/// The library was already initialised with other options in this process.
pub const MMN_EEXIST: c_int = -17;
/// An argument is invalid: an empty, unaligned, overflowing or inverted range, unknown flags
/// or access bits, a sequence taken on another interval, an ABI version this library does not
/// speak.
pub const MMN_EINVAL: c_int = -22;
/// The cache's limits cannot be met: every region that could be evicted is in use.
pub const MMN_ENOSPC: c_int = -28;
/// The call would wait for itself: unsubscribing from the subscription's own callback,
/// `mmn_read_begin` from a callback, destroying a cache from one of its callbacks.
pub const MMN_EDEADLK: c_int = -35;
/// This kernel has no userfaultfd (ENOSYS from the system call).
pub const MMN_ENOSYS: c_int = -38;
/// This kernel lacks a userfaultfd feature the watcher needs (too old).
pub const MMN_ENOTSUP: c_int = -95;
/// The library is not initialised (no `mmn_init`), or the watcher was shut down.
pub const MMN_ESHUTDOWN: c_int = -108;
/// `mmn_read_begin_timeout` gave up.
pub const MMN_ETIMEDOUT: c_int = -110;
/// The watcher failed (its reading thread died, its userfaultfd was closed behind its back)
/// and no longer vouches for any mirror: every check fails closed.
pub const MMN_EIO: c_int = -5;
/// A user callback reported an error: the cache's `reg` callback returned non-zero (the
/// code it returned is in the message).
pub const MMN_ECALLBACK: c_int = -125;
/// A bug in this library: a Rust panic was caught at the boundary (the message says where).
/// The library stays usable.
pub const MMN_EPANIC: c_int = -131;

/// The kinds of failure, one per code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Code {
    NotPermitted,
    BadHandle,
    Forked,
    Again,
    Unmapped,
    Null,
    Busy,
    Exists,
    Invalid,
    NoSpace,
    Deadlock,
    NoUserfaultfd,
    NotSupported,
    ShutDown,
    TimedOut,
    Failed,
    Callback,
    Panic,
    /// A system call's own errno (positive), returned negated.
    Errno(i32),
}

impl Code {
    pub(crate) fn value(self) -> c_int {
        match self {
            Code::NotPermitted => MMN_EPERM,
            Code::BadHandle => MMN_EBADF,
            Code::Forked => MMN_ECHILD,
            Code::Again => MMN_EAGAIN,
            Code::Unmapped => MMN_ENOMEM,
            Code::Null => MMN_EFAULT,
            Code::Busy => MMN_EBUSY,
            Code::Exists => MMN_EEXIST,
            Code::Invalid => MMN_EINVAL,
            Code::NoSpace => MMN_ENOSPC,
            Code::Deadlock => MMN_EDEADLK,
            Code::NoUserfaultfd => MMN_ENOSYS,
            Code::NotSupported => MMN_ENOTSUP,
            Code::ShutDown => MMN_ESHUTDOWN,
            Code::TimedOut => MMN_ETIMEDOUT,
            Code::Failed => MMN_EIO,
            Code::Callback => MMN_ECALLBACK,
            Code::Panic => MMN_EPANIC,
            Code::Errno(e) => -e.abs().max(1),
        }
    }
}

/// A failure on its way to the C caller: the code, and the sentence for `mmn_last_error`.
#[derive(Debug)]
pub(crate) struct CError {
    pub(crate) code: Code,
    pub(crate) message: String,
}

impl CError {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        CError {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn null(argument: &str) -> Self {
        CError::new(
            Code::Null,
            format!("the pointer argument `{argument}` is NULL"),
        )
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        CError::new(Code::Invalid, message)
    }

    /// Prefixes the message with the function that failed.
    pub(crate) fn context(mut self, function: &str) -> Self {
        self.message = format!("{function}: {}", self.message);
        self
    }
}

impl fmt::Display for CError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn io_code(e: &std::io::Error) -> Code {
    match e.raw_os_error() {
        Some(n) if n > 0 => Code::Errno(n),
        _ => Code::Failed,
    }
}

fn engine_code(e: &engine::Error) -> Code {
    use engine::Error as E;
    match e {
        E::WouldDeadlock { .. } => Code::Deadlock,
        E::IntervalNotInserted { .. } => Code::BadHandle,
        E::Released => Code::ShutDown,
        E::ReadBeginTimeout { .. } => Code::TimedOut,
        _ => Code::Invalid,
    }
}

impl From<engine::Error> for CError {
    fn from(e: engine::Error) -> Self {
        CError::new(engine_code(&e), e.to_string())
    }
}

fn uffd_code(e: &mmnotify_uffd::Error) -> Code {
    use mmnotify_uffd::Error as E;
    match e {
        E::NoUserfaultfd => Code::NoUserfaultfd,
        E::NotPermitted { .. } | E::ForkEventsNotPermitted { .. } => Code::NotPermitted,
        E::KernelTooOld { .. } => Code::NotSupported,
        E::OptionsConflict { .. } => Code::Exists,
        E::AlreadyOwned { .. } => Code::Busy,
        E::Unaligned { .. } | E::EmptyRange { .. } | E::RangeOverflow { .. } => Code::Invalid,
        E::Unmapped { .. } | E::NothingWatchable { .. } => Code::Unmapped,
        E::ShutDown => Code::ShutDown,
        E::Failed { .. } => Code::Failed,
        E::Forked => Code::Forked,
        E::InDispatcher { .. } => Code::Deadlock,
        E::ReadBeginTimeout { .. } => Code::TimedOut,
        E::Engine(inner) => engine_code(inner),
        E::Syscall { source, .. } => io_code(source),
        _ => Code::Failed,
    }
}

impl From<mmnotify_uffd::Error> for CError {
    fn from(e: mmnotify_uffd::Error) -> Self {
        CError::new(uffd_code(&e), e.to_string())
    }
}

impl From<mmnotify_rcache::Error> for CError {
    fn from(e: mmnotify_rcache::Error) -> Self {
        use mmnotify_rcache::Error as E;
        let code = match &e {
            E::EmptyRange { .. } | E::RangeOverflow { .. } => Code::Invalid,
            E::Unmapped { .. } => Code::Unmapped,
            E::Registrar { .. } | E::RegistrarPanicked { .. } => Code::Callback,
            E::Full { .. } => Code::NoSpace,
            E::Unstable { .. } => Code::Again,
            E::Watcher(w) => uffd_code(w),
            E::Engine(en) => engine_code(en),
            E::Maps { source, .. } => io_code(source),
            _ => Code::Failed,
        };
        CError::new(code, e.to_string())
    }
}

thread_local! {
    static LAST: RefCell<(c_int, CString)> = RefCell::new((MMN_OK, CString::default()));
}

/// Records `e` as this thread's last error; returns its code.
pub(crate) fn record(e: CError) -> c_int {
    let code = e.code.value();
    // A message with an interior NUL (from a path, say) is cut there rather than lost.
    let bytes: Vec<u8> = e
        .message
        .into_bytes()
        .into_iter()
        .take_while(|b| *b != 0)
        .collect();
    let message = CString::new(bytes).unwrap_or_default();
    let _ = LAST.try_with(|l| *l.borrow_mut() = (code, message));
    code
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// Runs an entry point's body: a `CError` is recorded and returned as its code, a panic is
/// caught and becomes [`MMN_EPANIC`]. `Ok(n)` returns `n` (non-negative).
pub(crate) fn ffi(function: &'static str, body: impl FnOnce() -> Result<c_int, CError>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => record(e.context(function)),
        Err(payload) => record(CError::new(
            Code::Panic,
            format!(
                "{function}: internal error (a Rust panic, caught at the boundary): {}",
                panic_text(&*payload)
            ),
        )),
    }
}

/// Checks a pointer argument for NULL.
pub(crate) fn non_null<T>(p: *const T, argument: &str) -> Result<(), CError> {
    if p.is_null() {
        Err(CError::null(argument))
    } else {
        Ok(())
    }
}

/// The message of the last failing call on this thread, or an empty string if none failed.
///
/// The string is owned by the library and stays valid until the next failing call on this
/// thread; copy it to keep it. Never NULL. Thread-safe (each thread has its own).
#[no_mangle]
pub extern "C" fn mmn_last_error() -> *const c_char {
    static EMPTY: &CStr = c"";
    LAST.try_with(|l| l.borrow().1.as_ptr())
        .unwrap_or(EMPTY.as_ptr())
}

/// The code of the last failing call on this thread (`MMN_OK` if none failed).
///
/// Thread-safe (each thread has its own). Successful calls do not reset it.
#[no_mangle]
pub extern "C" fn mmn_last_error_code() -> c_int {
    LAST.try_with(|l| l.borrow().0).unwrap_or(MMN_OK)
}

/// A static description of `code` (one of the `MMN_E*` codes, or a negated errno returned by a
/// cooperative wrapper). Never NULL; the string is static and must not be freed.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn mmn_strerror(code: c_int) -> *const c_char {
    let s: &'static CStr = match code {
        MMN_OK => c"success",
        MMN_EPERM => c"the kernel does not permit this process a userfaultfd",
        MMN_EBADF => c"invalid handle (never issued, already released, or of another kind)",
        MMN_ECHILD => c"this process is a fork of the one that initialised mmnotify; its memory is not watched",
        MMN_EAGAIN => c"the memory kept changing while it was being registered; try again",
        MMN_ENOMEM => c"part of the range is not mapped",
        MMN_EFAULT => c"a required pointer argument is NULL",
        MMN_EBUSY => c"in use (memory owned by another userfaultfd, or objects still alive)",
        MMN_EEXIST => c"mmnotify is already initialised with other options in this process",
        MMN_EINVAL => c"invalid argument",
        MMN_ENOSPC => c"the registration cache is full and nothing can be evicted",
        MMN_EDEADLK => c"the call would wait for itself (made from a callback)",
        MMN_ENOSYS => c"this kernel has no userfaultfd",
        MMN_ENOTSUP => c"this kernel lacks a userfaultfd feature mmnotify needs",
        MMN_ESHUTDOWN => c"mmnotify is not initialised (call mmn_init) or was shut down",
        MMN_ETIMEDOUT => c"timed out",
        MMN_EIO => c"the watcher failed and no longer vouches for any mirror",
        MMN_ECALLBACK => c"a user callback reported an error",
        MMN_EPANIC => c"internal error in mmnotify (caught; the library stays usable)",
        c if c < 0 => return errno_text(-c),
        _ => c"not an error code",
    };
    s.as_ptr()
}

/// `strerror` for a system call's errno, interned so the pointer stays valid.
fn errno_text(errno: c_int) -> *const c_char {
    use crate::sync::Mutex;
    use std::collections::HashMap;
    static TEXTS: Mutex<Option<HashMap<c_int, CString>>> = Mutex::new(None);
    let mut texts = TEXTS.lock();
    let map = texts.get_or_insert_with(HashMap::new);
    let s = map.entry(errno).or_insert_with(|| {
        let text = std::io::Error::from_raw_os_error(errno).to_string();
        CString::new(format!("system call failed: {text}")).unwrap_or_default()
    });
    // The CString's heap buffer never moves or drops: entries are never removed.
    s.as_ptr()
}
