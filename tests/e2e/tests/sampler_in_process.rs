//! The sampler library in-process against the fake NVML, so the test can ask the fake how often
//! each NVML function was called. One test per binary: NVML state is process-global.

use std::ffi::CString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::daemon::{self, Config};
use agent::shm::ShmReader;
use agent::stop::Stop;
use e2e::{fake_nvml, gpu, write_scenario, Scratch};
use serde_json::json;

/// Calls the fake's `fake_nvml_calls` test hook on the already loaded library.
fn calls(symbol: &str) -> u64 {
    let lib = CString::new(fake_nvml().to_str().unwrap()).unwrap();
    // SAFETY: RTLD_NOLOAD only returns a handle to the library nvml-wrapper already loaded.
    let handle = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    assert!(!handle.is_null(), "fake NVML is not loaded in this process");
    let name = CString::new("fake_nvml_calls").unwrap();
    // SAFETY: looking up an exported symbol of a loaded library.
    let sym = unsafe { libc::dlsym(handle, name.as_ptr()) };
    assert!(!sym.is_null(), "fake NVML lacks fake_nvml_calls");
    // SAFETY: the fake exports `extern "C" fn(*const c_char) -> u64` under that name.
    let f: extern "C" fn(*const libc::c_char) -> u64 = unsafe { std::mem::transmute(sym) };
    let s = CString::new(symbol).unwrap();
    let n = f(s.as_ptr());
    // SAFETY: balances the dlopen above; the library stays loaded (nvml-wrapper holds it).
    unsafe { libc::dlclose(handle) };
    n
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn per_process_utilization_is_read_only_for_shared_gpus_and_off_the_sample_path() {
    let dir = Scratch::new("procutil");
    let scenario = dir.path("scenario.json");
    // Two GPUs with one process each: nothing to split, so the 2.5 ms call must not be made.
    write_scenario(&scenario, &[gpu(0), gpu(1)]);
    std::env::set_var("FAKE_NVML_SCENARIO", &scenario);
    let config = Config {
        nvml_lib: fake_nvml().to_owned(),
        shm: dir.path("agent.ring"),
        interval: Duration::from_millis(50),
        node_name: "in-process".into(),
        proc_root: "/proc".into(),
        ebpf: agent::ebpf::EbpfConfig {
            mode: agent::ebpf::EbpfMode::Off,
            ..Default::default()
        },
        listen: None,
        http_listen: None,
        tls: None,
    };
    let stop = Arc::new(Stop::default());
    let s2 = stop.clone();
    let c2 = config.clone();
    let runner = std::thread::spawn(move || daemon::run(&c2, &s2));

    let samples = |gpu: usize| {
        ShmReader::open(&config.shm)
            .ok()
            .map_or(0, |r| r.regions()[gpu].ring().head())
    };
    // 1.5 s at 50 ms covers more than one process-utilization period (1 s).
    wait_for("30 samples", Duration::from_secs(30), || samples(0) >= 30);
    assert_eq!(calls("nvmlDeviceGetProcessUtilization"), 0);
    assert!(calls("nvmlDeviceGetUtilizationRates") >= 30);

    // GPU 1 becomes shared by two processes, and its per-process call becomes slow (300 ms,
    // like a very slow driver): the split appears, and GPU 1 keeps being sampled meanwhile.
    let mut shared = gpu(1);
    shared["processes"] = json!([
        {"pid": 7001, "used_memory_mib": 9000, "sm_util": 20},
        {"pid": 7002, "used_memory_mib": 3000, "sm_util": 5}
    ]);
    shared["process_util_delay_ms"] = json!(300);
    let (start0, start1) = (samples(0), samples(1));
    write_scenario(&scenario, &[gpu(0), shared]);
    wait_for(
        "per-process sm_util on the shared GPU",
        Duration::from_secs(30),
        || {
            let Ok(r) = ShmReader::open(&config.shm) else {
                return false;
            };
            let snap = r.regions()[1].processes().unwrap_or_default();
            let utils: Vec<Option<f32>> = snap.processes.iter().map(|p| p.sm_util).collect();
            utils == [Some(20.0), Some(5.0)]
        },
    );
    assert!(calls("nvmlDeviceGetProcessUtilization") > 0);
    // Off the sample path: the shared GPU got about as many samples as the other one. Had the
    // slow call run on its sampler thread, it would have lost 300-600 ms of every second.
    let (d0, d1) = (samples(0) - start0, samples(1) - start1);
    assert!(d1 * 10 >= d0 * 8, "shared GPU sampled {d1} times vs {d0}");
    // GPU 0 still has a single process: its snapshot has no split.
    let r = ShmReader::open(&config.shm).unwrap();
    let snap0 = r.regions()[0].processes().unwrap();
    assert_eq!(snap0.processes.len(), 1);
    assert_eq!(snap0.processes[0].sm_util, None);

    stop.trigger();
    runner.join().unwrap().unwrap();
}
