//! Binaries → an OCI image, without a Docker daemon and without a base image.
//!
//! The agent is a glibc binary that `dlopen`s the driver's `libnvidia-ml.so.1` at run time (the
//! NVIDIA container runtime or CDI mounts it into the container), so a static musl binary would
//! not do, and no base image can be pulled here. Instead the image holds exactly what the
//! binaries load: their ELF `DT_NEEDED` libraries, resolved the way the dynamic loader resolves
//! them (`ldd`, which also gives the loader itself and the libraries those libraries need),
//! copied from the build machine at the same paths, with the symlinks on the way (`/lib64` →
//! `usr/lib64` on merged-/usr systems) kept as symlinks. Nothing else: no shell, no package
//! manager.
//!
//! Layers: (1) the runtime: those libraries, `/etc/passwd` and `/etc/group` (root and the
//! collector's user 65532), `/etc/nsswitch.conf`, and the empty folders the manifests mount
//! over; (2) the binaries in `/usr/bin`. Both are reproducible (sorted entries, owner 0, a fixed
//! mtime, gzip without a timestamp), so the same binaries give the same digest and re-deploying
//! an unchanged build rolls no pod.
//!
//! It must never talk to a registry: [`crate::registry`] pushes what this builds.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// OCI media type of an image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI media type of an image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// OCI media type of a gzip-compressed layer.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Where the binaries go in the image.
pub const BIN_DIR: &str = "/usr/bin";

/// A content-addressed blob: a layer or the config.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Its OCI media type.
    pub media_type: &'static str,
    /// `sha256:<hex>` of `data`.
    pub digest: String,
    /// The bytes.
    pub data: Vec<u8>,
}

impl Blob {
    fn new(media_type: &'static str, data: Vec<u8>) -> Blob {
        Blob {
            media_type,
            digest: sha256_digest(&data),
            data,
        }
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// A built image: config, layers and the manifest bytes whose digest pins it.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image config.
    pub config: Blob,
    /// The layers, bottom first.
    pub layers: Vec<Blob>,
    /// The manifest exactly as pushed.
    pub manifest: Vec<u8>,
    /// `sha256:<hex>` of `manifest`: what `image@sha256:…` names.
    pub digest: String,
    /// The paths the image holds (files and symlinks), for messages and tests.
    pub paths: Vec<String>,
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// One entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir(u32),
    File { source: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink(PathBuf),
}

/// The shared libraries `binary` needs at load time (including the dynamic loader), as `ldd`
/// resolves them on this machine.
pub fn runtime_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().map_err(|e| {
        Error::Image(format!(
            "cannot run ldd ({e}): it comes with glibc (Debian: libc-bin); install it"
        ))
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(Error::Image(format!(
            "ldd {} failed: {}{}; the image needs a dynamically linked glibc binary (the agent \
             dlopens NVML)",
            binary.display(),
            stdout.trim(),
            stderr.trim()
        )));
    }
    parse_ldd(&stdout).map_err(|why| Error::Image(format!("{}: {why}", binary.display())))
}

/// The library paths in `ldd`'s output. A library `ldd` could not find is an error naming it.
pub fn parse_ldd(output: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!(
                        "needs {} which the dynamic loader cannot find here; install it or set \
                         LD_LIBRARY_PATH for the build",
                        name.trim()
                    ));
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            // The loader (`/lib64/ld-linux-x86-64.so.2 (0x…)`) or the vDSO (`linux-vdso.so.1`).
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    if libs.is_empty() {
        return Err("ldd lists no libraries: not a dynamically linked binary".into());
    }
    Ok(libs)
}

/// Adds `path` as it is on this machine: every symlink on the way (folders included) as a
/// symlink, then the file it leads to, so the same path resolves in the image.
fn add_host_path(entries: &mut BTreeMap<PathBuf, Entry>, path: &Path, hops: usize) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if hops > 40 {
        return Err(Error::Image(format!(
            "{}: too many levels of symlinks",
            path.display()
        )));
    }
    let comps: Vec<Component> = path.components().collect();
    let mut cur = PathBuf::from("/");
    for (i, comp) in comps.iter().enumerate() {
        let Component::Normal(name) = comp else {
            continue;
        };
        let next = cur.join(name);
        let meta = std::fs::symlink_metadata(&next)
            .map_err(|e| Error::Image(format!("{}: {e}", next.display())))?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&next)
                .map_err(|e| Error::Image(format!("{}: {e}", next.display())))?;
            let resolved = normalize(&cur.join(&target));
            entries.insert(next, Entry::Symlink(target));
            let mut rest = resolved;
            for c in &comps[i + 1..] {
                rest.push(c);
            }
            return add_host_path(entries, &rest, hops + 1);
        }
        let last = i + 1 == comps.len();
        if meta.is_dir() {
            entries.entry(next.clone()).or_insert(Entry::Dir(mode));
        } else if last && meta.is_file() {
            entries.insert(
                next.clone(),
                Entry::File {
                    source: next.clone(),
                    mode,
                },
            );
        } else {
            return Err(Error::Image(format!(
                "{} is neither a folder, a file nor a symlink",
                next.display()
            )));
        }
        cur = next;
    }
    Ok(())
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn add_dirs(entries: &mut BTreeMap<PathBuf, Entry>, path: &str, mode: u32) {
    let mut cur = PathBuf::from("/");
    for c in Path::new(path).components().skip(1) {
        cur.push(c);
        entries.entry(cur.clone()).or_insert(Entry::Dir(0o755));
    }
    entries.insert(PathBuf::from(path), Entry::Dir(mode));
}

