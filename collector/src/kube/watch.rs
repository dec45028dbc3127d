//! Following one watch of the Kubernetes API (kube-rs's watcher: list, then watch; re-list after
//! `410 Gone`; backoff after errors) and [`Contact`], whether what it listed can be trusted.
//! Owns the wording of watch errors (RBAC refusals name the verb and resource to grant); knows
//! nothing of what is watched.

use std::sync::Mutex;
use std::time::Instant;

use gpuscale_health::ops::lock;
use kube::api::Api;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Resource;
use tokio_stream::StreamExt;

use crate::sources::pods::SourceHealth;

/// Whether a watch can be trusted: synced once, and in contact now.
#[derive(Debug, Default)]
pub struct Contact {
    /// A complete list arrived at least once.
    pub synced: bool,
    /// Since when the watch has been failing, and why.
    out_since: Option<(Instant, String)>,
}

impl Contact {
    /// The watch delivered an event: back in contact.
    pub fn ok(&mut self) {
        if self.out_since.take().is_some() {
            tracing::info!("back in contact with the Kubernetes API");
        }
    }

    /// The watch failed with `why` (logged once per change of message).
    pub fn failed(&mut self, why: String) {
        match &mut self.out_since {
            Some((_, last)) if *last == why => {}
            Some((_, last)) => {
                tracing::warn!("{why}");
                *last = why;
            }
            None => {
                tracing::warn!("{why}");
                self.out_since = Some((Instant::now(), why));
            }
        }
    }

    /// How far `what` ("pods") can be trusted now.
    pub fn health(&self, what: &str) -> SourceHealth {
        let out = self
            .out_since
            .as_ref()
            .map(|(since, why)| (since.elapsed(), why.clone()));
        SourceHealth {
            unsynced: (!self.synced).then(|| match &out {
                Some((_, why)) => format!("{what} not listed from the Kubernetes API yet: {why}"),
                None => format!("{what} not listed from the Kubernetes API yet"),
            }),
            out_of_contact: out,
            ..SourceHealth::default()
        }
    }
}

/// What a watch tells its owner, each object already converted into the owner's own type `T`
/// (see [`follow`]).
#[derive(Debug, PartialEq)]
pub enum Change<T> {
    /// The complete list (after the first list and after every re-list): it replaces everything
    /// the owner knew.
    Reset(Vec<T>),
    /// One object was added or changed.
    Apply(T),
    /// One object was deleted.
    Delete(T),
}

/// Explains a watch error; a refusal by RBAC names the verb and resource to grant.
pub fn explain(e: &watcher::Error, resource: &str, scope: &str) -> String {
    let (verb, err) = match e {
        watcher::Error::InitialListFailed(err) => ("list", err),
        watcher::Error::WatchStartFailed(err) | watcher::Error::WatchFailed(err) => ("watch", err),
        watcher::Error::WatchError(status) => {
            return format!(
                "watching {resource} {scope}: the API server said {} ({})",
                status.message, status.code
            )
        }
        watcher::Error::NoResourceVersion => {
            return format!("watching {resource} {scope}: the list had no resourceVersion")
        }
    };
    match err {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden by RBAC: the collector may not {verb} {resource} {scope}; grant its \
             ServiceAccount get, list and watch on {resource} (docs/INSTALL.md lists the \
             ClusterRole) [API server: {}]",
            status.message
        ),
        other => format!("cannot {verb} {resource} {scope}: {other}"),
    }
}

/// Runs a watch of `api` until the task is dropped, handing changes to `on` and keeping
/// `contact` up to date.
///
/// Every object is passed through `convert` as it arrives, and only what that returns is kept:
/// a listing of 100,000 pods holds 100,000 small values until it is complete, never the full
/// objects (managed fields, specs, statuses) the API server sent. An object `convert` turns into
/// `None` is skipped: not kept, not handed on (the owner logs why, if it should).
pub async fn follow<K, T>(
    api: Api<K>,
    config: watcher::Config,
    resource: &str,
    scope: &str,
    contact: &Mutex<Contact>,
    convert: impl Fn(K) -> Option<T>,
    mut on: impl FnMut(Change<T>),
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing = Listing::default();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                lock(contact).ok();
                let done = matches!(event, watcher::Event::InitDone);
                if let Some(change) = listing.step(event, &convert) {
                    if let Change::Reset(kept) = &change {
                        tracing::info!(
                            resource,
                            scope,
                            objects = listing.listed,
                            kept = kept.len(),
                            "listed"
                        );
                    }
                    on(change);
                }
                if done {
                    lock(contact).synced = true;
                }
            }
            Err(e) => lock(contact).failed(explain(&e, resource, scope)),
        }
    }
}

/// A listing in progress (between `Init` and `InitDone`), converted as it arrives.
struct Listing<T> {
    /// What was kept of the objects listed so far; `None` outside a listing.
    kept: Option<Vec<T>>,
    /// How many objects the last (or current) listing delivered, kept or not.
    listed: usize,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Listing {
            kept: None,
            listed: 0,
        }
    }
}

