#!/usr/bin/env bash
# gpuscale gpu-check: runs gpuscale's agent and collector on this machine's NVIDIA GPU and checks
# them against NVML's own numbers (agreement, SM activity, attribution, reaction, overhead).
#
#   ./run.sh [--gpu N]           the check, on GPU N (NVML index, default 0); run it as root
#   ./run.sh --simulate [...]    the same checks on the fake NVML in sim/ (no GPU needed), with
#                                --sim-gpu h100|a100, --sim-lose-gpu-at CHECK, --sim-skew-power PCT
#
# Prints a table and writes the JSON report to $OUT/gpu-check.json (./gpu-check.json when OUT is
# unset). Exit status: 0 when every check passed, or when there is no NVIDIA GPU here ("skipped:
# no NVIDIA GPU (<why>)"); 1 when a check failed or could not run; 2 for bad usage. Needs bash,
# python3 with pynvml (pip install nvidia-ml-py) and PyTorch with CUDA. Stops every process it
# started and removes the cgroups it made, also when interrupted. See README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out_dir=${OUT:-$PWD}
report="$out_dir/gpu-check.json"
python=${PYTHON:-python3}
simulate=0
fake_lib="$here/sim/libfake_nvml.so"
sim_flags=""
pass=()

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --simulate) simulate=1 ;;
    --fake-nvml)
      [ $# -ge 2 ] || { echo "error: --fake-nvml needs a path" >&2; exit 2; }
      fake_lib=$2; simulate=1; shift ;;
    --gpu | --sim-gpu | --sim-lose-gpu-at | --sim-skew-power)
      [ $# -ge 2 ] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }
      case "$1" in --sim-*) sim_flags="$sim_flags $1" ;; esac
      pass+=("$1" "$2"); shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$sim_flags" ] && [ "$simulate" != 1 ]; then
  echo "error:$sim_flags only apply with --simulate" >&2
  exit 2
fi

# A JSON string literal.
json_str() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/ }
  printf '"%s"' "$s"
}

# The report when no check ran: status (skipped or error) and why.
status_report() {
  mkdir -p "$out_dir"
  printf '{\n  "schema": 1,\n  "status": %s,\n  "reason": %s,\n  "simulated": %s,\n  "started": %s,\n  "checks": {}\n}\n' \
    "$(json_str "$1")" "$(json_str "$2")" "$([ "$simulate" = 1 ] && echo true || echo false)" \
    "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" >"$report"
  echo "report: $report"
}

skip() {
  echo "skipped: no NVIDIA GPU ($1)"
  status_report skipped "no NVIDIA GPU ($1)"
  exit 0
}

broken() {
  echo "error: $1" >&2
  status_report error "$1"
  exit 1
}

# Where the driver's NVML may be: $GPUSCALE_NVML_LIB, the loader cache, then the folders drivers,
# the NVIDIA container toolkit, the gpu-operator and GKE put it in.
searched="ldconfig -p, /usr/local/nvidia/lib64, /usr/lib/x86_64-linux-gnu, /usr/lib64, /run/nvidia/driver/usr/lib/x86_64-linux-gnu, /home/kubernetes/bin/nvidia/lib64 and the like"
nvml_candidates() {
  if [ -n "${GPUSCALE_NVML_LIB:-}" ]; then echo "$GPUSCALE_NVML_LIB"; fi
  local ldc d
  for ldc in ldconfig /sbin/ldconfig /usr/sbin/ldconfig; do
    if command -v "$ldc" >/dev/null 2>&1; then
      "$ldc" -p 2>/dev/null | awk '$1 == "libnvidia-ml.so.1" { print $NF }' || true
      break
    fi
  done
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 \
    /usr/lib /usr/lib/aarch64-linux-gnu /run/nvidia/driver/usr/lib/x86_64-linux-gnu \
    /run/nvidia/driver/usr/lib64 /run/nvidia/driver/usr/lib/aarch64-linux-gnu \
    /home/kubernetes/bin/nvidia/lib64 /usr/lib/wsl/lib; do
    echo "$d/libnvidia-ml.so.1"
  done
}

have_python=1
command -v "$python" >/dev/null 2>&1 || have_python=0

nvml=""
if [ "$simulate" = 1 ]; then
  [ -f "$fake_lib" ] || { echo "error: --simulate needs the fake NVML at $fake_lib" >&2; exit 2; }
  [ "$have_python" = 1 ] || broken "$python is missing: the checks are Python (set PYTHON=...)"
  nvml=$fake_lib
