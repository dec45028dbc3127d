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

/// What a watch tells its owner.
pub enum Change<K> {
    /// The complete list (after the first list and after every re-list).
    Reset(Vec<K>),
    /// One object was added or changed.
    Apply(K),
    /// One object was deleted.
    Delete(K),
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
pub async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    resource: &str,
    scope: &str,
    contact: &Mutex<Contact>,
    mut on: impl FnMut(Change<K>),
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<Vec<K>> = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                lock(contact).ok();
                match event {
                    watcher::Event::Init => listing = Some(Vec::new()),
                    watcher::Event::InitApply(k) => listing.get_or_insert_with(Vec::new).push(k),
                    watcher::Event::InitDone => {
                        let all = listing.take().unwrap_or_default();
                        tracing::info!(resource, scope, objects = all.len(), "listed");
                        on(Change::Reset(all));
                        lock(contact).synced = true;
                    }
                    watcher::Event::Apply(k) => on(Change::Apply(k)),
                    watcher::Event::Delete(k) => on(Change::Delete(k)),
                }
            }
            Err(e) => lock(contact).failed(explain(&e, resource, scope)),
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
}