impl<T> Listing<T> {
    /// Takes one watcher event; returns the change to hand on, if any. `Init` starts a fresh
    /// listing (a re-list after `410 Gone` or an error drops whatever a broken one had);
    /// `InitDone` hands on everything it kept as one [`Change::Reset`].
    fn step<K>(
        &mut self,
        event: watcher::Event<K>,
        convert: &impl Fn(K) -> Option<T>,
    ) -> Option<Change<T>> {
        match event {
            watcher::Event::Init => {
                self.kept = Some(Vec::new());
                self.listed = 0;
                None
            }
            watcher::Event::InitApply(k) => {
                self.listed += 1;
                let kept = self.kept.get_or_insert_with(Vec::new);
                kept.extend(convert(k));
                None
            }
            watcher::Event::InitDone => Some(Change::Reset(self.kept.take().unwrap_or_default())),
            watcher::Event::Apply(k) => convert(k).map(Change::Apply),
            watcher::Event::Delete(k) => convert(k).map(Change::Delete),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbac_refusals_name_the_verb_and_resource_to_grant() {
        let forbidden = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            message: "pods is forbidden".into(),
            reason: "Forbidden".into(),
            ..Default::default()
        }));
        let e = explain(
            &watcher::Error::InitialListFailed(forbidden),
            "pods",
            "cluster-wide",
        );
        assert!(
            e.starts_with("forbidden by RBAC: the collector may not list pods cluster-wide"),
            "{e}"
        );
        assert!(
            e.contains("grant its ServiceAccount get, list and watch on pods"),
            "{e}"
        );
    }

    #[test]
    fn contact_is_unsynced_until_listed_and_counts_time_out_of_contact() {
        let mut c = Contact::default();
        assert!(c.health("pods").unsynced.is_some());
        c.failed("connection refused".into());
        let h = c.health("pods");
        assert!(h.unsynced.unwrap().contains("connection refused"));
        assert_eq!(h.out_of_contact.unwrap().1, "connection refused");
        c.synced = true;
        c.ok();
        assert_eq!(c.health("pods"), SourceHealth::default());
    }

    /// A listed object as the tests' `convert` sees it: a name, and whether it is worth keeping.
    #[derive(Debug)]
    struct Big {
        name: &'static str,
        keep: bool,
    }

    #[test]
    fn a_listing_is_converted_as_it_arrives_and_skipped_objects_are_not_kept() {
        use std::cell::RefCell;
        let seen = RefCell::new(Vec::new());
        let convert = |b: Big| {
            seen.borrow_mut().push(b.name);
            b.keep.then_some(b.name.len())
        };
        let big = |name, keep| Big { name, keep };
        let mut l = Listing::default();
        assert_eq!(l.step(watcher::Event::Init, &convert), None);
        for (name, keep) in [("a", true), ("not-indexable", false), ("ccc", true)] {
            assert_eq!(
                l.step(watcher::Event::InitApply(big(name, keep)), &convert),
                None
            );
            // Converted on arrival, not when the listing completes.
            assert_eq!(seen.borrow().last(), Some(&name));
        }
        assert_eq!(
            l.kept.as_deref(),
            Some(&[1, 3][..]),
            "only what convert kept"
        );
        assert_eq!(
            l.step(watcher::Event::InitDone, &convert),
            Some(Change::Reset(vec![1, 3]))
        );
        assert_eq!(l.listed, 3, "the log counts every object listed");
        assert!(l.kept.is_none(), "nothing held after the listing");
        // Single changes are converted too; a skipped one is not handed on.
        assert_eq!(
            l.step(watcher::Event::Apply(big("dd", true)), &convert),
            Some(Change::Apply(2))
        );
        assert_eq!(
            l.step(watcher::Event::Apply(big("x", false)), &convert),
            None
        );
        assert_eq!(
            l.step(watcher::Event::Delete(big("eee", true)), &convert),
            Some(Change::Delete(3))
        );
    }

    #[test]
    fn a_relist_replaces_everything_and_a_broken_listing_is_dropped() {
        let convert = |n: u32| Some(n);
        let mut l = Listing::default();
        l.step(watcher::Event::Init, &convert);
        l.step(watcher::Event::InitApply(1), &convert);
        // The list failed half-way; the watcher starts again from Init.
        l.step(watcher::Event::Init, &convert);
        l.step(watcher::Event::InitApply(2), &convert);
        assert_eq!(
            l.step(watcher::Event::InitDone, &convert),
            Some(Change::Reset(vec![2]))
        );
        // A re-list after 410 Gone that lists nothing still resets: everything is gone.
        l.step(watcher::Event::Init, &convert);
        assert_eq!(
            l.step(watcher::Event::InitDone, &convert),
            Some(Change::Reset(vec![]))
        );
    }
}
