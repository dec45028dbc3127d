//! End-to-end, privileged: real network faults between the collector and its agents, and what
//! KEDA reads through them. The collector, each agent and toxiproxy run in network namespaces of
//! their own on one bridge (`e2e::netns::Lab`, whose module doc draws it); the test, in the root
//! namespace, is KEDA. Faults: a link taken down or cut further away (the bridge drops what
//! crosses it, both links up: neither kernel knows), a flapping link; through toxiproxy
//! (`e2e::toxiproxy`, on the path collector → proxy → agent) latency, a bandwidth limit, reset
//! connections and a half-open one; the kernel's `tbf` bandwidth limit; an agent and the
//! collector killed and restarted.
//!
//! What every test holds the product to (trigger `staleAfter: 2s`, agents sampling every
//! 100 ms, `timeAggregation: last`, so a value is the GPU's newest sample):
//! - `UNAVAILABLE` within `staleAfter` of the fault, plus [`SLACK`]: the test's 50 ms poll,
//!   the `GetMetrics` round trip, and room for scheduling on a 2-core machine running two tests
//!   (the newest data at the fault was taken at or before it, so the product owes no more);
//! - never a value from a cut-off node presented as fresh: while the fault lasts, an answer is
//!   either `UNAVAILABLE` or the value from before the fault, and the latter only until
//!   `staleAfter` (+ [`SLACK`]) has passed;
//! - the correct value (changed during the fault) within [`HEAL`] = 2 s of the heal;
//! - nothing lost from the agent's ring: it kept sampling through the fault.
//!
//! Each test prints what it measured (`netfault: …` lines; `--nocapture` shows them);
//! docs/RELIABILITY.md records them. Runs as root (CI does: `GPUSCALE_REQUIRE_PRIVILEGED=1`
//! makes a skip a failure); says why it skips otherwise, and also when toxiproxy is not built.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent::ring::Read;
use agent::shm::ShmReader;
use e2e::keda::{scaled_object, Keda};
use e2e::netns::Lab;
use e2e::pod::privileged;
use e2e::toxiproxy::{self, Stream, Toxiproxy};
use e2e::{
    agent_bin, collector_bin, fake_nvml, fake_proc, gpu, http_get, pod_item, write_pods,
    write_scenario, Agent, Collector, Daemon, Scratch,
};
use proto::externalscaler::ScaledObjectRef;
use serde_json::json;
use tonic::Code;

/// The triggers' `staleAfter`.
const STALE: Duration = Duration::from_secs(2);
/// What may pass beyond `staleAfter` before `UNAVAILABLE` shows (see the module doc).
const SLACK: Duration = Duration::from_millis(600);
/// The promise after a heal.
const HEAL: Duration = Duration::from_secs(2);
/// Generous limit for anything the tests only wait for.
const WAIT: Duration = Duration::from_secs(30);
/// How long a fault is held: past `staleAfter` + slack, and long enough for TCP's
/// retransmissions to back off (0.2, 0.6, 1.4, 3 s …), so that waiting for TCP would miss the
/// 2 s after the heal.
const HOLD: Duration = Duration::from_millis(3500);
/// The agents' sampling interval.
const INTERVAL: Duration = Duration::from_millis(100);
/// The agents' gRPC port (each agent has a namespace, hence an address, of its own).
const AGENT_PORT: u16 = 7701;
/// The agents' `/readyz` port.
const AGENT_HTTP_PORT: u16 = 7702;
/// Where toxiproxy listens for the collector (in its own namespace).
const PROXY_PORT: u16 = 17701;
const TOXIPROXY_API_PORT: u16 = 8474;

fn uid(i: usize) -> String {
    format!("0e0e0e0e-1111-4222-8333-{i:012}")
}

/// What KEDA read.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// `GetMetrics` answered this value.
    Value(f64),
    /// The collector answered `UNAVAILABLE` with this message (naming the node).
    Unavailable(String),
    /// The collector could not be reached, or answered something else.
    Other(String),
}

/// Everything a test runs; processes stop (fields drop in order) before the lab goes.
struct Setup {
    keda: Option<Keda>,
    collector: Collector,
    proxy: Option<Toxiproxy>,
    agents: Vec<Agent>,
    scenarios: Vec<PathBuf>,
    procs: PathBuf,
    /// Each agent's ScaledObject (selecting its node's one pod) and metric name.
    objects: Vec<(ScaledObjectRef, String)>,
    /// Each agent's current value, as its scenario says.
    values: Vec<f64>,
    dir: Scratch,
    lab: Lab,
}

