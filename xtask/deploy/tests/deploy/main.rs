//! The installer's integration tests, in one test binary (each binary links kube and the
//! registry client, which costs CI time): [`manifests`] (deploy/ against the schemas and the
//! least-privilege rules, the examples, the installer without a cluster), [`cluster_api`] (its
//! API calls against recorded objects) and [`image`] (the image through a real registry, run
//! under chroot).

mod cluster_api;
mod image;
mod manifests;
