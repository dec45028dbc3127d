#!/usr/bin/env python3
"""gpuscale gpu-check load generator: puts a known load on one GPU, phase by phase.

check.py starts it (inside a pod-shaped cgroup) and drives it through stdin, one command per
line; it answers on stdout, one JSON object per line:

  ready                      {"event": "ready", "pid", "device", "torch", "cuda", "reserved_bytes"}
  heavy | tiny | idle        {"event": "phase", "phase", "t_ns", "reserved_bytes"} (every
                             command is answered, also one that repeats the current phase)
  quit (or end of stdin)     exits 0
  on any failure             {"event": "error", "error": "..."} and exit 1

Phases:
  idle   holds its CUDA context and does nothing (an idle GPU process, like a loaded model server
         with no traffic).
  heavy  large half-precision matmuls back to back, plus a 1 GiB buffer (so VRAM use changes
         too): utilization and SM activity near 100 %.
  tiny   64x64 matmuls, each waited for: the GPU is "busy" (a kernel is running) a good share of
         the time but uses almost none of its SMs. This is where NVML's gpu_util overstates load
         and GPM's sm_active does not.

t_ns (time.time_ns(), the clock the agent stamps samples with) marks the step: for a step up,
the moment the first kernel of the phase is launched (the queue was empty); for a step down,
the moment the last kernel of the previous phase finished.

With --simulate it imports no CUDA: it opens the files given with --open (stand-ins for
/dev/nvidia*, so the agent's eBPF tracker sees a device open from this process's cgroup) and
acknowledges commands; check.py changes the fake NVML's scenario instead.
"""

import argparse
import json
import os
import queue
import sys
import threading
import time


def say(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Commands:
    """Commands from stdin, read on a thread and queued; each one is answered."""

    def __init__(self):
        self.queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in sys.stdin:
            cmd = line.strip()
            if cmd:
                self.queue.put(cmd)
        self.queue.put("quit")

    def next(self, timeout):
        """The next command, or None after `timeout` seconds (0: don't wait)."""
        try:
            if timeout <= 0:
                return self.queue.get_nowait()
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


PHASES = ("idle", "heavy", "tiny")


def unknown(cmd):
    say(event="error", error="unknown command %r (idle, heavy, tiny, quit)" % cmd)
    return 1


def simulate(args, commands):
    files = [open(p, "rb") for p in args.open]
    say(event="ready", pid=os.getpid(), device="simulated", torch=None, cuda=None,
        reserved_bytes=0)
    while True:
        cmd = commands.next(3600)
        if cmd is None:
            continue
        if cmd == "quit":
            break
        if cmd not in PHASES:
            return unknown(cmd)
        say(event="phase", phase=cmd, t_ns=time.time_ns(), reserved_bytes=0)
    for f in files:
        f.close()
    return 0


def real(args, commands):
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "no PyTorch"
        say(event="error", error="PyTorch is not importable: %s (pip install torch)" % e)
        return 1
    if not torch.cuda.is_available():
        say(event="error", error="PyTorch %s sees no CUDA device (CUDA_VISIBLE_DEVICES=%s)"
            % (torch.__version__, os.environ.get("CUDA_VISIBLE_DEVICES", "")))
        return 1
    dev = torch.device("cuda:0")
    n = args.size
    a = torch.randn(n, n, device=dev, dtype=torch.float16)
    b = torch.randn(n, n, device=dev, dtype=torch.float16)
    c = torch.empty(n, n, device=dev, dtype=torch.float16)
    x = torch.randn(64, 64, device=dev)
    y = torch.randn(64, 64, device=dev)
    torch.cuda.synchronize()
    say(event="ready", pid=os.getpid(), device=torch.cuda.get_device_name(0),
        torch=torch.__version__, cuda=torch.version.cuda,
        reserved_bytes=torch.cuda.memory_reserved())
    phase = "idle"
    extra = None
    batch = 1
    while True:
        cmd = commands.next(0.05 if phase == "idle" else 0)
        if cmd == "quit":
            break
        if cmd is not None:
            if cmd not in PHASES:
                return unknown(cmd)
            # Finish the previous phase's kernels before stamping the step.
            torch.cuda.synchronize()
            if cmd == "heavy" and extra is None and args.extra_mib > 0:
                extra = torch.empty(args.extra_mib << 20, dtype=torch.uint8, device=dev)
                extra.fill_(1)
                torch.cuda.synchronize()
            elif cmd != "heavy" and extra is not None:
                extra = None
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
            phase = cmd
            say(event="phase", phase=phase, t_ns=time.time_ns(),
                reserved_bytes=torch.cuda.memory_reserved())
        if phase == "heavy":
            # Batches of ~20 ms keep the queue short, so a step down is seen at once.
            t0 = time.perf_counter()
            for _ in range(batch):
                torch.mm(a, b, out=c)
            torch.cuda.synchronize()
            took = time.perf_counter() - t0
            if took < 0.015:
                batch = min(batch * 2, 4096)
            elif took > 0.03 and batch > 1:
                batch //= 2
        elif phase == "tiny":
            for _ in range(50):
                torch.mm(x, y)
                torch.cuda.synchronize()
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--simulate", action="store_true", help="no CUDA: see the module doc")
    p.add_argument("--open", action="append", default=[],
                   help="with --simulate: a file to open and keep open (repeat)")
    p.add_argument("--size", type=int, default=8192, help="matmul size of the heavy phase")
    p.add_argument("--extra-mib", type=int, default=1024,
                   help="buffer held during the heavy phase, MiB")
    args = p.parse_args()
    commands = Commands()
    try:
        return simulate(args, commands) if args.simulate else real(args, commands)
    except Exception as e:  # noqa: BLE001 - report any failure (a lost GPU, OOM) and exit
        say(event="error", error="%s: %s" % (type(e).__name__, e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