impl Setup {
    /// `agents` agents, each with one GPU and one pod on node `node-<i>`, and a collector
    /// following them directly, or through toxiproxy (`proxy`: agent 0 only, proxy `agent0`).
    /// `None` when the test cannot run here (said on stderr).
    fn new(test: &str, agents: usize, proxy: bool) -> Option<Setup> {
        if let Some(why) = privileged() {
            eprintln!("skipped: {test}: {why}");
            return None;
        }
        if proxy {
            if let Some(why) = toxiproxy::missing() {
                if std::env::var("GPUSCALE_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                    panic!("{test} cannot run: {why}; GPUSCALE_REQUIRE_PRIVILEGED=1 forbids skipping it");
                }
                eprintln!("skipped: {test}: {why}");
                return None;
            }
        }
        e2e::ensure_built();
        let mut hosts = vec!["collector".to_owned()];
        hosts.extend((0..agents).map(|i| format!("agent{i}")));
        if proxy {
            hosts.push("proxy".into());
        }
        let lab = Lab::new(&hosts.iter().map(String::as_str).collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("making the lab network: {e:#}"));
        let dir = Scratch::new(&format!("netfault-{test}"));
        let procs = dir.path("proc");
        let values: Vec<f64> = (0..agents).map(|i| 40.0 + 10.0 * i as f64).collect();
        let mut setup_agents = Vec::new();
        let mut scenarios = Vec::new();
        let mut pods = Vec::new();
        for (i, v) in values.iter().enumerate() {
            fake_proc(
                &procs,
                4242 + i as u32,
                &uid(i),
                &format!("{i:x}").repeat(64),
            );
            let scenario = dir.path(&format!("scenario{i}.json"));
            write_scenario(&scenario, &[gpu_at(i, *v)]);
            setup_agents.push(start_agent(&lab, &dir, i, &scenario, &procs));
            scenarios.push(scenario);
            let mut pod = pod_item(
                "ml",
                &format!("llm-{i}"),
                &uid(i),
                json!({"app": format!("llm-{i}")}),
            );
            pod["spec"]["nodeName"] = json!(format!("node-{i}"));
            pods.push(pod);
        }
        let pods_file = dir.path("pods.json");
        write_pods(&pods_file, &pods);
        let proxy = proxy.then(|| {
            let p = Toxiproxy::start(
                &dir,
                lab.command("proxy", toxiproxy::binary()),
                &format!("{}:{TOXIPROXY_API_PORT}", lab.ip("proxy")),
            )
            .unwrap();
            p.proxy(
                "agent0",
                &format!("{}:{PROXY_PORT}", lab.ip("proxy")),
                &format!("{}:{AGENT_PORT}", lab.ip("agent0")),
            )
            .unwrap();
            p
        });
        let agent_addrs: Vec<String> = (0..agents)
            .map(|i| {
                if i == 0 && proxy.is_some() {
                    format!("{}:{PROXY_PORT}", lab.ip("proxy"))
                } else {
                    format!("{}:{AGENT_PORT}", lab.ip(&format!("agent{i}")))
                }
            })
            .collect();
        let collector = start_collector(&lab, &dir, &agent_addrs.join(","), &pods_file);
        let keda = Keda::connect(&collector.addr);
        let objects = (0..agents)
            .map(|i| {
                let so = scaled_object(
                    &format!("llm-{i}"),
                    &[
                        ("metric", "gpu_util"),
                        ("podSelector", &format!("app=llm-{i}")),
                        ("targetValue", "80"),
                        ("timeAggregation", "last"),
                        ("staleAfter", "2s"),
                    ],
                );
                (so, String::new())
            })
            .collect();
        let mut s = Setup {
            keda: Some(keda),
            collector,
            proxy,
            agents: setup_agents,
            scenarios,
            procs,
            objects,
            values,
            dir,
            lab,
        };
        for i in 0..agents {
            let (so, _) = s.objects[i].clone();
            let (name, _, _) = s.keda().metric_spec(&so).unwrap();
            s.objects[i].1 = name;
        }
        for i in 0..agents {
            let (t, seen) = s.wait_value(i, WAIT);
            assert_eq!(
                seen,
                Seen::Value(s.values[i]),
                "agent {i} never read right ({t:?}); collector log:\n{}",
                s.collector.daemon.log()
            );
        }
        Some(s)
    }

    fn proxy(&self) -> &Toxiproxy {
        self.proxy.as_ref().expect("toxiproxy")
    }