/// The fixed modification time of every entry (SOURCE_DATE_EPOCH when set, for builds that
/// want a real date; otherwise 0).
fn mtime() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One layer: a tar of `entries`, in path order, then gzip. Returns (gzip blob, diff id).
fn layer(entries: &BTreeMap<PathBuf, Entry>) -> Result<(Blob, String)> {
    let io = |e: std::io::Error| Error::Image(format!("writing a layer: {e}"));
    let mut tar = tar::Builder::new(Vec::new());
    let mtime = mtime();
    for (path, entry) in entries {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        match entry {
            Entry::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                tar.append_data(&mut h, rel, std::io::empty()).map_err(io)?;
            }
            Entry::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, rel, target).map_err(io)?;
            }
            Entry::File { source, mode } => {
                let data = std::fs::read(source)
                    .map_err(|e| Error::Image(format!("{}: {e}", source.display())))?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, rel, data.as_slice()).map_err(io)?;
            }
            Entry::Bytes { data, mode } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, rel, data.as_slice()).map_err(io)?;
            }
        }
    }
    let raw = tar.into_inner().map_err(io)?;
    let diff_id = sha256_digest(&raw);
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).map_err(io)?;
    let compressed = gz.finish().map_err(io)?;
    Ok((Blob::new(LAYER_MEDIA_TYPE, compressed), diff_id))
}

/// The OCI name of this machine's architecture.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

const PASSWD: &str =
    "root:x:0:0:root:/:/nonexistent\nnonroot:x:65532:65532:nonroot:/:/nonexistent\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files dns\n";

