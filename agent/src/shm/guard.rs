//! No SIGBUS from a truncated ring file.
//!
//! A shared file mapping past the end of its file faults with SIGBUS on the next access, which
//! would kill the agent in the middle of a sample. [`Guard::new`] registers the writer's mapping
//! with a process-wide SIGBUS handler: a fault inside a registered range replaces that whole
//! range with anonymous zero pages (`mmap(MAP_FIXED | MAP_ANONYMOUS)`, as Wayland compositors do
//! for their clients' shared buffers) and marks it hit; the faulting write then completes into
//! memory nobody reads, and [`Guard::hit`] tells the agent, which stops with an error naming the
//! file so that its restart writes a new one. A SIGBUS anywhere else goes to the action that was
//! there before (by default: the process dies, as it would have).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// How many mappings may be guarded at once (one per open writer; tests open a few).
const SLOTS: usize = 32;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    hit: AtomicBool::new(false),
};

static SLOTS_IN_USE: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
/// The SIGBUS action before ours, to hand foreign faults to.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::zeroed();

/// The SIGBUS handler: async-signal-safe (atomics, `mmap`, `sigaction`).
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS_IN_USE {
        let (start, len) = (
            slot.start.load(Ordering::Acquire),
            slot.len.load(Ordering::Acquire),
        );
        // 0: free; usize::MAX: being registered (its start is not written yet).
        if len == 0 || len == usize::MAX || addr < start || addr >= start + len {
            continue;
        }
        // SAFETY: [start, start + len) is a mapping the registered writer owns (registered
        // with its exact range and unregistered before it is unmapped); replacing it with
        // anonymous memory of the same size keeps every pointer into it valid.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            slot.hit.store(true, Ordering::Release);
            return;
        }
    }
    // Not ours (or the remap failed): put the previous action back; returning re-runs the
    // faulting access, which then gets it.
    // SAFETY: PREVIOUS was filled by sigaction before this handler was installed.
    unsafe {
        libc::sigaction(
            libc::SIGBUS,
            std::ptr::addr_of!(PREVIOUS).cast(),
            std::ptr::null_mut(),
        );
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature and
        // PREVIOUS is written here once, before the handler can run.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(
                libc::SIGBUS,
                &action,
                std::ptr::addr_of_mut!(PREVIOUS).cast(),
            );
        }
    });
}

/// A registered mapping, released by [`Guard::release`] or on drop, before the mapping it
/// guards is unmapped.
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
    released: AtomicBool,
    /// Whether the mapping was hit, as it was when released.
    hit_when_released: AtomicBool,
}

impl Guard {
    /// Guards the mapping `[start, start + len)`. Without a free slot the mapping is unguarded
    /// (logged): a truncation then kills the process, as without this module.
    pub fn new(start: *const u8, len: usize) -> Guard {
        install();
        let mut guard = Guard {
            slot: None,
            released: AtomicBool::new(false),
            hit_when_released: AtomicBool::new(false),
        };
        for (i, slot) in SLOTS_IN_USE.iter().enumerate() {
            if slot
                .len
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.hit.store(false, Ordering::Release);
                slot.start.store(start as usize, Ordering::Release);
                slot.len.store(len, Ordering::Release);
                guard.slot = Some(i);
                return guard;
            }
        }
        tracing::warn!("more than {SLOTS} ring mappings open: this one has no SIGBUS guard");
        guard
    }

    /// Whether the file under the mapping was found truncated (a SIGBUS was caught in it).
    pub fn hit(&self) -> bool {
        if self.released.load(Ordering::Acquire) {
            return self.hit_when_released.load(Ordering::Acquire);
        }
        self.slot
            .is_some_and(|i| SLOTS_IN_USE[i].hit.load(Ordering::Acquire))
    }

    /// Stops guarding (the mapping is about to go); the slot is free for another mapping.
    pub fn release(&self) {
        let Some(i) = self.slot else {
            return;
        };
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = &SLOTS_IN_USE[i];
        self.hit_when_released
            .store(slot.hit.load(Ordering::Acquire), Ordering::Release);
        slot.start.store(0, Ordering::Release);
        slot.len.store(0, Ordering::Release);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.release();
    }
}
