//! The states gpuscale reports: a GPU's health ([`GpuState`]), how a process was tied to its pod
//! ([`Attribution`]), and whether the eBPF tracker runs ([`EbpfState`]). Each has a name (dumps,
//! logs, Prometheus labels), a code stored in the agent's ring file (stable across releases: a
//! test below pins them), and a protobuf enum in the agent API (`proto` converts).

use strum::{Display, FromRepr, IntoStaticStr, VariantArray};

/// Defines what a state enum offers besides its derives: `ALL`, `name()`, and the stored-code
/// pair `code()` and `from_code()`, which reads a code this build does not know as `$fallback`.
macro_rules! stored_code {
    ($ty:ident, $fallback:ident) => {
        impl $ty {
            /// Every state, in the order of their codes.
            pub const ALL: &'static [$ty] = <$ty as strum::VariantArray>::VARIANTS;

            /// The name dumps, logs and labels use.
            pub fn name(self) -> &'static str {
                self.into()
            }

            /// The code stored in the ring file.
            pub fn code(self) -> u8 {
                self as u8
            }

            #[doc = concat!("The state of a stored `code`; a code this build does not know reads as [`", stringify!($ty), "::", stringify!($fallback), "`].")]
            pub fn from_code(code: u64) -> $ty {
                u8::try_from(code)
                    .ok()
                    .and_then($ty::from_repr)
                    .unwrap_or($ty::$fallback)
            }
        }
    };
}

/// Health of one GPU as the agent's sampler last saw it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, IntoStaticStr, Display, FromRepr, VariantArray,
)]
#[strum(serialize_all = "snake_case")]
#[repr(u8)]
pub enum GpuState {
    /// Not sampled yet.
    #[default]
    Starting = 0,
    /// Sampled successfully.
    Ok = 1,
    /// NVML says the GPU fell off the bus (`GPU_IS_LOST`).
    Lost = 2,
    /// NVML returned an unexpected error for the GPU.
    Error = 3,
}
stored_code!(GpuState, Error);

/// How a GPU process was tied (or not) to a pod.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, IntoStaticStr, Display, FromRepr, VariantArray,
)]
#[strum(serialize_all = "snake_case")]
#[repr(u8)]
pub enum Attribution {
    /// Not looked up yet.
    #[default]
    None = 0,
    /// From `/proc/<pid>/cgroup`.
    Procfs = 1,
    /// From the eBPF device-open tracker.
    Ebpf = 2,
    /// Looked up, but the process's cgroup could not be read (it exited, or no permission).
    Unknown = 3,
}
stored_code!(Attribution, None);

/// Whether the agent's eBPF device-open tracker runs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, IntoStaticStr, Display, FromRepr, VariantArray,
)]
#[strum(serialize_all = "snake_case")]
#[repr(u8)]
pub enum EbpfState {
    /// Not reported (an agent that has not started its tracker yet).
    #[default]
    Unknown = 0,
    /// Loaded and attached.
    On = 1,
    /// Turned off with `--ebpf off`.
    Off = 2,
    /// `--ebpf auto` could not load it (the reason says why); procfs is used.
    Unavailable = 3,
}
stored_code!(EbpfState, Unknown);

#[cfg(test)]
mod tests {
    use super::*;

    /// Names and stored codes are contracts (dumps and scripts read the names; ring files written
    /// by an older agent hold the codes).
    #[test]
    fn names_and_stored_codes_are_the_documented_ones() {
        fn pairs<T: Copy>(
            all: &[T],
            name: fn(T) -> &'static str,
            code: fn(T) -> u8,
        ) -> Vec<(&'static str, u8)> {
            all.iter().map(|&v| (name(v), code(v))).collect()
        }
        assert_eq!(
            pairs(GpuState::ALL, GpuState::name, GpuState::code),
            [("starting", 0), ("ok", 1), ("lost", 2), ("error", 3)]
        );
        assert_eq!(
            pairs(Attribution::ALL, Attribution::name, Attribution::code),
            [("none", 0), ("procfs", 1), ("ebpf", 2), ("unknown", 3)]
        );
        assert_eq!(
            pairs(EbpfState::ALL, EbpfState::name, EbpfState::code),
            [("unknown", 0), ("on", 1), ("off", 2), ("unavailable", 3)]
        );
    }

    #[test]
    fn stored_codes_round_trip_and_unknown_codes_fall_back() {
        for &s in GpuState::ALL {
            assert_eq!(GpuState::from_code(s.code().into()), s);
        }
        for &a in Attribution::ALL {
            assert_eq!(Attribution::from_code(a.code().into()), a);
        }
        for &e in EbpfState::ALL {
            assert_eq!(EbpfState::from_code(e.code().into()), e);
        }
        // A newer agent's code, or garbage, never reads as a healthy state.
        for code in [4, 255, 256, u64::MAX] {
            assert_eq!(GpuState::from_code(code), GpuState::Error);
            assert_eq!(Attribution::from_code(code), Attribution::None);
            assert_eq!(EbpfState::from_code(code), EbpfState::Unknown);
        }
    }
}
