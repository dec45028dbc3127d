//! Loading and attaching the eBPF object: the preflight checks that turn a refusal into a reason
//! (root or CAP_BPF, kernel version, tracefs), the memlock limit, and the open hook (fentry on
//! `do_sys_openat2` where the kernel allows it, else the syscall tracepoints).

use super::*;

pub(super) fn ebpf_err(why: impl Into<String>) -> Error {
    Error::Ebpf { why: why.into() }
}

pub(super) use gpuscale_health::ops::error_chain as chain;

/// Attaches the open hook `wanted` says: fentry on `do_sys_openat2` when the kernel allows it
/// (`Auto` falls back to the syscall tracepoints, logging why), or the
/// tracepoints. Returns the hook attached.
pub(super) fn attach_open(ebpf: &mut aya::Ebpf, wanted: OpenHook) -> Result<OpenHook> {
    if wanted != OpenHook::Tracepoint {
        match attach_fentry(ebpf) {
            Ok(()) => return Ok(OpenHook::Fentry),
            Err(e) if wanted == OpenHook::Fentry => return Err(e),
            Err(e) => tracing::info!(
                "the kernel refused the fentry open hook ({e}); using the syscall tracepoints, \
                 which slow every syscall a little while attached"
            ),
        }
    }
    for (program, category, name) in common::TRACEPOINTS_OPEN {
        attach(ebpf, program, category, name)?;
    }
    Ok(OpenHook::Tracepoint)
}

pub(super) fn attach_fentry(ebpf: &mut aya::Ebpf) -> Result<()> {
    let (program, function) = common::FENTRY_OPEN;
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| ebpf_err(format!("reading the kernel's BTF failed: {}", chain(&e))))?;
    let prog: &mut aya::programs::FEntry = ebpf
        .program_mut(program)
        .ok_or_else(|| ebpf_err(format!("the eBPF object has no program {program}")))?
        .try_into()
        .map_err(|e| ebpf_err(format!("{program} is not an fentry program: {e}")))?;
    prog.load(function, &btf).map_err(|e| {
        ebpf_err(format!(
            "the kernel rejected the {program} program: {}",
            chain(&e)
        ))
    })?;
    prog.attach().map_err(|e| {
        ebpf_err(format!(
            "attaching fentry to {function} failed: {}",
            chain(&e)
        ))
    })?;
    Ok(())
}

pub(super) fn attach(
    ebpf: &mut aya::Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> Result<()> {
    let prog: &mut aya::programs::TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| ebpf_err(format!("the eBPF object has no program {program}")))?
        .try_into()
        .map_err(|e| ebpf_err(format!("{program} is not a tracepoint program: {e}")))?;
    prog.load().map_err(|e| {
        ebpf_err(format!(
            "the kernel rejected the {program} program: {}",
            chain(&e)
        ))
    })?;
    prog.attach(category, name).map_err(|e| {
        ebpf_err(format!(
            "attaching to tracepoint {category}/{name} failed: {}",
            chain(&e)
        ))
    })?;
    Ok(())
}

/// Checks what makes loading fail in ways aya's errors do not explain well: privileges, the
/// kernel version, tracefs.
pub(super) fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let caps = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| effective_caps(&s))
            .unwrap_or(0);
        const CAP_SYS_ADMIN: u32 = 21;
        const CAP_PERFMON: u32 = 38;
        const CAP_BPF: u32 = 39;
        let has = |c: u32| caps & (1u64 << c) != 0;
        if !(has(CAP_SYS_ADMIN) || has(CAP_BPF) && has(CAP_PERFMON)) {
            return Err(ebpf_err(
                "loading eBPF needs root or CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); this \
                 process has neither (run the agent privileged or add those capabilities)",
            ));
        }
    }
    if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        if let Some(version) = kernel_version(&release) {
            if version < MIN_KERNEL {
                return Err(ebpf_err(format!(
                    "kernel {} is too old: the eBPF program needs {}.{} or newer (ring buffer \
                     maps)",
                    release.trim(),
                    MIN_KERNEL.0,
                    MIN_KERNEL.1
                )));
            }
        }
    }
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|d| Path::new(d).join("events/syscalls").is_dir());
    if !tracefs {
        return Err(ebpf_err(
            "tracefs is not mounted (no /sys/kernel/tracing/events/syscalls): mount it with \
             `mount -t tracefs nodev /sys/kernel/tracing` (in a pod, mount the host's \
             /sys/kernel/tracing)",
        ));
    }
    Ok(())
}

/// The `CapEff` bits of a `/proc/<pid>/status` text.
pub(super) fn effective_caps(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// `(major, minor)` of a kernel release string such as `6.18.44-fc-v657`.
pub(super) fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (as aya's template does).
pub(super) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: passes a valid rlimit struct by pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not lift RLIMIT_MEMLOCK ({}); fine on kernels 5.11+",
            std::io::Error::last_os_error()
        );
    }
}
