//! The image runs on its own: built by the same code `cargo xtask deploy --registry` runs (from
//! the debug binaries, to save build time), pushed to a real registry started here on loopback
//! (Debian's `docker-registry`, installed by `cargo xtask test`'s set-up), pulled back by digest,
//! unpacked into a folder, and run there with `chroot`: `--help` of both binaries, then the
//! agent against the fake NVML copied in, read back with `dump --json` in the same chroot.
//!
//! Needs root (chroot) and `docker-registry`; prints why it skips without them, and fails when
//! `CI` is set (CI runs the set-up as root).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::Scratch;
use gpuscale_deploy::registry::LocalRegistry;

const TEST: &str = "the_image_pushed_to_a_registry_runs_the_agent_from_its_own_layers_under_chroot";

fn skip_or_fail(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{TEST}: {why}; CI runs `cargo xtask test` as root, whose set-up should provide it");
    }
    eprintln!("skipped: {TEST}: {why}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs `args` inside `root` with `chroot` and a minimal environment.
fn in_chroot(root: &Path, args: &[&str]) -> Command {
    // By absolute path: the cleared environment's PATH is the image's, not ours.
    let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chroot (coreutils)");
    let mut c = Command::new(chroot);
    c.arg(root)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("RUST_LOG", "info");
    c
}

#[test]
fn the_image_pushed_to_a_registry_runs_the_agent_from_its_own_layers_under_chroot() {
    if !is_root() {
        skip_or_fail("chroot needs root");
        return;
    }
    if !LocalRegistry::installed() {
        skip_or_fail(LocalRegistry::MISSING);
        return;
    }
    let scratch = Scratch::new("image");
    let registry = LocalRegistry::start(&scratch.path("registry"), e2e::free_port())
        .unwrap_or_else(|why| panic!("{why}"));
    let bins = e2e::ensure_built();
    let host = registry.host();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let binaries = vec![bins.agent.clone(), bins.collector.clone()];
    let mut lines = Vec::new();
    let (image, pinned) = rt
        .block_on(gpuscale_deploy::build_and_push(
            &binaries,
            &host,
            false,
            &mut |l| {
                eprintln!("{l}");
                lines.push(l)
            },
        ))
        .unwrap_or_else(|e| panic!("{e}\nregistry log:\n{}", registry.logs()));
    assert_eq!(pinned, format!("{host}/gpuscale@{}", image.digest));
    // Exactly the binaries, the libraries they load and /etc basics: no shell, no package manager.
    for p in &image.paths {
        let ok = p.starts_with("/usr/bin/gpuscale-")
            || p.starts_with("/etc/")
            || p.contains(".so")
            || p == "/lib"
            || p == "/lib64";
        assert!(ok, "unexpected path in the image: {p} ({:?})", image.paths);
    }
    assert!(
        image.paths.iter().any(|p| p.contains("libc.so.6")),
        "{:?}",
        image.paths
    );
    assert!(
        image.paths.iter().any(|p| p.contains("ld-linux")),
        "{:?}",
        image.paths
    );

    // Pulled back by digest from the registry, with a client that has nothing cached.
    let client = gpuscale_deploy::registry::Registry::new(&pinned, false).unwrap();
    let (manifest, layers) = rt.block_on(client.pull(&pinned)).unwrap();
    assert_eq!(
        gpuscale_deploy::image::sha256_digest(&manifest),
        image.digest
    );
    assert_eq!(layers.len(), 2);
    let root = scratch.path("rootfs");
    gpuscale_deploy::image::unpack(&layers, &root).unwrap();
    assert!(
        !root.join("bin/sh").exists() && !root.join("usr/bin/sh").exists(),
        "no shell"
    );

    for bin in ["gpuscale-agent", "gpuscale-collector"] {
        let out = in_chroot(&root, &[&format!("/usr/bin/{bin}"), "--help"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Usage"),
            "{bin} --help in the image failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A short run against the fake NVML, copied in: the only thing the image lacks is the
    // driver's library, which the NVIDIA runtime mounts in a cluster.
    std::fs::create_dir_all(root.join("opt/fake-nvml")).unwrap();
    std::fs::copy(&bins.fake_nvml, root.join("opt/fake-nvml/libfake_nvml.so")).unwrap();
    let mut gpu = e2e::gpu(0);
    gpu["uuid"] = "GPU-c4e0070a-0000-4000-8000-00000000beef".into();
    gpu["gpu_util"] = 61.into();
    e2e::write_scenario(&root.join("tmp/scenario.json"), &[gpu]);
    let log = scratch.path("agent.log");
    let mut agent = in_chroot(
        &root,
        &[
            "/usr/bin/gpuscale-agent",
            "run",
            "--nvml-lib",
            "/opt/fake-nvml/libfake_nvml.so",
            "--ebpf",
            "off",
            "--shm",
            "/tmp/gpuscale/x.ring",
            "--node-name",
            "chroot-node",
            "--interval",
            "100ms",
        ],
    )
    .env("FAKE_NVML_SCENARIO", "/tmp/scenario.json")
    .stdout(Stdio::null())
    .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
    .spawn()
    .unwrap();
    let dumped = e2e::wait_json(
        Duration::from_secs(60),
        || {
            if let Ok(Some(status)) = agent.try_wait() {
                anyhow::bail!("the agent exited early ({status})");
            }
            let out = in_chroot(
                &root,
                &[
                    "/usr/bin/gpuscale-agent",
                    "dump",
                    "--shm",
                    "/tmp/gpuscale/x.ring",
                    "--json",
                ],
            )
            .output()?;
            anyhow::ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(serde_json::from_slice(&out.stdout)?)
        },
        |d| {
            d["gpus"][0]["uuid"] == "GPU-c4e0070a-0000-4000-8000-00000000beef"
                && d["gpus"][0]["metrics"]["gpu_util"]["last"] == 61.0
        },
    );
    e2e::signal(agent.id(), libc_sigterm());
    let status = agent.wait().unwrap();
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    let dumped = dumped.unwrap_or_else(|e| panic!("{e}\nagent log:\n{agent_log}"));
    assert_eq!(dumped["node"], "chroot-node");
    assert!(
        status.success(),
        "the agent did not stop cleanly on SIGTERM ({status}):\n{agent_log}"
    );
    drop(registry);
}

/// SIGTERM's number on Linux (every architecture Rust supports there).
fn libc_sigterm() -> i32 {
    15
}
