#!/usr/bin/env python3
"""gpuscale gpu-check: runs gpuscale's agent and collector on a real NVIDIA GPU and checks them
against NVML's own numbers (read with pynvml at the same moments).

run.sh finds the driver's NVML, makes the pod-shaped cgroups and calls this; see README.md for
what each check does and docs/GPU-CHECK.md in the repository for the report format. Two
sub-commands:

  probe --nvml-lib PATH   one line: "ok <gpus>", "nodevice <why>" or "error <why>" (ctypes only,
                          no pynvml), so run.sh can tell "no GPU here" from "a broken driver".
  run ...                 the checks; human table on stdout, JSON report to --report.

Nothing here needs more than the standard library, pynvml (nvidia-ml-py) and, for the load,
PyTorch in load.py. Every part that cannot run says why, and the others still run.
"""

import argparse
import bisect
import ctypes
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

SCHEMA = 1

# Agreement: median |agent - pynvml| over the idle -> heavy -> idle phases must be within these.
LIMITS = {
    "gpu_util": 5.0,  # percentage points
    "mem_util": 5.0,  # percentage points
    "vram_used_mib": 64.0,  # MiB
    "power_pct": 5.0,  # % of pynvml's value
    "temperature_c": 2.0,  # degrees
}
# Reaction: the agent's and the collector's p50 step time within this of NVML's own.
REACTION_MARGIN_S = 0.15
# SM activity: in the tiny-kernel phase gpu_util must be at least this many times sm_active,
# and this many points above it.
TINY_RATIO = 3.0
TINY_GAP = 5.0
# Overhead at 100ms: pass within twice the fake-GPU targets of docs/BENCHMARKS.md (those are for
# 8 GPUs; real NVML calls cost more than the fake's). RSS is judged at the end of the window
# (steady state); the peak also counts loading the eBPF object at start, and is reported.
OVERHEAD_CPU_PCT_100MS = 1.0
OVERHEAD_RSS_MIB_100MS = 32.0
# The agent kept up when it wrote at least this share of the samples its interval asks for.
KEPT_UP = 0.8

NODE = "gpu-check-node"
NAMESPACE = "gpu-check"
NVML_SUCCESS = 0
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15


def now_ns():
    return time.time_ns()


def log(msg):
    sys.stderr.write("gpu-check: %s\n" % msg)
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# probe: is there a GPU behind this library? (ctypes only)


def probe(lib):
    try:
        nvml = ctypes.CDLL(lib)
    except OSError as e:
        return "nodevice", "cannot load %s: %s" % (lib, e)
    try:
        init = nvml.nvmlInit_v2
    except AttributeError:
        return "error", "%s has no nvmlInit_v2: not the driver's NVML" % lib
    rc = init()
    if rc in (NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_LIBRARY_NOT_FOUND):
        return "nodevice", "%s loads but the NVIDIA kernel driver is not loaded" % lib
    if rc != NVML_SUCCESS:
        msg = nvml.nvmlErrorString
        msg.restype = ctypes.c_char_p
        return "error", "nvmlInit from %s failed: %s (NVML error %d)%s" % (
            lib, (msg(rc) or b"?").decode(errors="replace"), rc,
            "; the driver's kernel module and its NVML library differ: reboot, or reload "
            "the nvidia module" if rc == 18 else "")
    count = ctypes.c_uint(0)
    rc = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count))
    nvml.nvmlShutdown()
    if rc != NVML_SUCCESS:
        return "error", "nvmlDeviceGetCount from %s failed (NVML error %d)" % (lib, rc)
    if count.value == 0:
        return "nodevice", "NVML from %s sees no GPU" % lib
    return "ok", str(count.value)


# ---------------------------------------------------------------------------------------------
# pynvml: NVML's own numbers


class GpuLost(Exception):
    """The GPU fell off the bus (or NVML says so) while a check ran."""


class Nvml:
    """pynvml pinned to the same library file the agent loads."""

    def __init__(self, lib, index):
        self.missing = None
        self.v1_memory = False
        self.handle = None
        try:
            import pynvml  # noqa: PLC0415 - optional: a missing pynvml is reported, not fatal
        except Exception as e:  # noqa: BLE001
            self.missing = "pynvml is not importable (%s): pip install nvidia-ml-py" % e
            return
        self.p = pynvml
        try:
            # pynvml dlopens "libnvidia-ml.so.1" by name; pin it to the file the agent uses.
            if getattr(pynvml, "nvmlLib", None) is None:
                pynvml.nvmlLib = ctypes.CDLL(lib)
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # noqa: BLE001
            self.missing = "pynvml cannot use NVML from %s: %s" % (lib, e)
            return
        self.version = getattr(pynvml, "__version__", None)
        if self.version is None:
            try:
                from importlib import metadata  # noqa: PLC0415

                self.version = metadata.version("nvidia-ml-py")
            except Exception:  # noqa: BLE001
                self.version = "?"

    def _s(self, v):
        return v.decode() if isinstance(v, bytes) else v

    def info(self):
        p, h = self.p, self.handle
        out = {"pynvml": self.version}
        for key, fn in (
            ("name", lambda: self._s(p.nvmlDeviceGetName(h))),
            ("uuid", lambda: self._s(p.nvmlDeviceGetUUID(h))),
            ("driver", lambda: self._s(p.nvmlSystemGetDriverVersion())),
            ("nvml_version", lambda: self._s(p.nvmlSystemGetNVMLVersion())),
            ("cuda_driver", lambda: p.nvmlSystemGetCudaDriverVersion()),
            ("memory_total_bytes", lambda: p.nvmlDeviceGetMemoryInfo(h).total),
        ):
            try:
                out[key] = fn()
            except Exception:  # noqa: BLE001 - an optional fact
                out[key] = None
        return out

    def gpm_supported(self):
        try:
            return bool(self.p.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice)
        except Exception:  # noqa: BLE001 - an old pynvml or driver: unknown
            return None

    def read(self):
        p, h = self.p, self.handle
        try:
            util = p.nvmlDeviceGetUtilizationRates(h)
            if not self.v1_memory:
                try:
                    mem = p.nvmlDeviceGetMemoryInfo(h, version=p.nvmlMemory_v2)
                except (TypeError, AttributeError):
                    # An old pynvml without v2: its "used" also counts reserved memory.
                    self.v1_memory = True
            if self.v1_memory:
                mem = p.nvmlDeviceGetMemoryInfo(h)
            return {
                "gpu_util": float(util.gpu),
                "mem_util": float(util.memory),
                "vram_used_bytes": float(mem.used),
                "power_watts": p.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temperature_c": float(p.nvmlDeviceGetTemperature(h, p.NVML_TEMPERATURE_GPU)),
            }
        except p.NVMLError as e:
            if getattr(e, "value", None) == NVML_ERROR_GPU_IS_LOST:
                raise GpuLost("NVML says the GPU is lost (%s)" % e) from e
            raise


