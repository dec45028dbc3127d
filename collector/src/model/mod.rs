//! The collector's pure logic: what a trigger means and how its value comes about. Nothing here
//! does I/O, reads a clock (time is passed in), or decides a gRPC status code, so every rule is a
//! plain unit test.
//!
//! - [`trigger`]: KEDA trigger metadata → a validated [`trigger::Trigger`], and what the
//!   aggregation names mean.
//! - [`compiled`]: each distinct trigger metadata parsed once, in a bounded LRU cache.
//! - [`selector`]: Kubernetes label selectors in their string form, parsed and matched as
//!   `kubectl -l` does.
//! - [`evaluate`]: one trigger's value over the cluster view and the matched pods.
//! - [`hpa`]: the replica count the HPA asks for, given that value.

/// The names of the enums users write (`timeAggregation`, `gpuAggregation`, `aggregation`,
/// `--metric-type`), derived with strum: the variants in the order error messages list them,
/// and each one's exact, case-sensitive name.
pub trait Named:
    Sized + Copy + 'static + strum::VariantArray + Into<&'static str> + std::str::FromStr
{
    /// Every value, in the order error messages list them.
    const ALL: &'static [Self] = Self::VARIANTS;

    /// The name as written in trigger metadata or on the command line.
    fn name(self) -> &'static str {
        self.into()
    }

    /// The value with this exact (case-sensitive) name, if any.
    fn from_name(name: &str) -> Option<Self> {
        name.parse().ok()
    }
}

pub mod compiled;
pub mod evaluate;
pub mod hpa;
pub mod selector;
pub mod trigger;
