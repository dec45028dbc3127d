//! Shared helpers: locating (or building) the cdylib, scenario files,
//! serialization of tests, the `fake_nvml_calls` hook, child processes.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::ffi::{c_char, CString, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

/// Set in a child process started by [`run_in_child`].
pub const CHILD_ENV: &str = "FAKE_NVML_TEST_CHILD";
/// Longer than the fake's 1 ms re-stat period.
pub const RELOAD_WAIT: Duration = Duration::from_millis(5);

static SERIAL: Mutex<()> = Mutex::new(());

/// NVML state and `FAKE_NVML_SCENARIO` are process-global: one test at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Path of `libfake_nvml.so`, building it if there is none next to the test binary.
pub fn lib_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(find_or_build_lib)
}

fn lib_file_name() -> String {
    format!(
        "{}fake_nvml{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The newest of `target/<profile>/deps/libfake_nvml.so` and `target/<profile>/libfake_nvml.so`.
fn find_lib(profile_dir: &Path) -> Option<PathBuf> {
    let name = lib_file_name();
    [
        profile_dir.join("deps").join(&name),
        profile_dir.join(&name),
    ]
    .into_iter()
    .filter_map(|p| {
        let modified = p.metadata().ok()?.modified().ok()?;
        Some((modified, p))
    })
    .max_by_key(|(modified, _)| *modified)
    .map(|(_, p)| p)
}

fn find_or_build_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    // `cargo test` builds the lib target (cdylib included) before the test
    // binaries that depend on it; the fallback covers other ways of running.
    if let Some(path) = find_lib(profile_dir) {
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let target_dir = profile_dir
        .parent()
        .expect("target dir above the profile dir");
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "fake-nvml", "--lib", "--profile"])
        .arg(&profile)
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build -p fake-nvml");
    assert!(
        status.success(),
        "cargo build -p fake-nvml failed: {status}"
    );
    find_lib(profile_dir).unwrap_or_else(|| {
        panic!(
            "{} not found under {} after building it",
            lib_file_name(),
            profile_dir.display()
        )
    })
}

/// A scenario file in its own directory under the target tmpdir, removed on drop.
pub struct ScenarioFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ScenarioFile {
    /// Writes `json` to a fresh file.
    pub fn new(json: &serde_json::Value) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "fake-nvml-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scenario dir");
        let file = ScenarioFile {
            path: dir.join("scenario.json"),
            dir,
        };
        file.write(json);
        file
    }

    /// Path of the scenario file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Atomically replaces the scenario (write a temporary file, then rename).
    pub fn write(&self, json: &serde_json::Value) {
        self.write_raw(&json.to_string());
    }

    /// Atomically replaces the file with arbitrary text.
    pub fn write_raw(&self, text: &str) {
        let tmp = self.dir.join("scenario.json.tmp");
        std::fs::write(&tmp, text).expect("write temporary scenario");
        std::fs::rename(&tmp, &self.path).expect("rename scenario into place");
    }

    /// Points `FAKE_NVML_SCENARIO` here and initializes NVML through nvml-wrapper.
    pub fn init(&self) -> Nvml {
        self.try_init().expect("nvml init with the fake library")
    }

    /// Like [`ScenarioFile::init`] but returns the error.
    pub fn try_init(&self) -> Result<Nvml, NvmlError> {
        std::env::set_var("FAKE_NVML_SCENARIO", &self.path);
        init_fake()
    }
}

impl Drop for ScenarioFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `Nvml::builder().lib_path(<fake>).init()` with whatever environment is set.
pub fn init_fake() -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(lib_path().as_os_str()).init()
}

/// The exported symbol `name` of the library `nvml` loaded.
///
/// # Safety
///
/// `T` must be the function pointer type matching the symbol's C signature.
pub unsafe fn symbol<T: Copy>(nvml: &Nvml, name: &str) -> T {
    let c_name = CString::new(name).expect("symbol name without NUL");
    // SAFETY: the caller vouches for `T`; the pointer is used while `nvml` keeps
    // the library loaded.
    let symbol = unsafe { nvml.lib().__library.get::<T>(c_name.as_bytes_with_nul()) };
    *symbol.unwrap_or_else(|e| panic!("{name} is not exported: {e}"))
}

type CallsFn = unsafe extern "C" fn(*const c_char) -> u64;

/// `fake_nvml_calls(name)` of the library instance `nvml` loaded.
pub fn calls(nvml: &Nvml, name: &str) -> u64 {
    let name = CString::new(name).expect("function name without NUL");
    // SAFETY: `fake_nvml_calls` has the C signature `CallsFn`.
    let hook: CallsFn = unsafe { symbol(nvml, "fake_nvml_calls") };
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    unsafe { hook(name.as_ptr()) }
}

/// Whether this process is a child started by [`run_in_child`].
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs the test `name` of this binary alone in a child process, asserts it
/// passed, and returns its stderr (where the fake's diagnostics go).
pub fn run_in_child(name: &str) -> String {
    let exe = std::env::current_exe().expect("path of the test binary");
    let output = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env_remove("FAKE_NVML_SCENARIO")
        .output()
        .expect("run the test binary as a child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "child test {name} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("1 passed"),
        "child did not run exactly test {name}:\n{stdout}"
    );
    stderr
}

/// The lines of `stderr` written by the fake.
pub fn fake_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("fake-nvml: "))
        .collect()
}