else
  nodevice="" error="" seen=" "
  while IFS= read -r lib; do
    [ -e "$lib" ] || continue
    real=$(readlink -f "$lib")
    case "$seen" in *" $real "*) continue ;; esac
    seen="$seen$real "
    if [ "$have_python" = 0 ]; then
      broken "found $lib, but $python is missing: the checks are Python (set PYTHON=...)"
    fi
    out=$("$python" "$here/check.py" probe --nvml-lib "$lib" 2>&1) || true
    case "$out" in
      "ok "*) nvml=$lib; break ;;
      "nodevice "*) [ -n "$nodevice" ] || nodevice=${out#nodevice } ;;
      "error "*) [ -n "$error" ] || error=${out#error } ;;
      *) [ -n "$error" ] || error="probing $lib failed: $out" ;;
    esac
  done < <(nvml_candidates)
  if [ -z "$nvml" ]; then
    [ -z "$error" ] || broken "$error"
    [ -z "$nodevice" ] || skip "$nodevice"
    skip "libnvidia-ml.so.1 not found in $searched"
  fi
fi

# From here on everything made is unmade on exit: processes, cgroups, the scratch folder.
# Short, so a device prefix inside it fits the agent's 32 bytes; named after this shell's PID.
work=$(mktemp -d "/tmp/gsc.$$.XXXXXX")
cg_base=""
child=""
mounted_tracefs=0
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local rc=$? pid procs
  trap - EXIT INT TERM HUP
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$child" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$child" 2>/dev/null || true
  fi
  # Whatever check.py started and did not stop (it records every PID it starts).
  if [ -f "$work/pids" ]; then
    while read -r pid; do
      if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null |
        grep -qF -e "$here" -e "$work"; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done <"$work/pids"
  fi
  if [ -n "$cg_base" ] && [ -d "$cg_base" ]; then
    for _ in $(seq 25); do
      procs=$(find "$cg_base" -name cgroup.procs -exec cat {} + 2>/dev/null || true)
      [ -n "$procs" ] || break
      for pid in $procs; do kill -KILL "$pid" 2>/dev/null || true; done
      sleep 0.2
    done
    find "$cg_base" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ ! -d "$cg_base" ] || echo "warning: could not remove the cgroups under $cg_base" >&2
  fi
  if [ "$mounted_tracefs" = 1 ]; then umount /sys/kernel/tracing 2>/dev/null || true; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# The load runs in a pod-shaped cgroup (systemd driver, BestEffort, containerd) below a private
# parent, so a kubelet on this node never sees it; a second pod holds an idle GPU process.
hex64() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
pod_dir() {
  echo "$cg_base/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${1//-/_}.slice/cri-containerd-$2.scope"
}
# The agent's eBPF tracepoints need tracefs; mount it for the run where it is missing.
if [ "$(id -u)" = 0 ] && [ ! -d /sys/kernel/tracing/events/syscalls ] &&
  [ ! -d /sys/kernel/debug/tracing/events/syscalls ] && [ -d /sys/kernel/tracing ]; then
  if mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; then mounted_tracefs=1; fi
fi
cg_root=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
cg_args=()
if [ "$(id -u)" != 0 ]; then
  cg_args=(--no-cgroup "not root: making pod cgroups (and loading eBPF) needs root")
elif [ -z "$cg_root" ]; then
  cg_args=(--no-cgroup "no cgroup v2 mount in /proc/self/mounts")
else
  uid=$(cat /proc/sys/kernel/random/uuid)
  uid2=$(cat /proc/sys/kernel/random/uuid)
  cid=$(hex64)
  cid2=$(hex64)
  cg_base="$cg_root/gpuscale-check-$$"
  leaf=$(pod_dir "$uid" "$cid")
  leaf2=$(pod_dir "$uid2" "$cid2")
  if mkdir -p "$leaf" "$leaf2" 2>"$work/mkdir.err"; then
    cg_args=(--cgroup "$leaf" --cgroup2 "$leaf2" --pod-uid "$uid" --pod-uid2 "$uid2"
      --container-id "$cid")
  else
    cg_args=(--no-cgroup "cannot create cgroups under $cg_root: $(cat "$work/mkdir.err")")
  fi
fi

args=(run --nvml-lib "$nvml" --here "$here" --work "$work" --report "$report" "${cg_args[@]}")
if [ "$simulate" = 1 ]; then
  # The stand-in device files live in the scratch folder (the eBPF prefix holds 32 bytes).
  args+=(--simulate --device-prefix "$work/nvidia")
fi
if [ ${#pass[@]} -gt 0 ]; then args+=("${pass[@]}"); fi
mkdir -p "$out_dir" "$work/lib"
# pynvml loads "libnvidia-ml.so.1" by name: give it the one found (check.py also pins it).
ln -s "$nvml" "$work/lib/libnvidia-ml.so.1"
LD_LIBRARY_PATH="$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$python" "$here/check.py" "${args[@]}" &
child=$!
rc=0
wait "$child" || rc=$?
child=""
exit "$rc"