class NvmlPoller:
    """Reads NVML every `period` on a thread: (t_ns, values) pairs."""

    def __init__(self, nvml, period):
        self.nvml = nvml
        self.period = period
        self.lock = threading.Lock()
        self.readings = []
        self.lost = None
        self.error = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped.is_set():
            t0 = time.monotonic()
            try:
                v = self.nvml.read()
                t = now_ns()
                with self.lock:
                    self.readings.append((t, v))
            except GpuLost as e:
                if self.lost is None:
                    self.lost = (now_ns(), str(e))
                self.stopped.wait(0.5)
                continue
            except Exception as e:  # noqa: BLE001
                self.error = str(e)
                self.stopped.wait(0.5)
                continue
            self.stopped.wait(max(0.0, self.period - (time.monotonic() - t0)))

    def between(self, t0, t1):
        with self.lock:
            return [(t, v) for t, v in self.readings if t0 <= t < t1]

    def stop(self):
        self.stopped.set()
        self.thread.join(2)


# ---------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every process this run starts, recorded in a pid file run.sh's trap reads too."""

    def __init__(self, work):
        self.work = work
        self.pidfile = os.path.join(work, "pids")
        self.live = []

    def spawn(self, name, argv, **kw):
        log_path = os.path.join(self.work, name + ".log")
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", open(log_path, "ab"))
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, **kw)
        p.gc_name = name
        p.gc_log = log_path
        with open(self.pidfile, "a") as f:
            f.write("%d\n" % p.pid)
        self.live.append(p)
        return p

    def stop(self, p, timeout=5.0):
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.live:
            self.live.remove(p)
        return p.returncode

    def stop_all(self):
        for p in reversed(list(self.live)):
            self.stop(p)


def log_tail(path, n=12):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Agent:
    def __init__(self, ctx, name, interval, ebpf, env):
        self.ctx = ctx
        self.name = name
        self.interval = interval
        self.shm = os.path.join(ctx.work, name + ".ring")
        self.addr = "127.0.0.1:%d" % free_port()
        argv = [ctx.args.agent, "run", "--nvml-lib", ctx.args.nvml_lib, "--shm", self.shm,
                "--interval", interval, "--node-name", NODE, "--listen", self.addr,
                "--ebpf", ebpf]
        if ctx.args.device_prefix:
            argv += ["--device-prefix", ctx.args.device_prefix]
        self.proc = ctx.procs.spawn(name, argv, env=dict(env, RUST_LOG="info", NO_COLOR="1"))
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the agent (%s) exited at start (%s); its log says:\n%s" % (
                    " ".join(argv), self.proc.returncode, log_tail(self.proc.gc_log)))
            d = self.dump(quiet=True)
            if d and d.get("gpus") and d["gpus"][0].get("state") not in (None, "starting"):
                self.started = d
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not start sampling within 30 s; its log:\n%s"
                                   % log_tail(self.proc.gc_log))
            time.sleep(0.1)

    def dump(self, quiet=False):
        r = subprocess.run([self.ctx.args.agent, "dump", "--json", "--shm", self.shm],
                           capture_output=True, timeout=30)
        if r.returncode != 0:
            if quiet:
                return None
            raise RuntimeError("gpuscale-agent dump failed: %s" % r.stderr.decode().strip())
        return json.loads(r.stdout)

    def gpu(self, d):
        for g in d.get("gpus", []):
            if g.get("index") == self.ctx.args.gpu:
                return g
        return None

    def stop(self):
        return self.ctx.procs.stop(self.proc, timeout=10)


class Lines:
    """A subprocess whose stdout is JSON lines, collected on a thread."""

    def __init__(self, ctx, name, argv, env=None):
        self.items = []
        self.lock = threading.Lock()
        self.proc = ctx.procs.spawn(name, argv, stdout=subprocess.PIPE, env=env)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.items.append(v)

    def snapshot(self):
        with self.lock:
            return list(self.items)


def agent_watch(ctx, agent):
    return Lines(ctx, agent.name + "-watch",
                 [ctx.args.agent, "watch", "--json", "--shm", agent.shm, "--gpu",
                  str(ctx.args.gpu)])


def query_argv(ctx, collector, metric, extra=()):
    return [ctx.args.collector, "query", "--collector", collector, "--namespace", NAMESPACE,
            "--name", "gpu-check", "--meta", "metric=" + metric,
            "--meta", "podSelector=app=gpu-check", "--meta", "window=10s",
            "--meta", "timeAggregation=last", "--meta", "targetValue=100", "--json"] + list(extra)


def query_once(ctx, collector, metric):
    r = subprocess.run(query_argv(ctx, collector, metric), capture_output=True, timeout=30)
    if r.returncode != 0:
        return {"error": r.stderr.decode().strip()}
    return json.loads(r.stdout)


