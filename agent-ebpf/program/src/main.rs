//! gpuscale's eBPF program: ties every process that opens an NVIDIA device node to its cgroup.
//!
//! Programs (no kprobes; the agent attaches the fentry one where the kernel allows it, else the
//! two open tracepoints, and always the exit tracepoint):
//! - fentry `do_sys_openat2` (argument 1 is the user path), or the tracepoints
//!   `syscalls/sys_enter_openat` and `syscalls/sys_enter_openat2` (the path argument at offset
//!   [`agent_ebpf_common::FILENAME_OFFSET`] of the tracepoint record, from the `format` files
//!   under `/sys/kernel/tracing/events/syscalls/`): read the path, compare it with the prefix in the
//!   `DEVICE_PREFIX`/`PREFIX_LEN` globals (user space overrides them at load; default
//!   `/dev/nvidia`), and on a match upsert `OPENS[tgid]` and send an
//!   [`agent_ebpf_common::EVENT_OPEN`] [`agent_ebpf_common::Event`] to the `EVENTS` ring buffer.
//! - `sched/sched_process_exit`: when a tracked process's thread-group leader exits, remove
//!   `OPENS[tgid]` and send an [`agent_ebpf_common::EVENT_EXIT`].
//!
//! Never blocks and never waits: when the ring buffer is full the event is dropped and the
//! `DROPPED` per-CPU counter goes up (user space reports it). Paths are matched as the process
//! passed them: an open relative to a directory fd (`openat(dirfd_of_dev, "nvidia0")`) or a
//! path argument not yet paged in is not seen; the NVIDIA user-space libraries open absolute
//! `/dev/nvidia*` paths.
//!
//! Stack: the verifier allows 512 bytes for a program and the functions it calls together (and
//! newer kernels round each frame up); `try_open` uses 224 (measured with
//! `llvm-objdump -d` on the object: the deepest `r10 - N`). Events are written straight into
//! ring-buffer memory, the device suffix is one block copy and the prefix is read a byte at a
//! time, because each of those, done the obvious way, put 80 to 256 bytes more on the stack.
//!
//! Minimum kernel: 5.8 (`BPF_MAP_TYPE_RINGBUF`; bounded loops need 5.3, global data 5.2,
//! `bpf_get_current_cgroup_id` 4.18; fentry 5.5 with BTF).
//!
//! Built only for `bpfel-unknown-none`/`bpfeb-unknown-none` (by aya-build, from
//! `agent/build.rs`); on the host this crate compiles to an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use agent_ebpf_common::{
        Event, OpenRecord, COMM_LEN, DEFAULT_PREFIX, DEFAULT_PREFIX_BYTES, DEVICE_CAP,
        EVENTS_BYTES, EVENT_EXIT, EVENT_OPEN, FILENAME_OFFSET, OPENS_ENTRIES, PREFIX_CAP,
    };
    use aya_ebpf::{
        helpers::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
            bpf_ktime_get_ns, bpf_probe_read_user_str_bytes,
        },
        macros::{fentry, map, tracepoint},
        maps::{LruHashMap, PerCpuArray, RingBuf},
        programs::{FEntryContext, TracePointContext},
        Global,
    };

    /// The path prefix to match, NUL-padded (overridden by the agent at load).
    #[no_mangle]
    static DEVICE_PREFIX: Global<[u8; PREFIX_CAP]> = Global::new(DEFAULT_PREFIX_BYTES);

    /// How many bytes of `DEVICE_PREFIX` to compare (1..=PREFIX_CAP).
    #[no_mangle]
    static PREFIX_LEN: Global<u32> = Global::new(DEFAULT_PREFIX.len() as u32);

    /// Events for user space.
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

    /// tgid → what this program knows about a process that opened a device.
    #[map]
    static OPENS: LruHashMap<u32, OpenRecord> = LruHashMap::with_max_entries(OPENS_ENTRIES, 0);

    /// Events lost because `EVENTS` was full (one slot per CPU; user space sums them).
    #[map]
    static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    /// Bytes read of the path: the prefix, the device suffix, and the terminating NUL.
    const PATH_BUF: usize = PREFIX_CAP + DEVICE_CAP + 1;

    /// Entry of `do_sys_openat2(int dfd, const char __user *filename, struct open_how *how)`,
    /// which `open`, `openat`, `openat2` and `creat` all go through: preferred over the syscall
    /// tracepoints where the kernel has BTF and BPF trampolines, because enabling a syscall
    /// tracepoint sends every syscall of every task through the slow path.
    #[fentry(function = "do_sys_openat2")]
    pub fn do_sys_openat2(ctx: FEntryContext) -> u32 {
        let filename: *const u8 = ctx.arg(1);
        match try_open(filename) {
            Ok(ret) => ret,
            Err(ret) => ret,
        }
    }

    #[tracepoint]
    pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
        match try_open_tp(&ctx) {
            Ok(ret) => ret,
            Err(ret) => ret,
        }
    }

    #[tracepoint]
    pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
        match try_open_tp(&ctx) {
            Ok(ret) => ret,
            Err(ret) => ret,
        }
    }

    #[tracepoint]
    pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
        match try_exit(&ctx) {
            Ok(ret) => ret,
            Err(ret) => ret,
        }
    }

    fn try_open_tp(ctx: &TracePointContext) -> Result<u32, u32> {
        // SAFETY: offset FILENAME_OFFSET of both syscalls' records is the `const char *filename`
        // argument (8 bytes); the helper checks the read.
        let filename: *const u8 = unsafe { ctx.read_at(FILENAME_OFFSET) }.map_err(|_| 1u32)?;
        try_open(filename)
    }

    fn try_open(filename: *const u8) -> Result<u32, u32> {
        let len = PREFIX_LEN.load() as usize;
        if len == 0 || len > PREFIX_CAP {
            return Ok(0);
        }
        let mut path = [0u8; PATH_BUF];
        // SAFETY: `filename` is a user-space pointer; the helper faults safely and NUL-terminates.
        let read = unsafe { bpf_probe_read_user_str_bytes(filename, &mut path) }
            .map_err(|_| 1u32)?
            .len();
        if read < len {
            return Ok(0);
        }
        let mut i = 0;
        while i < PREFIX_CAP {
            if i >= len {
                break;
            }
            if path[i] != prefix_byte(i) {
                return Ok(0);
            }
            i += 1;
        }

        // One block copy (`len <= PREFIX_CAP`, so `len + DEVICE_CAP < PATH_BUF`): a byte loop
        // here was unrolled into 32 registers that the compiler spilled across the helper calls
        // below, 256 bytes of the 512-byte BPF stack.
        let mut device = [0u8; DEVICE_CAP];
        device.copy_from_slice(&path[len..len + DEVICE_CAP]);

        let pid_tgid = bpf_get_current_pid_tgid();
        let tgid = (pid_tgid >> 32) as u32;
        // SAFETY: helpers with no arguments and no preconditions.
        let (now, cgroup_id) = unsafe { (bpf_ktime_get_ns(), bpf_get_current_cgroup_id()) };
        let comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);

        match OPENS.get_ptr_mut(tgid) {
            Some(rec) => {
                // SAFETY: the pointer comes from a successful lookup of a preallocated LRU
                // entry; a racing update can at worst leave mixed fields, never a fault.
                unsafe {
                    (*rec).last_open_ns = now;
                    (*rec).device = device;
                }
            }
            None => {
                let rec = OpenRecord {
                    first_open_ns: now,
                    last_open_ns: now,
                    cgroup_id,
                    comm,
                    device,
                };
                // A failed insert only loses the exit event for this process; the open event
                // still goes out.
                let _ = OPENS.insert(tgid, &rec, 0);
            }
        }

        send(
            EVENT_OPEN,
            tgid,
            pid_tgid as u32,
            cgroup_id,
            now,
            &comm,
            &device,
        );
        Ok(0)
    }

    /// Byte `i` (< [`PREFIX_CAP`]) of `DEVICE_PREFIX`, read on its own: `Global::load` reads
    /// all 32 bytes at once (volatile, byte by byte), and the compiler spilled them to the BPF
    /// stack, 256 bytes of the 512 the verifier allows.
    #[inline(always)]
    fn prefix_byte(i: usize) -> u8 {
        // SAFETY: `Global<T>` is `repr(transparent)` over `MaybeUninit<T>`, always initialised
        // (with the default or the loader's value), so the static is a `[u8; PREFIX_CAP]` and
        // byte `i < PREFIX_CAP` is in bounds; volatile for the same reason `Global::load` is:
        // the loader rewrites the value after compilation.
        unsafe { core::ptr::read_volatile(core::ptr::from_ref(&DEVICE_PREFIX).cast::<u8>().add(i)) }
    }

    fn try_exit(_ctx: &TracePointContext) -> Result<u32, u32> {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tgid = (pid_tgid >> 32) as u32;
        if pid_tgid as u32 != tgid {
            return Ok(0);
        }
        let Some(rec) = OPENS.get_ptr(tgid) else {
            return Ok(0);
        };
        // SAFETY: pointer from a successful lookup; the fields are copied out before the
        // entry is removed.
        let (cgroup_id, comm, device) = unsafe { ((*rec).cgroup_id, (*rec).comm, (*rec).device) };
        let _ = OPENS.remove(tgid);
        // SAFETY: helper with no arguments and no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        send(EVENT_EXIT, tgid, tgid, cgroup_id, now, &comm, &device);
        Ok(0)
    }

    /// Writes an [`Event`] straight into ring-buffer memory (no copy of it on the BPF stack,
    /// which the verifier caps at 512 bytes for a program and the functions it calls), or
    /// counts it in `DROPPED` when the ring buffer is full.
    #[inline(always)]
    fn send(
        kind: u32,
        tgid: u32,
        pid: u32,
        cgroup_id: u64,
        ts_ns: u64,
        comm: &[u8; COMM_LEN],
        device: &[u8; DEVICE_CAP],
    ) {
        match EVENTS.reserve::<Event>(0) {
            Some(mut entry) => {
                let event = entry.as_mut_ptr();
                // SAFETY: `event` points at `size_of::<Event>()` reserved, 8-byte aligned bytes
                // that only this program writes until `submit`; every field is written.
                unsafe {
                    (*event).kind = kind;
                    (*event).tgid = tgid;
                    (*event).pid = pid;
                    (*event)._pad = 0;
                    (*event).cgroup_id = cgroup_id;
                    (*event).ts_ns = ts_ns;
                    (*event).comm = *comm;
                    (*event).device = *device;
                }
                entry.submit(0);
            }
            None => {
                if let Some(n) = DROPPED.get_ptr_mut(0) {
                    // SAFETY: slot 0 exists (one entry) and is this CPU's own; tracepoint
                    // programs do not migrate mid-run.
                    unsafe { *n += 1 };
                }
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    /// GPL-compatible licence: needed for `bpf_probe_read_user_str` and the ring buffer helpers.
    #[link_section = "license"]
    #[no_mangle]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