/// Builds the image from `binaries` (each copied to [`BIN_DIR`] under its file name) and the
/// libraries they load. `version` goes into the image's labels. `progress` gets one line per
/// step.
pub fn build(
    binaries: &[PathBuf],
    version: &str,
    progress: &mut dyn FnMut(String),
) -> Result<Image> {
    if binaries.is_empty() {
        return Err(Error::Image("no binaries given".into()));
    }
    let mut runtime = BTreeMap::new();
    let mut libs = Vec::new();
    for bin in binaries {
        for lib in runtime_libraries(bin)? {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    for lib in &libs {
        add_host_path(&mut runtime, lib, 0)?;
    }
    let lib_names: Vec<String> = libs
        .iter()
        .filter_map(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    add_dirs(&mut runtime, "/etc", 0o755);
    for (path, text) in [
        ("/etc/passwd", PASSWD),
        ("/etc/group", GROUP),
        ("/etc/nsswitch.conf", NSSWITCH),
    ] {
        runtime.insert(
            PathBuf::from(path),
            Entry::Bytes {
                data: text.as_bytes().to_vec(),
                mode: 0o644,
            },
        );
    }
    add_dirs(&mut runtime, "/tmp", 0o1777);
    for dir in [
        "/proc",
        "/sys",
        "/dev",
        "/var/run/gpuscale",
        "/host/sys/fs/cgroup",
    ] {
        add_dirs(&mut runtime, dir, 0o755);
    }

    let mut app = BTreeMap::new();
    add_dirs(&mut app, BIN_DIR, 0o755);
    let mut bin_names = Vec::new();
    for bin in binaries {
        let name = bin
            .file_name()
            .ok_or_else(|| Error::Image(format!("{} has no file name", bin.display())))?;
        bin_names.push(name.to_string_lossy().into_owned());
        app.insert(
            Path::new(BIN_DIR).join(name),
            Entry::File {
                source: bin.clone(),
                mode: 0o755,
            },
        );
    }

    progress(format!(
        "layer 1/2: the runtime the binaries load ({}) and /etc basics",
        lib_names.join(", ")
    ));
    let (runtime_layer, runtime_diff) = layer(&runtime)?;
    progress(format!(
        "  {} compressed, {}",
        mib(runtime_layer.data.len()),
        runtime_layer.digest
    ));
    progress(format!("layer 2/2: {} in {BIN_DIR}", bin_names.join(", ")));
    let (app_layer, app_diff) = layer(&app)?;
    progress(format!(
        "  {} compressed, {}",
        mib(app_layer.data.len()),
        app_layer.digest
    ));

    let config = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "gpuscale",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.description": "gpuscale-agent and gpuscale-collector with the libraries they load",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [runtime_diff, app_diff]},
        "history": [
            {"created_by": format!("gpuscale-deploy: runtime libraries ({})", lib_names.join(", "))},
            {"created_by": format!("gpuscale-deploy: {}", bin_names.join(", "))},
        ],
    });
    let config = Blob::new(
        CONFIG_MEDIA_TYPE,
        serde_json::to_vec(&config).map_err(|e| Error::Image(e.to_string()))?,
    );
    let layers = vec![runtime_layer, app_layer];
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        "annotations": {"org.opencontainers.image.version": version},
    });
    let manifest = serde_json::to_vec(&manifest).map_err(|e| Error::Image(e.to_string()))?;
    let digest = sha256_digest(&manifest);
    let paths = runtime
        .iter()
        .chain(app.iter())
        .filter(|(_, e)| !matches!(e, Entry::Dir(_)))
        .map(|(p, _)| p.display().to_string())
        .collect();
    Ok(Image {
        config,
        layers,
        manifest,
        digest,
        paths,
    })
}

/// `12.3 MiB`.
pub fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Unpacks gzip-compressed tar layers, bottom first, into `dir` (a root file system to
/// `chroot` into). Entries may not escape `dir`.
pub fn unpack(layers: &[Vec<u8>], dir: &Path) -> Result<()> {
    for (i, data) in layers.iter().enumerate() {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(data.as_slice()));
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        archive.unpack(dir).map_err(|e| {
            Error::Image(format!(
                "unpacking layer {} into {}: {e}",
                i + 1,
                dir.display()
            ))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_the_loader_but_not_the_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_library_ldd_cannot_find_is_named_in_the_error() {
        let e =
            parse_ldd("\tlibnvidia-ml.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n")
                .unwrap_err();
        assert!(e.contains("libnvidia-ml.so.1"), "{e}");
    }

    #[test]
    fn normalize_resolves_dot_dot_without_the_file_system() {
        assert_eq!(
            normalize(Path::new("/lib64/../usr/lib/./x")),
            Path::new("/usr/lib/x")
        );
    }

    #[test]
    fn host_symlinks_on_the_way_to_a_library_are_kept_as_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("usr/lib")).unwrap();
        std::fs::write(dir.join("usr/lib/libx.so.1.2"), b"elf").unwrap();
        std::os::unix::fs::symlink("usr/lib", dir.join("lib")).unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", dir.join("usr/lib/libx.so.1")).unwrap();
        let mut entries = BTreeMap::new();
        add_host_path(&mut entries, &dir.join("lib/libx.so.1"), 0).unwrap();
        assert_eq!(entries[&dir.join("lib")], Entry::Symlink("usr/lib".into()));
        assert_eq!(
            entries[&dir.join("usr/lib/libx.so.1")],
            Entry::Symlink("libx.so.1.2".into())
        );
        assert!(matches!(
            entries[&dir.join("usr/lib/libx.so.1.2")],
            Entry::File { .. }
        ));
        let link = dir.join("lib");
        assert!(!entries.keys().any(|p| p.starts_with(&link) && *p != link));
    }
}
