//! The `#[repr(C)]` types the gpuscale eBPF program (`agent-ebpf`) and the agent share.
//!
//! Owns the wire layout of the `EVENTS` ring buffer ([`Event`]), the value layout of the `OPENS`
//! LRU hash ([`OpenRecord`], keyed by tgid), and the names and sizes both sides agree on.
//! Every type is plain old data with no implicit padding (fixed-width integers, `u32` kinds,
//! explicit `_pad`, `const` size asserts), so the bytes the kernel writes are the bytes the agent
//! reads. With the `user` feature each type is `aya::Pod`.
//!
//! Must never: hold a pointer, a `bool`, an enum, or anything whose layout the two compilers
//! (bpf and host) could disagree on.
#![no_std]
#![deny(missing_docs)]

/// Capacity of the device-prefix global (`DEVICE_PREFIX`): the longest prefix the program can
/// match, in bytes.
pub const PREFIX_CAP: usize = 32;

/// Capacity of a device suffix (the path after the prefix: `0`, `ctl`, `-uvm`, `-caps/…`), in
/// bytes. Longer suffixes are cut to this length.
pub const DEVICE_CAP: usize = 32;

/// Length of a task's `comm` (the kernel's `TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// The default device prefix the program matches when user space does not override it.
pub const DEFAULT_PREFIX: &[u8] = b"/dev/nvidia";

/// The default device prefix, NUL-padded to [`PREFIX_CAP`] (the initial value of the global).
pub const DEFAULT_PREFIX_BYTES: [u8; PREFIX_CAP] = pad_prefix(DEFAULT_PREFIX);

/// Name of the global holding the prefix bytes (`[u8; PREFIX_CAP]`).
pub const GLOBAL_DEVICE_PREFIX: &str = "DEVICE_PREFIX";
/// Name of the global holding the prefix length (`u32`, 1..=[`PREFIX_CAP`]).
pub const GLOBAL_PREFIX_LEN: &str = "PREFIX_LEN";
/// Name of the ring buffer of [`Event`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// Name of the LRU hash tgid (`u32`) → [`OpenRecord`].
pub const MAP_OPENS: &str = "OPENS";
/// Name of the per-CPU array (one `u64` slot) counting events lost to a full ring buffer.
pub const MAP_DROPPED: &str = "DROPPED";
/// The preferred open hook: program name and the kernel function its fentry attaches to
/// (needs kernel BTF and BPF trampolines; costs opens nothing but the program itself).
pub const FENTRY_OPEN: (&str, &str) = ("do_sys_openat2", "do_sys_openat2");
/// The fallback open hooks when fentry cannot attach: programs and the tracepoints
/// (`category`, `name`) each attaches to.
pub const TRACEPOINTS_OPEN: [(&str, &str, &str); 2] = [
    ("sys_enter_openat", "syscalls", "sys_enter_openat"),
    ("sys_enter_openat2", "syscalls", "sys_enter_openat2"),
];
/// The exit hook: program and tracepoint (`category`, `name`).
pub const TRACEPOINT_EXIT: (&str, &str, &str) =
    ("sched_process_exit", "sched", "sched_process_exit");

/// Byte size of the `EVENTS` ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Capacity of the `OPENS` LRU hash (tgids at once).
pub const OPENS_ENTRIES: u32 = 8192;

/// Offset of `const char *filename` in the `sys_enter_openat` and `sys_enter_openat2`
/// tracepoint records (after the 8-byte common header, `__syscall_nr` padded to 8, and the
/// 8-byte `dfd`), as `/sys/kernel/tracing/events/syscalls/sys_enter_openat*/format` gives it.
pub const FILENAME_OFFSET: usize = 24;

/// [`Event::kind`] of a matching `openat`/`openat2`.
pub const EVENT_OPEN: u32 = 1;
/// [`Event::kind`] of the exit of a tracked process (its thread-group leader).
pub const EVENT_EXIT: u32 = 2;

/// `prefix` NUL-padded to [`PREFIX_CAP`] bytes (cut if longer).
pub const fn pad_prefix(prefix: &[u8]) -> [u8; PREFIX_CAP] {
    let mut out = [0u8; PREFIX_CAP];
    let mut i = 0;
    while i < prefix.len() && i < PREFIX_CAP {
        out[i] = prefix[i];
        i += 1;
    }
    out
}

/// One record in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// [`EVENT_OPEN`] or [`EVENT_EXIT`].
    pub kind: u32,
    /// Thread-group id (the user-space PID).
    pub tgid: u32,
    /// Thread id of the task that opened (equals `tgid` for an exit).
    pub pid: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
    /// The task's cgroup v2 id (`bpf_get_current_cgroup_id`, the cgroup directory's inode);
    /// for an exit, the id recorded at the process's first open.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds (not Unix time).
    pub ts_ns: u64,
    /// The task's `comm`, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// The opened path after the prefix, NUL-padded (not terminated when it fills the field);
    /// for an exit, the last device the process opened.
    pub device: [u8; DEVICE_CAP],
}

const _: () = assert!(core::mem::size_of::<Event>() == 80);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

/// The `OPENS` value: what the program knows about a process (tgid) that opened a device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenRecord {
    /// CLOCK_MONOTONIC ns of the first matching open.
    pub first_open_ns: u64,
    /// CLOCK_MONOTONIC ns of the latest matching open.
    pub last_open_ns: u64,
    /// cgroup v2 id at the first open.
    pub cgroup_id: u64,
    /// `comm` at the first open.
    pub comm: [u8; COMM_LEN],
    /// Suffix of the latest device opened.
    pub device: [u8; DEVICE_CAP],
}

const _: () = assert!(core::mem::size_of::<OpenRecord>() == 72);
const _: () = assert!(core::mem::align_of::<OpenRecord>() == 8);

/// The bytes of a NUL-padded field up to its first NUL (all of it when it has none).
pub fn until_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `Event` is `#[repr(C)]`, made only of integers and integer arrays, with no implicit
    // padding (asserted by size above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as for `Event`: `#[repr(C)]`, integers only, no implicit padding.
    unsafe impl aya::Pod for super::OpenRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_is_nul_padded() {
        assert_eq!(&DEFAULT_PREFIX_BYTES[..11], b"/dev/nvidia");
        assert!(DEFAULT_PREFIX_BYTES[11..].iter().all(|&b| b == 0));
        assert_eq!(until_nul(&DEFAULT_PREFIX_BYTES), DEFAULT_PREFIX);
    }

    #[test]
    fn until_nul_takes_a_full_field_whole() {
        assert_eq!(until_nul(b"abc"), b"abc");
        assert_eq!(until_nul(b"ab\0c"), b"ab");
    }
}