def pods_file(ctx):
    def pod(uid, name, app):
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": NAMESPACE, "name": name, "uid": uid,
                             "labels": {"app": app}},
                "spec": {"nodeName": NODE}, "status": {"phase": "Running"}}

    items = []
    if ctx.args.pod_uid:
        items.append(pod(ctx.args.pod_uid, "load", "gpu-check"))
    if ctx.args.pod_uid2:
        items.append(pod(ctx.args.pod_uid2, "sidecar", "gpu-check-sidecar"))
    path = os.path.join(ctx.work, "pods.json")
    with open(path, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
    return path


def start_collector(ctx, agent):
    addr = "127.0.0.1:%d" % free_port()
    proc = ctx.procs.spawn("collector-" + agent.name,
                           [ctx.args.collector, "serve", "--agents", agent.addr, "--listen", addr,
                            "--pods-file", ctx.pods],
                           env=dict(os.environ, RUST_LOG="info", NO_COLOR="1"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the collector exited at start; its log says:\n%s"
                               % log_tail(proc.gc_log))
        v = query_once(ctx, addr, "gpu_util")
        if "value" in v or "value_error" in v:
            return proc, addr
        time.sleep(0.2)
    raise RuntimeError("the collector did not answer within 30 s; its log:\n%s"
                       % log_tail(proc.gc_log))


# ---------------------------------------------------------------------------------------------
# the load: load.py in a pod cgroup, and (simulated) the fake NVML's scenario


SIM_PHASES = {
    # gpu_util, mem_util, sm_active, sm_occupancy, tensor, dram, vram MiB, power W, temp C
    "idle": (0, 0, 0.0, 0.0, 0.0, 0.0, 1200, 70, 33),
    "heavy": (97, 55, 85.0, 40.0, 70.0, 50.0, 2300, 420, 52),
    "tiny": (33, 3, 6.0, 2.0, 0.0, 1.0, 1200, 120, 38),
}


class Load:
    """load.py started inside a cgroup (when one is given), driven over stdin."""

    def __init__(self, ctx, name, cgroup, extra=()):
        self.ctx = ctx
        self.name = name
        self.events = []
        self.cv = threading.Condition()
        argv = [ctx.args.python, os.path.join(ctx.args.here, "load.py")] + list(extra)
        if ctx.args.simulate:
            argv += ["--simulate", "--open", ctx.device]
        env = dict(os.environ)
        if ctx.uuid and not ctx.args.simulate:
            env["CUDA_VISIBLE_DEVICES"] = ctx.uuid
        if cgroup:
            # The shell joins the pod's cgroup, then becomes load.py: every open of a GPU device
            # happens inside the pod.
            argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup] + argv
        self.proc = ctx.procs.spawn(name, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=env)
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.wait(lambda e: e.get("event") == "ready", 180)
        self.pid = self.proc.pid

    def _read(self):
        for line in self.proc.stdout:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            with self.cv:
                self.events.append(e)
                self.cv.notify_all()
        with self.cv:
            self.events.append({"event": "exit"})
            self.cv.notify_all()

    def wait(self, pred, timeout, start=0):
        deadline = time.monotonic() + timeout
        with self.cv:
            seen = start
            while True:
                for e in self.events[seen:]:
                    if e.get("event") == "error":
                        raise RuntimeError("the load generator failed: %s" % e["error"])
                    if e.get("event") == "exit":
                        raise RuntimeError("the load generator exited (%s); its log:\n%s" % (
                            self.proc.poll(), log_tail(self.proc.gc_log)))
                    if pred(e):
                        return e
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("the load generator did not answer within %d s" % timeout)
                self.cv.wait(left)

    def set(self, phase):
        """Switches phase; returns the step time (Unix ns) and load.py's answer."""
        with self.cv:
            mark = len(self.events)
        try:
            self.proc.stdin.write((phase + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            raise RuntimeError("the load generator is gone (%s)" % e) from e
        ev = self.wait(lambda e: e.get("event") == "phase" and e.get("phase") == phase, 60,
                       start=mark)
        t = ev["t_ns"]
        if self.ctx.args.simulate:
            t = self.ctx.sim.apply(phase)
        return t, ev

    def stop(self):
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.ctx.procs.stop(self.proc)


class Sim:
    """The fake NVML's scenario: what the GPU does in each phase (simulated runs only)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.path = os.path.join(ctx.work, "scenario.json")
        self.nvml_path = os.path.join(ctx.work, "scenario-pynvml.json")
        self.phase = "idle"
        self.procs = []  # (pid, role)
        self.lost = False
        a = ctx.args
        self.gpm = a.sim_gpu == "h100"
        self.name = "NVIDIA H100 80GB HBM3" if self.gpm else "NVIDIA A100-SXM4-80GB"

    def scenario(self, skew_power):
        u, m, sm, occ, ten, dram, vram, power, temp = SIM_PHASES[self.phase]
        procs = []
        for pid, role in self.procs:
            if role == "main":
                procs.append({"pid": pid, "used_memory_mib": vram - 200,
                              "sm_util": u if self.phase != "tiny" else 2})
            else:
                procs.append({"pid": pid, "used_memory_mib": 100, "sm_util": 0})
        used = vram + sum(100 for _, r in self.procs if r != "main")
        gpu = {"name": self.name, "uuid": "GPU-9c0c4000-0000-4000-8000-000000000000",
               "memory_total_mib": 81559, "gpm": self.gpm, "gpu_util": u, "mem_util": m,
               "sm_active": sm, "sm_occupancy": occ, "tensor_active": ten, "dram_active": dram,
               "memory_used_mib": used, "power_w": power * (1 + skew_power / 100.0),
               "temp_c": temp, "processes": procs,
               "fail": "gpu_lost" if self.lost else None}
        return {"driver_version": "580.159.04", "gpus": [gpu]}

    def write(self):
        for path, skew in ((self.path, 0.0), (self.nvml_path, self.ctx.args.sim_skew_power)):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.scenario(skew), f)
            os.rename(tmp, path)
        return now_ns()

    def apply(self, phase):
        self.phase = phase
        return self.write()

    def add(self, pid, role):
        self.procs.append((pid, role))
        self.write()

    def remove(self, pid):
        self.procs = [(p, r) for p, r in self.procs if p != pid]
        self.write()


# ---------------------------------------------------------------------------------------------
# series helpers


def median(xs):
    return statistics.median(xs) if xs else None


def pct(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def samples_of(watch):
    """Agent watch lines as (ts_ns, state, metrics), sorted by time."""
    out = [(v["ts_ns"], v.get("state"), v.get("metrics", {})) for v in watch.snapshot()]
    out.sort(key=lambda s: s[0])
    return out


def crossing(series, t0, t_end, before, after):
    """First time in [t0, t_end) the series crosses the midpoint of before -> after (seconds
    after t0), or None."""
    mid = (before + after) / 2.0
    up = after > before
    for t, v in series:
        if t < t0 or v is None:
            continue
        if t >= t_end:
            break
        if (up and v >= mid) or (not up and v <= mid):
            return (t - t0) / 1e9
    return None


def step_times(series, steps, settle_s):
    """For each step (t0, t_next): the crossing time of `series` ((t_ns, value) sorted), with
    levels from the last `settle_s` before t0 and before t_next. Returns (times, problems)."""
    times, problems = [], []
    w = int(settle_s * 1e9)
    for i, (t0, t_next) in enumerate(steps):
        before = median([v for t, v in series if t0 - w <= t < t0 and v is not None])
        after = median([v for t, v in series if t_next - w <= t < t_next and v is not None])
        if before is None or after is None:
            problems.append("step %d: no values around it" % (i + 1))
            continue
        if abs(after - before) < 20:
            problems.append("step %d: only %.0f -> %.0f, too small to time" % (i + 1, before,
                                                                               after))
            continue
        c = crossing(series, t0, t_next, before, after)
        if c is None:
            problems.append("step %d: never crossed %.0f" % (i + 1, (before + after) / 2))
            continue
        times.append(c)
    return times, problems


# ---------------------------------------------------------------------------------------------
# the report


class Check:
    def __init__(self, name):
        self.name = name
        self.status = "not_run"
        self.reason = "not reached"
        self.summary = ""
        self.figures = {}

    def result(self, status, summary, reason=None):
        self.status, self.summary, self.reason = status, summary, reason

    def as_json(self):
        return {"status": self.status, "reason": self.reason, "summary": self.summary,
                "figures": self.figures}


ORDER = ["agreement", "sm_activity", "attribution", "reaction", "overhead"]


class Report:
    def __init__(self, args):
        self.args = args
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.t0 = time.monotonic()
        self.checks = {n: Check(n) for n in ORDER}
        self.gpu = {}
        self.env = {}
        self.notes = []
        self.lost = None

    def not_run_all(self, reason, only_reached=True):
        for c in self.checks.values():
            if c.status == "not_run" and (c.reason == "not reached" or not only_reached):
                c.reason = reason

    def counts(self):
        out = {"pass": 0, "fail": 0, "not_run": 0}
        for c in self.checks.values():
            out[c.status] += 1
        return out

    def as_json(self):
        counts = self.counts()
        return {
            "schema": SCHEMA,
            "status": "ran",
            "result": "pass" if counts["pass"] == len(ORDER) else
            ("fail" if counts["fail"] else "incomplete"),
            "simulated": bool(self.args.simulate),
            "started": self.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "duration_s": round(time.monotonic() - self.t0, 1),
            "gpu": self.gpu,
            "environment": self.env,
            "nvml_lib": self.args.nvml_lib,
            "gpu_lost": self.lost,
            "pods": {"load": {"uid": self.args.pod_uid or None,
                              "container_id": self.args.container_id or None},
                     "sidecar": {"uid": self.args.pod_uid2 or None}},
            "notes": self.notes,
            "checks": {n: self.checks[n].as_json() for n in ORDER},
            "counts": counts,
        }

    def table(self):
        g = self.gpu
        lines = ["", "gpuscale gpu-check%s: %s (%s) · driver %s · %s" % (
            " (SIMULATED: fake NVML, no GPU)" if self.args.simulate else "",
            g.get("name") or "?", g.get("uuid") or "?", g.get("driver") or "?",
            self.started.strftime("%Y-%m-%d %H:%M UTC"))]
        lines.append("%-12s %-8s %s" % ("check", "result", "figures"))
        for n in ORDER:
            c = self.checks[n]
            word = {"pass": "PASS", "fail": "FAIL", "not_run": "NOT RUN"}[c.status]
            text = c.summary or ""
            if c.reason and c.status != "pass":
                text = (text + "; " if text else "") + c.reason
            first = True
            for part in text.split("\n"):
                lines.append("%-12s %-8s %s" % (n if first else "", word if first else "", part))
                first = False
        for note in self.notes:
            lines.append("note: " + note)
        c = self.counts()
        lines.append("checks: %d pass, %d fail, %d not run" % (c["pass"], c["fail"],
                                                              c["not_run"]))
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the checks


class Ctx:
    pass


def lost_reason(ctx, agent=None):
    if ctx.poller is not None and ctx.poller.lost:
        return ctx.poller.lost[1]
    if ctx.args.simulate and ctx.sim.lost:
        return "the (simulated) GPU fell off the bus"
    if agent is not None:
        watch = getattr(agent, "watch", None)
        if watch is not None:
            s = samples_of(watch)
            if s and s[-1][1] == "lost":
                return "the agent marks the GPU lost"
    return None


def maybe_lose(ctx, check):
    if ctx.args.simulate and ctx.args.sim_lose_gpu_at == check:
        log("simulating a GPU that falls off the bus as %s starts" % check)
        ctx.sim.lost = True
        ctx.sim.write()


def check_agreement(ctx, agent, c):
    t = ctx.t
    marks = {}
    marks["idle1"] = ctx.load.set("idle")[0]
    time.sleep(t["idle"])
    marks["heavy"] = ctx.load.set("heavy")[0]
    time.sleep(t["heavy"])
    marks["idle2"] = ctx.load.set("idle")[0]
    time.sleep(t["idle"])
    end = now_ns()
    if ctx.nvml.missing:
        c.result("not_run", "", ctx.nvml.missing)
        return
    why = lost_reason(ctx, agent)
    if why:
        c.result("not_run", "", "the GPU was lost during the check: " + why)
        return
    samples = [s for s in samples_of(agent.watch) if marks["idle1"] <= s[0] < end]
    readings = ctx.poller.between(marks["idle1"], end)
    rts = [r[0] for r in readings]
    # Pair every agent sample with pynvml's reading nearest in time (pynvml reads every 10 ms).
    near = int(agent.interval_ns / 2) + 20_000_000
    diffs = {k: [] for k in LIMITS}
    for ts, _state, m in samples:
        i = bisect.bisect_left(rts, ts)
        best = None
        for j in (i - 1, i):
            if 0 <= j < len(rts) and (best is None or abs(rts[j] - ts) < abs(rts[best] - ts)):
                best = j
        if best is None or abs(rts[best] - ts) > near:
            continue
        v = readings[best][1]
        for key in ("gpu_util", "mem_util", "temperature_c"):
            if m.get(key) is not None:
                diffs[key].append(abs(m[key] - v[key]))
        if m.get("vram_used_bytes") is not None:
            diffs["vram_used_mib"].append(abs(m["vram_used_bytes"] - v["vram_used_bytes"])
                                          / 1048576.0)
        if m.get("power_watts") is not None and v["power_watts"] > 0:
            diffs["power_pct"].append(abs(m["power_watts"] - v["power_watts"]) * 100.0
                                      / v["power_watts"])
    heavy_util = median([v["gpu_util"] for tr, v in readings if marks["heavy"] <= tr
                         < marks["idle2"] and tr > marks["heavy"] + 1e9])
    meds = {k: median(v) for k, v in diffs.items()}
    c.figures = {
        "pairs": len(diffs["gpu_util"]),
        "median_abs_diff": {k: None if v is None else round(v, 3) for k, v in meds.items()},
        "max_abs_diff": {k: None if not v else round(max(v), 3) for k, v in diffs.items()},
        "limits": LIMITS,
        "nvml_heavy_gpu_util": heavy_util,
        "pynvml_memory_v1": ctx.nvml.v1_memory,
    }
    parts, bad = [], []
    units = {"gpu_util": " pt", "mem_util": " pt", "vram_used_mib": " MiB", "power_pct": " %",
             "temperature_c": " °C"}
    for k in LIMITS:
        if meds[k] is None:
            bad.append("%s: no pairs" % k)
            continue
        parts.append("%s %.1f%s (≤%g)" % (k, meds[k], units[k], LIMITS[k]))
        if meds[k] > LIMITS[k]:
            bad.append("%s differs by %.1f%s" % (k, meds[k], units[k]))
    if heavy_util is None or heavy_util < 50:
        bad.append("the load did not load the GPU (NVML's gpu_util in the heavy phase: %s)"
                   % heavy_util)
    summary = "median |agent - NVML| over %d pairs: %s; NVML gpu_util in the heavy phase %s %%" % (
        c.figures["pairs"], ", ".join(parts), heavy_util)
    if ctx.nvml.v1_memory:
        ctx.report.notes.append("this pynvml has no memory_info v2: VRAM compared against v1, "
                                "whose 'used' includes reserved memory")
    c.result("fail" if bad else "pass", summary, "; ".join(bad) or None)
    ctx.marks = marks


def check_sm_activity(ctx, agent, c):
    t0 = ctx.load.set("tiny")[0]
    time.sleep(ctx.t["tiny"])
    end = now_ns()
    # Both triggers asked while the tiny phase is steady (KEDA's view of the same moment).
    q_sm = query_once(ctx, ctx.collector_addr, "sm_active")
    q_util = query_once(ctx, ctx.collector_addr, "gpu_util")
    ctx.load.set("idle")
    why = lost_reason(ctx, agent)
    if why:
        c.result("not_run", "", "the GPU was lost during the check: " + why)
        return
    gpu = agent.gpu(agent.dump())
    agent_gpm = bool(gpu and gpu.get("gpm_supported"))
    nvml_gpm = None if ctx.nvml.missing else ctx.nvml.gpm_supported()
    settle = t0 + int(ctx.t["tiny"] * 1e9 / 3)
    tiny = [s for s in samples_of(agent.watch) if settle <= s[0] < end]
    every = [s for s in samples_of(agent.watch) if s[1] == "ok"][2:]
    present = sum(1 for s in every if s[2].get("sm_active") is not None)
    util = median([s[2]["gpu_util"] for s in tiny if s[2].get("gpu_util") is not None])
    sm = median([s[2]["sm_active"] for s in tiny if s[2].get("sm_active") is not None])
    heavy_sm = None
    if getattr(ctx, "marks", None):
        m = ctx.marks
        heavy_sm = median([s[2]["sm_active"] for s in samples_of(agent.watch)
                           if m["heavy"] + 1e9 <= s[0] < m["idle2"]
                           and s[2].get("sm_active") is not None])
    c.figures = {
        "agent_gpm_supported": agent_gpm, "nvml_gpm_supported": nvml_gpm,
        "sm_active_present_share": round(present / len(every), 3) if every else None,
        "tiny_gpu_util": util, "tiny_sm_active": sm, "heavy_sm_active": heavy_sm,
        "collector_sm_active": q_sm.get("value"), "collector_gpu_util": q_util.get("value"),
        "collector_sm_active_error": q_sm.get("value_error") or q_sm.get("error"),
    }
    bad = []
    if nvml_gpm is not None and nvml_gpm != agent_gpm:
        bad.append("the agent says GPM is %s but NVML says %s" % (
            "supported" if agent_gpm else "unsupported",
            "supported" if nvml_gpm else "unsupported"))
    if agent_gpm:
        share = c.figures["sm_active_present_share"] or 0
        if share < 0.95:
            bad.append("sm_active present in only %.0f %% of samples" % (share * 100))
        if util is None or sm is None:
            bad.append("no tiny-kernel values (gpu_util %s, sm_active %s)" % (util, sm))
        elif not (util >= TINY_RATIO * sm and util - sm >= TINY_GAP):
            bad.append("with tiny kernels gpu_util %.1f %% is not far above sm_active %.1f %% "
                       "(want ≥ %g× and ≥ %g points)" % (util, sm, TINY_RATIO, TINY_GAP))
        if q_sm.get("value") is None:
            bad.append("the collector gave no sm_active value: %s"
                       % c.figures["collector_sm_active_error"])
        summary = ("GPM: sm_active in %.0f %% of samples; tiny kernels: gpu_util %s %% vs "
                   "sm_active %s %%; heavy: sm_active %s %%" % (
                       share * 100, fmt(util), fmt(sm), fmt(heavy_sm)))
    else:
        if present:
            bad.append("no GPM, yet the agent reported sm_active in %d samples" % present)
        qs, qu = q_sm.get("value"), q_util.get("value")
        if qs is None or qu is None:
            bad.append("the collector did not answer both triggers (sm_active: %s, gpu_util: %s)"
                       % (qs if qs is not None else c.figures["collector_sm_active_error"],
                          qu if qu is not None else q_util.get("value_error")))
        elif abs(qs - qu) > 5:
            bad.append("an sm_active trigger gave %.1f, not the gpu_util fallback %.1f" % (qs,
                                                                                          qu))
        summary = ("no GPM: the agent reports sm_active as unavailable; an sm_active trigger "
                   "falls back to gpu_util (%s vs %s); tiny kernels: gpu_util %s %%" % (
                       fmt(qs), fmt(qu), fmt(util)))
    c.result("fail" if bad else "pass", summary, "; ".join(bad) or None)


def fmt(v, nd=1):
    return "-" if v is None else ("%.*f" % (nd, v))


def find_proc(gpu, pid):
    for p in (gpu or {}).get("processes", []):
        if p.get("pid") == pid:
            return p
    return None


def attribution_part(ctx, agent, pid, want_source, timeout, need_sm_util):
    """Polls the agent's dump until process `pid` is attributed to the pod by `want_source`;
    returns (ok, figures, problem)."""
    deadline = time.monotonic() + timeout
    p = None
    while True:
        d = agent.dump()
        gpu = agent.gpu(d)
        p = find_proc(gpu, pid)
        ok = (p is not None and p.get("pod_uid") == ctx.args.pod_uid
              and p.get("container_id") == ctx.args.container_id
              and p.get("attribution") == want_source
              and (p.get("used_memory_bytes") or 0) > 0
              and (not need_sm_util or (p.get("sm_util") or 0) > 0))
        if ok or time.monotonic() > deadline or lost_reason(ctx):
            break
        time.sleep(0.25)
    fig = {"process": p, "ebpf": d.get("ebpf"), "ebpf_reason": d.get("ebpf_reason")}
    if ok:
        return True, fig, None
    why = lost_reason(ctx)
    if why:
        raise GpuLost(why)
    if p is None:
        return False, fig, "pid %d is not among the GPU's processes %s" % (
            pid, [q.get("pid") for q in (gpu or {}).get("processes", [])])
    return False, fig, "pid %d: pod %s container %s by %s, memory %s, sm_util %s" % (
        pid, p.get("pod_uid"), (p.get("container_id") or "-")[:12], p.get("attribution"),
        p.get("used_memory_bytes"), p.get("sm_util"))


def check_attribution_ebpf(ctx, agent, c):
    """First half of the attribution check (agent A, eBPF, two processes on the GPU)."""
    if not ctx.args.cgroup:
        c.figures["ebpf"] = {"status": "not_run", "reason": "no pod cgroup: %s"
                             % ctx.args.no_cgroup}
        return
    d = agent.dump()
    if d.get("ebpf") != "on":
        c.figures["ebpf"] = {"status": "not_run", "reason": "eBPF is %s in the agent: %s" % (
            d.get("ebpf"), d.get("ebpf_reason") or "?")}
    sidecar = None
    try:
        if ctx.args.cgroup2:
            sidecar = Load(ctx, "sidecar", ctx.args.cgroup2, ["--extra-mib", "0", "--size", "64"])
            if ctx.args.simulate:
                ctx.sim.add(sidecar.pid, "sidecar")
        ctx.load.set("heavy")
        if "ebpf" not in c.figures:
            ok, fig, problem = attribution_part(ctx, agent, ctx.load.pid, "ebpf",
                                                ctx.t["attr_wait"], sidecar is not None)
            opens = [o for o in d.get("device_opens", []) if o.get("pid") == ctx.load.pid]
            opens = opens or [o for o in agent.dump().get("device_opens", [])
                              if o.get("pid") == ctx.load.pid]
            fig["device_opens"] = len(opens)
            if ok and not any(o.get("pod_uid") == ctx.args.pod_uid for o in opens):
                ok, problem = False, "no device open of pid %d with the pod's UID" % ctx.load.pid
            fig["status"] = "pass" if ok else "fail"
            fig["reason"] = problem
            c.figures["ebpf"] = fig
        if sidecar is not None:
            gpu = agent.gpu(agent.dump())
            sp = find_proc(gpu, sidecar.pid)
            c.figures["sidecar"] = sp
            c.figures["sidecar_ok"] = bool(sp and sp.get("pod_uid") == ctx.args.pod_uid2)
    finally:
        if sidecar is not None:
            sidecar.stop()
            if ctx.args.simulate:
                ctx.sim.remove(sidecar.pid)
        ctx.load.set("idle")


def finish_attribution(ctx, c):
    # A part that raised left its reason on the check.
    e = c.figures.get("ebpf") or {"status": "not_run", "reason": c.reason}
    p = c.figures.get("procfs") or {"status": "not_run", "reason": "not reached"}
    statuses = [e["status"], p["status"]]
    proc = (e.get("process") or p.get("process") or {})
    sm = proc.get("sm_util") if e.get("process") else None
    mem = proc.get("used_memory_bytes")
    parts = ["eBPF: %s" % (e["status"].upper().replace("_", " ")),
             "procfs (--ebpf off): %s" % (p["status"].upper().replace("_", " "))]
    if proc:
        parts.append("pid %s -> pod %s, container %s" % (proc.get("pid"), proc.get("pod_uid"),
                                                        (proc.get("container_id") or "-")[:12]))
    parts.append("per-process sm_util %s %%, memory %s MiB" % (
        fmt(sm, 0), "-" if mem is None else "%.0f" % (mem / 1048576.0)))
    if "sidecar_ok" in c.figures:
        parts.append("second pod's process %s" % ("attributed" if c.figures["sidecar_ok"]
                                                  else "NOT attributed"))
    reasons = [r for r in (e.get("reason"), p.get("reason")) if r]
    if "sidecar_ok" in c.figures and not c.figures["sidecar_ok"]:
        statuses.append("fail")
        reasons.append("the second pod's process was not attributed to its pod")
    if "fail" in statuses:
        status = "fail"
    elif "not_run" in statuses:
        status = "not_run"
    else:
        status = "pass"
    c.result(status, "; ".join(parts), "; ".join(reasons) or None)


def check_reaction(ctx, agent, c):
    t = ctx.t
    collector_watch = Lines(ctx, "collector-watch",
                            query_argv(ctx, ctx.collector_addr, "gpu_util",
                                       ["--watch", "20ms"]))
    try:
        ctx.load.set("idle")
        time.sleep(t["step"])
        starts = []
        for _ in range(5):
            for phase in ("heavy", "idle"):
                starts.append(ctx.load.set(phase)[0])
                time.sleep(t["step"])
        end = now_ns()
    finally:
        ctx.procs.stop(collector_watch.proc)
    why = lost_reason(ctx, agent)
    if why:
        c.result("not_run", "", "the GPU was lost during the check: " + why)
        return
    steps = list(zip(starts, starts[1:] + [end]))
    settle = min(1.0, t["step"] / 2)
    agent_series = [(s[0], s[2].get("gpu_util")) for s in samples_of(agent.watch)]
    coll_series = sorted((v["ts_ns"], v.get("value")) for v in collector_watch.snapshot()
                         if "ts_ns" in v)
    sources = {"agent": agent_series, "collector": coll_series}
    if not ctx.nvml.missing:
        sources["nvml"] = [(tr, v["gpu_util"]) for tr, v in
                           ctx.poller.between(starts[0] - int(2e9), end)]
    figs, problems = {}, []
    for name, series in sources.items():
        times, probs = step_times(series, steps, settle)
        figs[name] = {"n": len(times), "p50_s": None if not times else round(median(times), 3),
                      "max_s": None if not times else round(max(times), 3),
                      "times_s": [round(x, 3) for x in times], "problems": probs}
        if probs:
            problems.append("%s: %d of %d steps not timed (first: %s)" % (
                name, len(probs), len(steps), probs[0]))
    c.figures = dict(figs, margin_s=REACTION_MARGIN_S, steps=len(steps),
                     collector_poll_ms=20, agent_interval=agent.interval)
    parts = []
    for name in ("nvml", "agent", "collector"):
        f = figs.get(name)
        if f and f["p50_s"] is not None:
            parts.append("%s p50 %.2f s max %.2f s" % ({"nvml": "NVML (pynvml)"}.get(name, name),
                                                        f["p50_s"], f["max_s"]))
    summary = "%d steps" % len(steps) + ("; " + ", ".join(parts) if parts else "")
    if "nvml" not in figs:
        c.result("not_run", summary, "no NVML baseline to compare with: " + ctx.nvml.missing)
        return
    base = figs["nvml"]["p50_s"]
    bad = []
    if base is None:
        bad.append("NVML's own counter never crossed: the load steps did not show")
    else:
        for name in ("agent", "collector"):
            f = figs[name]
            if f["p50_s"] is None:
                bad.append("%s never crossed the midpoint" % name)
            elif f["p50_s"] > base + REACTION_MARGIN_S:
                bad.append("%s p50 %.2f s is more than %.2f s behind NVML's %.2f s" % (
                    name, f["p50_s"], REACTION_MARGIN_S, base))
    if problems and not bad and any(figs[n]["n"] < len(steps) // 2 for n in figs):
        bad.append("fewer than half the steps could be timed")
    c.result("fail" if bad else "pass", summary, "; ".join(bad + problems) or None)


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def mem_kib(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def measure_overhead(ctx, agent):
    """CPU % of one core, RSS and samples written by `agent` over the overhead window."""
    ctx.load.set("heavy")
    time.sleep(min(1.0, ctx.t["overhead"] / 3))
    pid = agent.proc.pid
    tck = os.sysconf("SC_CLK_TCK")
    g0 = agent.gpu(agent.dump())
    w0, c0, t0 = g0["samples_written"], cpu_ticks(pid), time.monotonic()
    time.sleep(ctx.t["overhead"])
    c1, t1 = cpu_ticks(pid), time.monotonic()
    m = mem_kib(pid)
    g1 = agent.gpu(agent.dump())
    ctx.load.set("idle")
    why = lost_reason(ctx, agent)
    if why:
        # An agent backing off from a lost GPU costs less than one sampling it: not a figure.
        raise GpuLost(why)
    wall = t1 - t0
    asked = wall / (agent.interval_ns / 1e9)
    written = g1["samples_written"] - w0
    return {
        "interval": agent.interval, "wall_s": round(wall, 2),
        "cpu_pct": round((c1 - c0) / tck / wall * 100.0, 3),
        "cpu_resolution_pct": round(100.0 / tck / wall, 3),
        "rss_mib": round(m.get("VmRSS", 0) / 1024.0, 1),
        "peak_rss_mib": round(m.get("VmHWM", 0) / 1024.0, 1),
        "samples_written": written, "samples_asked": int(asked),
        "kept_up": written >= KEPT_UP * asked,
        "with": "one collector attached, eBPF %s" % agent.started.get("ebpf"),
    }


def finish_overhead(ctx, c):
    runs = c.figures.get("runs", [])
    if not runs:
        c.result("not_run", "", "not measured: %s" % c.figures.get("missing_why",
                                                                   "no agent run reached it"))
        return
    parts, bad = [], []
    # CPU and memory are judged only for what ships: release binaries on a real GPU.
    profile = (ctx.args.bundle_info or {}).get("profile", "release")
    not_judged = ("simulated" if ctx.args.simulate else None) or \
        ("a %s build" % profile if profile != "release" else None)
    for r in runs:
        parts.append("%s: CPU %.2f %% of a core, RSS %.1f MiB (peak %.1f), %d/%d samples" % (
            r["interval"], r["cpu_pct"], r["rss_mib"], r["peak_rss_mib"], r["samples_written"],
            r["samples_asked"]))
        if not r["kept_up"]:
            bad.append("at %s the agent wrote only %d of %d samples" % (
                r["interval"], r["samples_written"], r["samples_asked"]))
        if r["interval"] == "100ms" and not not_judged:
            if r["cpu_pct"] > OVERHEAD_CPU_PCT_100MS:
                bad.append("CPU %.2f %% at 100ms is over %g %%" % (r["cpu_pct"],
                                                                  OVERHEAD_CPU_PCT_100MS))
            if r["rss_mib"] > OVERHEAD_RSS_MIB_100MS:
                bad.append("RSS %.1f MiB at 100ms is over %g MiB" % (
                    r["rss_mib"], OVERHEAD_RSS_MIB_100MS))
    if not_judged:
        parts.append("CPU and RSS not judged (%s): only whether the agent kept up" % not_judged)
    c.figures["judged"] = not not_judged
    missing = {"100ms", "10ms"} - {r["interval"] for r in runs}
    c.figures["limits"] = {"cpu_pct_100ms": OVERHEAD_CPU_PCT_100MS,
                           "rss_mib_100ms": OVERHEAD_RSS_MIB_100MS, "kept_up": KEPT_UP}
    status = "fail" if bad else ("not_run" if missing else "pass")
    reason = "; ".join(bad) or (("not measured at %s: %s" % (", ".join(sorted(missing)),
                                                             c.figures.get("missing_why")))
                                if missing else None)
    c.result(status, "\n".join(parts), reason)


# ---------------------------------------------------------------------------------------------
# the run


def guarded(ctx, name, fn, *a):
    """Runs one check; a failure to run becomes its reason, never the end of the run."""
    c = ctx.report.checks[name]
    maybe_lose(ctx, name)
    try:
        fn(ctx, *a, c)
    except Exception as e:  # noqa: BLE001 - one part failing must not stop the others
        why = lost_reason(ctx, a[0] if a else None)
        c.result("not_run", c.summary, ("the GPU was lost: %s (%s)" % (why, e)) if why
                 else str(e))
        log("%s could not finish: %s" % (name, e))


def run(args):
    report = Report(args)
    ctx = Ctx()
    ctx.args, ctx.report = args, report
    ctx.work = args.work
    ctx.procs = Procs(args.work)
    ctx.poller = None
    ctx.uuid = None
    quick = args.simulate
    ctx.t = {"settle": 1.5 if quick else 3, "idle": 1.5 if quick else 4,
             "heavy": 2.5 if quick else 8, "tiny": 2.4 if quick else 6,
             "attr_wait": 15 if quick else 20, "step": 1.2 if quick else 3,
             "overhead": 3 if quick else 15}
    env = dict(os.environ)
    if args.simulate:
        ctx.sim = Sim(ctx)
        ctx.sim.write()
        env["FAKE_NVML_SCENARIO"] = ctx.sim.path
        # pynvml (in this process) reads its own copy: identical unless --sim-skew-power.
        os.environ["FAKE_NVML_SCENARIO"] = ctx.sim.nvml_path
        ctx.device = args.device_prefix + "0"
        with open(ctx.device, "w"):
            pass
    report.env = {"python": platform.python_version(), "kernel": platform.release(),
                  "machine": platform.machine(), "bundle": args.bundle_info}
    ctx.nvml = Nvml(args.nvml_lib, args.gpu)
    if ctx.nvml.missing:
        report.notes.append(ctx.nvml.missing)
    else:
        report.gpu = ctx.nvml.info()
        report.env["pynvml"] = report.gpu.pop("pynvml")
        ctx.uuid = report.gpu.get("uuid")
        ctx.poller = NvmlPoller(ctx.nvml, 0.01)
    ctx.pods = pods_file(ctx)
    agent = None
    try:
        try:
            agent = Agent(ctx, "agent-100ms", "100ms", "auto", env)
            agent.interval_ns = 100_000_000
            g = agent.gpu(agent.started)
            if g is None:
                raise RuntimeError("the agent has no GPU with index %d" % args.gpu)
            if not report.gpu:
                report.gpu = {"name": g.get("name"), "uuid": g.get("uuid"),
                              "driver": agent.started.get("driver_version")}
                ctx.uuid = g.get("uuid")
            report.gpu["gpm_supported_by_agent"] = g.get("gpm_supported")
            agent.watch = agent_watch(ctx, agent)
            proc, ctx.collector_addr = start_collector(ctx, agent)
        except Exception as e:  # noqa: BLE001
            report.not_run_all("the agent or collector could not start: %s" % e)
            return report
        try:
            ctx.load = Load(ctx, "load", args.cgroup)
            if args.simulate:
                ctx.sim.add(ctx.load.pid, "main")
            report.env["torch"] = ctx.load.ready.get("torch")
            report.env["cuda_runtime"] = ctx.load.ready.get("cuda")
        except Exception as e:  # noqa: BLE001
            ctx.load = None
            why = "no load could be put on the GPU: %s" % e
            for n in ("agreement", "sm_activity", "attribution", "reaction", "overhead"):
                report.checks[n].reason = why
            return report
        time.sleep(ctx.t["settle"])
        guarded(ctx, "agreement", check_agreement, agent)
        guarded(ctx, "sm_activity", check_sm_activity, agent)
        guarded(ctx, "attribution", check_attribution_ebpf, agent)
        guarded(ctx, "reaction", check_reaction, agent)
        ov = report.checks["overhead"]
        ov.figures["runs"] = []
        try:
            ov.figures["runs"].append(measure_overhead(ctx, agent))
        except Exception as e:  # noqa: BLE001
            why = lost_reason(ctx)
            ov.figures["missing_why"] = ("the GPU was lost: %s" % why) if why else str(e)
        ctx.procs.stop(agent.watch.proc)
        ctx.procs.stop(proc)
        agent.stop()
        # Second run: procfs attribution (--ebpf off) and overhead at 10ms.
        attr = report.checks["attribution"]
        def failed(e):
            why = lost_reason(ctx)
            return ("the GPU was lost: %s" % why) if why else str(e)

        try:
            agent = Agent(ctx, "agent-10ms", "10ms", "off", env)
            agent.interval_ns = 10_000_000
            agent.watch = None
            proc, ctx.collector_addr = start_collector(ctx, agent)
        except Exception as e:  # noqa: BLE001
            agent = None
            attr.figures.setdefault("procfs", {"status": "not_run", "reason": failed(e)})
            ov.figures["missing_why"] = failed(e)
        if agent is not None:
            try:
                ctx.load.set("heavy")
                if args.cgroup:
                    ok, fig, problem = attribution_part(ctx, agent, ctx.load.pid, "procfs",
                                                        ctx.t["attr_wait"], False)
                    fig.update(status="pass" if ok else "fail", reason=problem)
                    attr.figures["procfs"] = fig
                else:
                    attr.figures["procfs"] = {"status": "not_run",
                                              "reason": "no pod cgroup: %s" % args.no_cgroup}
            except Exception as e:  # noqa: BLE001
                attr.figures.setdefault("procfs", {"status": "not_run", "reason": failed(e)})
            try:
                ov.figures["runs"].append(measure_overhead(ctx, agent))
            except Exception as e:  # noqa: BLE001
                ov.figures["missing_why"] = failed(e)
            ctx.procs.stop(proc)
        finish_attribution(ctx, attr)
        finish_overhead(ctx, ov)
        if lost_reason(ctx):
            report.lost = lost_reason(ctx)
    finally:
        if getattr(ctx, "load", None) is not None:
            ctx.load.stop()
        ctx.procs.stop_all()
        if ctx.poller is not None:
            ctx.poller.stop()
        report.not_run_all("not reached: an earlier step failed")
    return report


def write_report(args, report):
    data = report.as_json()
    tmp = args.report + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.report)


def main():
    p = argparse.ArgumentParser(description="gpuscale gpu-check (see README.md)")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="is there a GPU behind this NVML?")
    pr.add_argument("--nvml-lib", required=True)
    r = sub.add_parser("run", help="run the checks")
    r.add_argument("--nvml-lib", required=True)
    r.add_argument("--here", required=True, help="the bundle folder")
    r.add_argument("--work", required=True, help="scratch folder (run.sh removes it)")
    r.add_argument("--report", required=True, help="where the JSON report goes")
    r.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to check")
    r.add_argument("--cgroup", default="", help="the main pod's container cgroup directory")
    r.add_argument("--cgroup2", default="", help="a second pod's container cgroup directory")
    r.add_argument("--pod-uid", default="")
    r.add_argument("--pod-uid2", default="")
    r.add_argument("--container-id", default="")
    r.add_argument("--no-cgroup", default="", help="why there are no cgroups")
    r.add_argument("--device-prefix", default="")
    r.add_argument("--simulate", action="store_true", help="the NVML is the fake one")
    r.add_argument("--sim-gpu", choices=["h100", "a100"], default="h100")
    r.add_argument("--sim-lose-gpu-at", choices=ORDER[:4], default=None)
    r.add_argument("--sim-skew-power", type=float, default=0.0,
                   help="pynvml's view of power is off by this many percent")
    args = p.parse_args()
    if args.cmd == "probe":
        status, why = probe(args.nvml_lib)
        print("%s %s" % (status, why))
        return 0
    args.agent = os.path.join(args.here, "gpuscale-agent")
    args.collector = os.path.join(args.here, "gpuscale-collector")
    args.python = sys.executable or "python3"
    try:
        with open(os.path.join(args.here, "bundle.json")) as f:
            args.bundle_info = json.load(f)
    except (OSError, ValueError):
        args.bundle_info = None

    def on_term(signum, _frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        report = run(args)
    except KeyboardInterrupt:
        log("interrupted: stopped everything it started")
        return 130
    sys.stdout.write(report.table())
    write_report(args, report)
    sys.stdout.write("report: %s\n" % args.report)
    counts = report.counts()
    return 0 if counts["pass"] == len(ORDER) else 1


if __name__ == "__main__":
    sys.exit(main())