    fn keda(&mut self) -> &mut Keda {
        self.keda.as_mut().expect("a KEDA client")
    }

    /// Sets agent `i`'s GPU utilization (the fake NVML re-reads its scenario).
    fn set_value(&mut self, i: usize, v: f64) {
        write_scenario(&self.scenarios[i], &[gpu_at(i, v)]);
        self.values[i] = v;
    }

    /// One `GetMetrics` for agent `i`'s ScaledObject.
    fn ask(&mut self, i: usize) -> Seen {
        let (so, name) = self.objects[i].clone();
        match self.keda().metrics(&so, &name) {
            Ok((v, _)) => Seen::Value(v),
            Err(s) if s.code() == Code::Unavailable && s.message().contains("node node-") => {
                Seen::Unavailable(s.message().to_owned())
            }
            Err(s) => Seen::Other(format!("{:?}: {}", s.code(), s.message())),
        }
    }

    /// Polls agent `i` every 50 ms until `stop` holds on an answer or `timeout` passes; every
    /// answer with the time since `from`, and whether `stop` held. Every agent but `i` must
    /// read its own value at each poll: one agent's fault never touches another's.
    fn poll(
        &mut self,
        i: usize,
        from: Instant,
        timeout: Duration,
        stop: impl Fn(&Seen) -> bool,
    ) -> (Vec<(Duration, Seen)>, bool) {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let s = self.ask(i);
            let at = from.elapsed();
            for j in (0..self.objects.len()).filter(|&j| j != i) {
                let other = self.ask(j);
                assert_eq!(
                    other,
                    Seen::Value(self.values[j]),
                    "agent {j} is not at fault but read wrong at {at:?} (agent {i}'s fault)"
                );
            }
            let done = stop(&s);
            seen.push((at, s));
            if done {
                return (seen, true);
            }
            if Instant::now() > end {
                return (seen, false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for agent `i`'s current value: (time taken, last answer).
    fn wait_value(&mut self, i: usize, timeout: Duration) -> (Duration, Seen) {
        let want = Seen::Value(self.values[i]);
        let start = Instant::now();
        let (seen, _) = self.poll(i, start, timeout, |s| *s == want);
        let (t, last) = seen.last().cloned().expect("one answer at least");
        (t, last)
    }

    /// Holds agent `i`'s fault for `hold` from `fault` (when it began), `old` being its value
    /// before: asserts `UNAVAILABLE` within `staleAfter` + slack naming the node, and never a
    /// value presented as fresh after that (nor any value but `old` before). Returns when
    /// `UNAVAILABLE` first showed, after `fault`.
    fn expect_unavailable(
        &mut self,
        i: usize,
        fault: Instant,
        old: f64,
        hold: Duration,
        what: &str,
    ) -> Duration {
        let remaining = hold.saturating_sub(fault.elapsed());
        let (seen, _) = self.poll(i, fault, remaining, |_| false);
        let first = seen
            .iter()
            .find(|(_, s)| matches!(s, Seen::Unavailable(_)))
            .map(|(t, _)| *t);
        let Some(first) = first else {
            panic!(
                "{what}: never UNAVAILABLE in {hold:?}; answers: {}\ncollector log:\n{}",
                summary(&seen),
                self.collector.daemon.log()
            );
        };
        for (t, s) in &seen {
            match s {
                Seen::Value(v) => {
                    assert!(
                        *v == old && *t <= STALE + SLACK && *t < first,
                        "{what}: {v} read as fresh {t:?} after the fault (before it: {old}; \
                         UNAVAILABLE first at {first:?}); answers: {}",
                        summary(&seen)
                    );
                }
                Seen::Unavailable(m) => assert!(
                    m.contains(&format!("node node-{i}")),
                    "{what}: UNAVAILABLE names the node: {m}"
                ),
                Seen::Other(o) => panic!("{what}: the collector answered {o} at {t:?}"),
            }
        }
        assert!(
            first <= STALE + SLACK,
            "{what}: UNAVAILABLE {first:?} after the fault, over staleAfter {STALE:?} + {SLACK:?}; \
             answers: {}",
            summary(&seen)
        );
        first
    }

    /// After a heal at `healed`: agent `i`'s current value within [`HEAL`], and meanwhile only
    /// `UNAVAILABLE`: what the agent sent before the heal (queued in a socket, a proxy) is older
    /// than `staleAfter` by then, never shown as fresh. Returns how long it took.
    fn expect_heal(&mut self, i: usize, healed: Instant, what: &str) -> Duration {
        let want = self.values[i];
        let (seen, ok) = self.poll(i, healed, WAIT, |s| *s == Seen::Value(want));
        let took = seen.last().expect("an answer").0;
        assert!(
            ok,
            "{what}: {want} never read after the heal; answers: {}\ncollector log:\n{}",
            summary(&seen),
            self.collector.daemon.log()
        );
        for (t, s) in &seen {
            match s {
                Seen::Value(v) => assert!(
                    *v == want,
                    "{what}: {v} read {t:?} after the heal, not the agent's value {want}"
                ),
                Seen::Unavailable(_) => {}
                Seen::Other(o) => panic!("{what}: the collector answered {o} at {t:?}"),
            }
        }
        assert!(
            took <= HEAL,
            "{what}: the correct value {want} came {took:?} after the heal, over {HEAL:?}; \
             answers: {}\ncollector log:\n{}",
            summary(&seen),
            self.collector.daemon.log()
        );
        took
    }

    /// The agent `i`'s ring position now.
    fn ring_head(&self, i: usize) -> u64 {
        let r = ShmReader::open(&self.agents[i].shm).unwrap();
        r.regions()[0].ring().head()
    }

    /// Checks that agent `i` wrote a sample every interval between ring positions `from` and
    /// now, over `elapsed`: none overwritten or missing, timestamps rising with no gap over
    /// 3 intervals, and about `elapsed / interval` of them. Returns (samples, largest gap).
    fn ring_continuous(&self, i: usize, from: u64, elapsed: Duration) -> (u64, Duration) {
        let r = ShmReader::open(&self.agents[i].shm).unwrap();
        let ring = r.regions()[0].ring();
        let head = ring.head();
        assert_eq!(ring.dropped(), 0, "the ring overwrote samples");
        let mut prev: Option<u64> = None;
        let mut gap = Duration::ZERO;
        for pos in from..head {
            let Read::Record(s) = ring.read(pos) else {
                panic!("ring position {pos} of {from}..{head} is not readable");
            };
            if let Some(p) = prev {
                assert!(s.ts_ns > p, "sample {pos} is not newer than the one before");
                gap = gap.max(Duration::from_nanos(s.ts_ns - p));
            }
            prev = Some(s.ts_ns);
        }
        let n = head - from;
        let expected = elapsed.as_secs_f64() / INTERVAL.as_secs_f64();
        assert!(
            gap <= 3 * INTERVAL && (n as f64) >= 0.9 * expected - 2.0,
            "the agent's ring has a gap: {n} samples over {elapsed:?} (expected ≈ {expected:.0}), \
             largest gap {gap:?}"
        );
        (n, gap)
    }

    /// Starts agent `i` again (after a kill) on the same address and ring.
    fn restart_agent(&mut self, i: usize) {
        self.agents[i] = start_agent(&self.lab, &self.dir, i, &self.scenarios[i], &self.procs);
    }

    /// The collector's `dump --json` entry for agent `i`'s node (by the address it dials).
    fn collector_node(&mut self, i: usize) -> serde_json::Value {
        let port = if i == 0 && self.proxy.is_some() {
            PROXY_PORT
        } else {
            AGENT_PORT
        };
        let ip = if port == PROXY_PORT {
            self.lab.ip("proxy")
        } else {
            self.lab.ip(&format!("agent{i}"))
        };
        let address = format!("{ip}:{port}");
        let dump = self
            .collector
            .wait_dump(WAIT, |d| d["nodes"].as_array().is_some())
            .unwrap();
        dump["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["address"] == address.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no node at {address} in the collector's dump: {dump}"))
    }

    /// Polls `addr`'s `/readyz` until it answers 200; when it did.
    fn wait_ready(&self, addr: &str) -> Instant {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = http_get(addr, "/readyz") {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "{addr} never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// GPU 0 of agent `i` at utilization `v`, its process in agent `i`'s pod.
fn gpu_at(i: usize, v: f64) -> serde_json::Value {
    let mut g = gpu(i);
    g["gpu_util"] = json!(v);
    g["processes"] = json!([{"pid": 4242 + i, "used_memory_mib": 18000, "sm_util": 30}]);
    g
}

/// Agent `i` in lab host `agent<i>`, node `node-<i>`.
fn start_agent(
    lab: &Lab,
    dir: &Scratch,
    i: usize,
    scenario: &std::path::Path,
    procs: &std::path::Path,
) -> Agent {
    let shm = dir.path(&format!("agent{i}.ring"));
    let mut cmd = lab.command(&format!("agent{i}"), agent_bin());
    cmd.args(["run", "--nvml-lib"])
        .arg(fake_nvml())
        .arg("--shm")
        .arg(&shm)
        .args(["--interval", "100ms", "--ebpf", "off", "--node-name"])
        .arg(format!("node-{i}"))
        .arg("--listen")
        .arg(format!("0.0.0.0:{AGENT_PORT}"))
        .arg("--http-listen")
        .arg(format!("0.0.0.0:{AGENT_HTTP_PORT}"))
        .arg("--proc-root")
        .arg(procs)
        .env("FAKE_NVML_SCENARIO", scenario);
    Agent {
        daemon: Daemon::spawn(dir, &format!("agent{i}"), &mut cmd),
        shm,
    }
}

/// The collector in lab host `collector`, KEDA's port 7700 and HTTP 7703 on its address.
fn start_collector(lab: &Lab, dir: &Scratch, agents: &str, pods: &std::path::Path) -> Collector {
    let ip = lab.ip("collector");
    let addr = format!("{ip}:7700");
    let mut cmd = lab.command("collector", collector_bin());
    cmd.args(["serve", "--listen", &addr, "--http-listen"])
        .arg(format!("{ip}:7703"))
        .args(["--agents", agents, "--pods-file"])
        .arg(pods);
    Collector {
        daemon: Daemon::spawn(dir, "collector", &mut cmd),
        addr,
    }
}

/// A short account of a poll's answers: runs of the same answer with their first time.
fn summary(seen: &[(Duration, Seen)]) -> String {
    let mut out = String::new();
    let mut last: Option<&Seen> = None;
    for (t, s) in seen {
        let same = match (last, s) {
            (Some(Seen::Unavailable(_)), Seen::Unavailable(_)) => true,
            (Some(a), b) => a == b,
            (None, _) => false,
        };
        if !same {
            let text = match s {
                Seen::Value(v) => format!("{v}"),
                Seen::Unavailable(m) => format!("UNAVAILABLE ({m})"),
                Seen::Other(o) => o.clone(),
            };
            out.push_str(&format!("\n  {:>6.2}s {text}", t.as_secs_f64()));
        }
        last = Some(s);
    }
    out
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[test]
fn a_partitioned_agent_reads_unavailable_within_stale_after_and_its_new_value_within_2s_of_the_heal(
) {
    let Some(mut t) = Setup::new("partition", 2, false) else {
        return;
    };
    let head = t.ring_head(0);
    let start = Instant::now();
    // Its link down (the switch port pulled: the agent's kernel sees its carrier go), 3.5 s.
    let cut = Instant::now();
    t.lab.set_link("agent0", false).unwrap();
    // The load changes while the node is cut off: only the heal may show it.
    t.set_value(0, 70.0);
    let down = t.expect_unavailable(0, cut, 40.0, HOLD, "link down");
    let healed = Instant::now();
    t.lab.set_link("agent0", true).unwrap();
    let down_back = t.expect_heal(0, healed, "link up");

    // Cut further away (the bridge drops its frames; both ends' links stay up, neither kernel
    // knows): only silence tells.
    let cut = Instant::now();
    t.lab.set_blackhole("agent0", true).unwrap();
    t.set_value(0, 35.0);
    let far = t.expect_unavailable(0, cut, 70.0, HOLD, "far cut");
    let healed = Instant::now();
    t.lab.set_blackhole("agent0", false).unwrap();
    let far_back = t.expect_heal(0, healed, "far cut healed");
    let (samples, gap) = t.ring_continuous(0, head, start.elapsed());
    eprintln!(
        "netfault: partition, link down {HOLD:?}: UNAVAILABLE {} after the cut, the new value {} \
         after the heal; cut further away (bridge drops, carriers up) {HOLD:?}: UNAVAILABLE {}, \
         new value {} after the heal; the other agent read right throughout; the cut agent's \
         ring: {samples} samples, largest gap {}",
        secs(down),
        secs(down_back),
        secs(far),
        secs(far_back),
        secs(gap)
    );
}

#[test]
fn latency_under_stale_after_is_served_latency_beyond_it_reads_unavailable_and_heals_in_2s() {
    let Some(mut t) = Setup::new("latency", 1, true) else {
        return;
    };
    // 300 ms each way: values stay fresh, and a change shows.
    t.proxy()
        .add_toxic(
            "agent0",
            "slow",
            "latency",
            Stream::Downstream,
            json!({"latency": 300}),
        )
        .unwrap();
    let start = Instant::now();
    let (seen, _) = t.poll(0, start, Duration::from_secs(3), |_| false);
    assert!(
        seen.iter().all(|(_, s)| *s == Seen::Value(40.0)),
        "300 ms latency: {}",
        summary(&seen)
    );
    let changed = Instant::now();
    t.set_value(0, 45.0);
    let (took, seen) = t.wait_value(0, WAIT);
    assert_eq!(seen, Seen::Value(45.0));
    let _ = changed;
    t.proxy().remove_toxic("agent0", "slow").unwrap();

    // 3 s, over staleAfter: what arrives is older than staleAfter.
    let fault = Instant::now();
    t.proxy()
        .add_toxic(
            "agent0",
            "slower",
            "latency",
            Stream::Downstream,
            json!({"latency": 3000}),
        )
        .unwrap();
    t.set_value(0, 60.0);
    let unavailable = t.expect_unavailable(0, fault, 45.0, Duration::from_secs(8), "3 s latency");
    let healed = Instant::now();
    t.proxy().remove_toxic("agent0", "slower").unwrap();
    let back = t.expect_heal(0, healed, "latency removed");
    eprintln!(
        "netfault: latency: 300 ms: served, a change read {} after it; 3 s (> staleAfter): \
         UNAVAILABLE {} after it began; correct {} after it ended",
        secs(took),
        secs(unavailable),
        secs(back)
    );
}

#[test]
fn a_flapping_link_ends_with_the_right_value_one_connection_and_no_gap_in_the_agents_ring() {
    let Some(mut t) = Setup::new("flapping", 1, false) else {
        return;
    };
    let head = t.ring_head(0);
    let start = Instant::now();
    t.set_value(0, 65.0);
    let mut seen = Vec::new();
    // Down 0.8 s, up 0.4 s, seven times; the load changed as it began.
    for _ in 0..7 {
        t.lab.set_link("agent0", false).unwrap();
        let (s, _) = t.poll(0, start, Duration::from_millis(800), |_| false);
        seen.extend(s);
        t.lab.set_link("agent0", true).unwrap();
        let (s, _) = t.poll(0, start, Duration::from_millis(400), |_| false);
        seen.extend(s);
    }
    for (at, s) in &seen {
        match s {
            Seen::Value(v) => assert!(
                *v == 65.0 || (*v == 40.0 && *at <= STALE + SLACK),
                "flapping: {v} read {at:?} after it began; answers: {}",
                summary(&seen)
            ),
            Seen::Unavailable(_) => {}
            Seen::Other(o) => panic!("flapping: the collector answered {o} at {at:?}"),
        }
    }
    let healed = Instant::now();
    let back = t.expect_heal(0, healed, "flapping ended");
    let (samples, gap) = t.ring_continuous(0, head, start.elapsed());
    // One stream left, at both ends: the collector holds one connection to the agent, and the
    // agent (which learns of a dead connection only when its data is refused) is back to one
    // within a little while.
    // The right value can be served from before the last cut (younger than staleAfter) while
    // the collector is still dialing again (a SYN lost in the last cut is resent only after
    // TCP's 1 s): wait for it to be connected, once.
    let reconnecting = Instant::now();
    let node = loop {
        let node = t.collector_node(0);
        if node["connected"] == true {
            break node;
        }
        assert!(
            reconnecting.elapsed() < WAIT,
            "the collector is not connected to the agent {WAIT:?} after the flapping: {node}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let reconnected = reconnecting.elapsed();
    assert_eq!(t.lab.established("collector", AGENT_PORT).unwrap(), 1);
    let settle = Instant::now();
    while t.lab.established("agent0", AGENT_PORT).unwrap() != 1 {
        assert!(
            settle.elapsed() < WAIT,
            "the agent still holds {} connections {WAIT:?} after the flapping",
            t.lab.established("agent0", AGENT_PORT).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let unavailable = seen
        .iter()
        .filter(|(_, s)| matches!(s, Seen::Unavailable(_)))
        .count();
    eprintln!(
        "netfault: flapping (0.8 s down, 0.4 s up, ×7): {} answers, {unavailable} UNAVAILABLE, \
         none wrong; correct {} after the last up; the collector reconnected {} times and holds \
         1 connection {} after that, the agent 1 after {}; ring: {samples} samples, largest gap {}",
        seen.len(),
        secs(back),
        node["reconnects"],
        secs(reconnected),
        secs(settle.elapsed()),
        secs(gap)
    );
}

#[test]
fn a_bandwidth_limit_gives_values_of_honest_age_or_unavailable_never_wrong_ones() {
    let Some(mut t) = Setup::new("bandwidth", 1, true) else {
        return;
    };
    // 2 KB/s from the agent: less than its snapshots need at 10 per second, so they queue.
    let fault = Instant::now();
    t.proxy()
        .add_toxic(
            "agent0",
            "narrow",
            "bandwidth",
            Stream::Downstream,
            json!({"rate": 2}),
        )
        .unwrap();
    t.set_value(0, 75.0);
    let (seen, _) = t.poll(0, fault, Duration::from_secs(8), |_| false);
    for (at, s) in &seen {
        match s {
            // The old value only while it can still be that young; the new one at any time.
            Seen::Value(v) => assert!(
                *v == 75.0 || (*v == 40.0 && *at <= STALE + SLACK),
                "2 KB/s: {v} read {at:?} after the limit began; answers: {}",
                summary(&seen)
            ),
            Seen::Unavailable(m) => assert!(m.contains("node node-0"), "{m}"),
            Seen::Other(o) => panic!("2 KB/s: the collector answered {o} at {at:?}"),
        }
    }
    let first_unavailable = seen
        .iter()
        .find(|(_, s)| matches!(s, Seen::Unavailable(_)))
        .map(|(at, _)| *at);
    let age = t.collector_node(0)["age_ms"].as_f64();
    let healed = Instant::now();
    t.proxy().remove_toxic("agent0", "narrow").unwrap();
    let back = t.expect_heal(0, healed, "bandwidth limit removed");

    // The kernel's limit instead (tbf on the agent's link, 16 kbit/s, a 100 ms queue): what
    // does not fit is dropped, not queued, so TCP retransmits on top of the narrow link.
    let fault = Instant::now();
    t.lab
        .tc(
            "agent0",
            &[
                "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "16kbit", "burst", "2kb",
                "latency", "100ms",
            ],
        )
        .unwrap();
    t.set_value(0, 25.0);
    let (tbf_seen, _) = t.poll(0, fault, Duration::from_secs(6), |_| false);
    for (at, s) in &tbf_seen {
        match s {
            Seen::Value(v) => assert!(
                *v == 25.0 || (*v == 75.0 && *at <= STALE + SLACK),
                "tbf 16 kbit/s: {v} read {at:?} after the limit began; answers: {}",
                summary(&tbf_seen)
            ),
            Seen::Unavailable(m) => assert!(m.contains("node node-0"), "{m}"),
            Seen::Other(o) => panic!("tbf: the collector answered {o} at {at:?}"),
        }
    }
    let tbf_unavailable = tbf_seen
        .iter()
        .find(|(_, s)| matches!(s, Seen::Unavailable(_)))
        .map(|(at, _)| *at);
    let healed = Instant::now();
    t.lab
        .tc("agent0", &["qdisc", "del", "dev", "eth0", "root"])
        .unwrap();
    let tbf_back = t.expect_heal(0, healed, "tbf removed");
    let said = |first: Option<Duration>| {
        first.map_or("values only, of the right age".to_owned(), |at| {
            format!("UNAVAILABLE from {} on", secs(at))
        })
    };
    eprintln!(
        "netfault: bandwidth, toxiproxy 2 KB/s: {} ({} answers, the collector's dump: newest \
         data {:?} ms old at the end), correct {} after it was lifted; tbf 16 kbit/s: {} ({} \
         answers), correct {} after it was lifted",
        said(first_unavailable),
        seen.len(),
        age.map(|a| a.round()),
        secs(back),
        said(tbf_unavailable),
        tbf_seen.len(),
        secs(tbf_back)
    );
}

#[test]
fn reset_connections_and_a_half_open_one_read_unavailable_within_stale_after_and_heal_in_2s() {
    let Some(mut t) = Setup::new("reset", 1, true) else {
        return;
    };
    // Every connection reset by the peer, the collector's and each it opens again.
    let fault = Instant::now();
    t.proxy()
        .add_toxic(
            "agent0",
            "rst",
            "reset_peer",
            Stream::Downstream,
            json!({"timeout": 0}),
        )
        .unwrap();
    t.set_value(0, 55.0);
    let reset = t.expect_unavailable(0, fault, 40.0, HOLD, "reset_peer");
    let healed = Instant::now();
    t.proxy().remove_toxic("agent0", "rst").unwrap();
    let reset_back = t.expect_heal(0, healed, "resets stopped");

    // Half-open: the connection stays, nothing arrives on it (a silent peer, a dropped route).
    let before = t.collector_node(0)["reconnects"].as_u64().unwrap();
    let fault = Instant::now();
    t.proxy()
        .add_toxic(
            "agent0",
            "silent",
            "timeout",
            Stream::Downstream,
            json!({"timeout": 0}),
        )
        .unwrap();
    t.set_value(0, 35.0);
    let silent = t.expect_unavailable(0, fault, 55.0, HOLD, "half-open");
    // The collector gave the silent connection up itself, and says why.
    let node = t.collector_node(0);
    let dropped = node["reconnects"].as_u64().unwrap() - before;
    assert!(
        dropped >= 1
            && node["last_error"]
                .as_str()
                .unwrap()
                .contains("no snapshot for"),
        "the collector kept the silent connection: {node}"
    );
    let healed = Instant::now();
    t.proxy().remove_toxic("agent0", "silent").unwrap();
    let silent_back = t.expect_heal(0, healed, "half-open ended");
    eprintln!(
        "netfault: reset_peer: UNAVAILABLE {} after it began, correct {} after it stopped; \
         half-open: UNAVAILABLE {}, the collector gave the silent connection up ({dropped} \
         times in {HOLD:?}: {}), correct {} after it ended",
        secs(reset),
        secs(reset_back),
        secs(silent),
        node["last_error"],
        secs(silent_back)
    );
}

#[test]
fn a_restarted_agent_and_a_restarted_collector_answer_right_within_2s_of_being_ready() {
    let Some(mut t) = Setup::new("restart", 1, false) else {
        return;
    };
    let agent_http = format!("{}:{AGENT_HTTP_PORT}", t.lab.ip("agent0"));
    // A second of history in its ring before it dies.
    std::thread::sleep(Duration::from_secs(1));
    let head = t.ring_head(0);
    let newest = |t: &Setup, pos: u64| {
        let r = ShmReader::open(&t.agents[0].shm).unwrap();
        match r.regions()[0].ring().read(pos) {
            Read::Record(s) => s.ts_ns,
            other => panic!("ring position {pos}: {other:?}"),
        }
    };
    let last_before = newest(&t, head - 1);
    // The agent is killed; it comes back on the same address with a new load.
    let killed = Instant::now();
    t.agents[0].daemon.kill();
    t.set_value(0, 85.0);
    let down = t.expect_unavailable(0, killed, 40.0, HOLD, "agent killed");
    let restarted = Instant::now();
    t.restart_agent(0);
    let ready = t.wait_ready(&agent_http);
    let agent_back = t.expect_heal(0, ready, "agent restarted");
    let started = ready.duration_since(restarted);
    // Its ring kept its history across the restart: positions go on from where they were, and
    // the samples before the kill are still there.
    let after = t.ring_head(0);
    assert!(
        after > head,
        "the restarted agent began a new ring ({after} ≤ {head})"
    );
    assert_eq!(
        newest(&t, head - 1),
        last_before,
        "the sample before the kill is gone"
    );

    // The collector is killed and started again on the same address.
    let collector_http = format!("{}:7703", t.lab.ip("collector"));
    t.collector.daemon.kill();
    let pods = t.dir.path("pods.json");
    let agents = format!("{}:{AGENT_PORT}", t.lab.ip("agent0"));
    // A new load the agent has sampled before the new collector starts: the only right answer.
    t.set_value(0, 20.0);
    t.agents[0]
        .wait_dump(WAIT, |d| e2e::last(d, 0, "gpu_util") == Some(20.0))
        .unwrap();
    let restarted = Instant::now();
    t.collector = start_collector(&t.lab, &t.dir, &agents, &pods);
    let collector_ready = t.wait_ready(&collector_http);
    // KEDA's connection broke with the old process; like KEDA, the client dials again.
    t.keda = Some(Keda::connect(&t.collector.addr));
    let collector_back = t.expect_heal(0, collector_ready, "collector restarted");
    eprintln!(
        "netfault: agent SIGKILL: UNAVAILABLE {} after; restarted, ready {} after start, correct \
         {} after ready (ring went on from {head} to {after}); collector SIGKILL + restart: \
         ready {} after start, correct {} after ready",
        secs(down),
        secs(started),
        secs(agent_back),
        secs(collector_ready.duration_since(restarted)),
        secs(collector_back)
    );
}
