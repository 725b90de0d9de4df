#!/usr/bin/env bash
# The GPU checks, in under 9 minutes on one CUDA device, each step bounded by `timeout`:
#   1. the CUDA tests: every test parametrized over the "cuda" device or marked `cuda`
#      (pytest -k cuda: -k matches parameter ids and marker names alike);
#   2. the device's matmul peak: a large torch.matmul in float32 (TF32 off), TF32 and bfloat16,
#      and one at W4's shape;
#   3. the bench, W1-W4 on a cuda session (python -m bench --quick --device cuda), with W4's
#      GEMM rate against the peak;
#   4. W5 (python -m bench.many --device cuda): 1, 8 and 64 clients of one query each against a
#      shared corpus of 200,000 and 1,000,000 x 384, against in-process scoring of C per call;
#   5. W4 by batch size (python -m bench.w4 --device cuda): 1, 16 and 256 queries per batch
#      against 1,000,000 x 384, the service against in-process torch (and faiss-cpu if installed).
# Writes a short Markdown report to $1 (default gpu-report.md) and to stdout.
#
#   bench/gpu.sh [REPORT.md]
#
# Exit status: 0 all steps passed, 1 a step failed or timed out (the report says which),
# 2 no CUDA device (or no torch). No network: nothing is downloaded. It uses the cosserve this
# checkout provides: already installed from here, else `pip install --no-deps --no-index
# --no-build-isolation -e .`, else a PYTHONPATH shim that maps the packages as pyproject.toml's
# package-dir does (cosserve = client/, cosserve.server = server/).
# COSSERVE_GPU_SH_DRY_RUN=1 checks the script itself on a machine without a GPU: every step on
# the CPU at tiny sizes; its numbers mean nothing.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
report=$(realpath -m "${1:-gpu-report.md}")
python=${PYTHON:-python}
dry_run=${COSSERVE_GPU_SH_DRY_RUN:-0}
cd "$repo" || exit 2
deadline=$((SECONDS + 510))  # the steps end by then; the checks before them and the report fit in 9 minutes
work=$(mktemp -d "${TMPDIR:-/tmp}/cosserve-gpu.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [[ $dry_run == 1 ]]; then
    device=cpu matmul_n=512 bench_size=--tiny
    w5_size=(--corpus-rows 2000 --clients 1 2 --seconds 0.5)
    w4_size=(--corpus-rows 2000 --batches 1 4 --seconds 0.5 --repeat 1)
else
    device=cuda matmul_n=8192 bench_size=--quick
    w5_size=(--corpus-rows 200000 1000000 --clients 1 8 64 --seconds 3)
    w4_size=(--corpus-rows 1000000 --batches 1 16 256 --seconds 3 --repeat 1)
fi
faiss=--skip-faiss
timeout 30 "$python" -c 'import faiss' 2>/dev/null && faiss=''  # faiss-cpu, if this machine has it

# ---- 0. a CUDA device, and this checkout's cosserve -------------------------------------------
if ! timeout 30 "$python" -c 'import torch' 2>/dev/null; then
    echo "gpu.sh: $python cannot import torch; this script needs torch (with CUDA) installed" >&2
    exit 2
fi
if [[ $device == cuda ]] && ! timeout 30 "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device: torch.cuda.is_available() is False (torch $(
        "$python" -c 'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)' 2>/dev/null))" >&2
    command -v nvidia-smi >/dev/null && nvidia-smi -L >&2
    exit 2
fi

from_here() {  # is `cosserve` (client and server) imported from this checkout?
    timeout 30 "$python" - "$repo" <<'EOF' 2>/dev/null
import os, sys
import cosserve, cosserve.server
want = os.path.realpath(sys.argv[1])
sys.exit(0 if all(os.path.realpath(m.__file__).startswith(want + os.sep) for m in (cosserve, cosserve.server)) else 1)
EOF
}
install=installed
if ! from_here; then
    install="pip install -e . (no network)"
    if ! timeout 60 "$python" -m pip install -q --no-deps --no-index --no-build-isolation -e . >"$work/pip.log" 2>&1 \
        || ! from_here; then
        # The package-dir mapping by hand: $work/shim/cosserve holds links to client/'s entries
        # and server -> server/; the repository root gives `bench`.
        install="PYTHONPATH shim (pip install -e . failed: $(grep -m1 -i error "$work/pip.log" || tail -1 "$work/pip.log"))"
        mkdir -p "$work/shim/cosserve"
        ln -s "$repo"/client/* "$work/shim/cosserve/"
        ln -s "$repo/server" "$work/shim/cosserve/server"
        export PYTHONPATH="$work/shim:$repo${PYTHONPATH:+:$PYTHONPATH}"
        if ! from_here; then
            echo "gpu.sh: cannot import cosserve from $repo (see $work/pip.log)" >&2
            exit 2
        fi
    fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # `bench` for python -m bench

# ---- the steps ----------------------------------------------------------------------------------
# step NAME SECONDS CMD...: runs CMD under timeout (never past the deadline), output to
# $work/NAME.log; records its exit status and time.
declare -A rc seconds
steps=()
step() {
    local name=$1 limit=$2 started=$SECONDS left=$((deadline - SECONDS - 5))
    shift 2
    steps+=("$name")
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "gpu.sh: $name: no time left" >"$work/$name.log"
        rc[$name]=124 seconds[$name]=0
        return
    fi
    echo "gpu.sh: $name (at most ${limit} s) ..." >&2
    timeout --kill-after=5 "$limit" "$@" >"$work/$name.log" 2>&1
    rc[$name]=$?
    seconds[$name]=$((SECONDS - started))
    echo "gpu.sh: $name: exit ${rc[$name]} after ${seconds[$name]} s" >&2
}

# 140 + 40 + 150 + 90 + 90 s at most, and never past the deadline.
step tests 140 "$python" -m pytest -q -k cuda -p no:cacheprovider -rfEs tests
step peak 40 "$python" - "$device" "$matmul_n" "$work/peak.json" <<'EOF'
"""Matmul peak of the device: n x n x n in float32 (TF32 off), TF32, bfloat16; and W4's shape."""
import json, sys, time
import torch

device, n, out = torch.device(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cuda = device.type == "cuda"


def rate(m: int, k: int, n: int, dtype: torch.dtype, tf32: bool, seconds: float = 1.0) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    sync()
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        for _ in range(5):
            torch.matmul(a, b, out=c)
        calls += 5
        sync()
    return 2 * m * k * n * calls / (time.perf_counter() - started) / 1e12


peaks = [
    {"name": "float32 (TF32 off)", "shape": f"{n}x{n}x{n}", "tflops": rate(n, n, n, torch.float32, False)},
    {"name": "TF32", "shape": f"{n}x{n}x{n}", "tflops": rate(n, n, n, torch.float32, True)},
    {"name": "bfloat16", "shape": f"{n}x{n}x{n}", "tflops": rate(n, n, n, torch.bfloat16, False)},
    # W4's GEMM: a batch of 256 queries of 384 against 100,000 corpus rows.
    {"name": "float32 at W4's shape", "shape": "256x384x100000", "tflops": rate(256, 384, 100_000, torch.float32, False)},
]
torch.backends.cuda.matmul.allow_tf32 = False
name = torch.cuda.get_device_name(device) if cuda else "cpu"
json.dump({"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "peaks": peaks}, open(out, "w"))
for p in peaks:
    print(f"{p['name']:>24} {p['shape']:>16}: {p['tflops']:8.2f} TFLOP/s")
EOF
step bench 150 "$python" -m bench "$bench_size" --device "$device" --json "$work/bench.json"
step w5 90 "$python" -m bench.many "${w5_size[@]}" --device "$device" --json "$work/w5.json"
step w4 90 "$python" -m bench.w4 "${w4_size[@]}" $faiss --device "$device" --json "$work/w4.json"

# ---- the report ---------------------------------------------------------------------------------
status=0
for name in "${steps[@]}"; do
    [[ ${rc[$name]} == 0 ]] || status=1
done
{
    for name in "${steps[@]}"; do echo "$name ${rc[$name]} ${seconds[$name]}"; done
} >"$work/steps.txt"
timeout 20 "$python" - "$work" "$install" "$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)" \
    "$dry_run" "$device" "$bench_size" >"$report" <<'EOF'
"""The Markdown report from the steps' logs and JSON."""
import json, os, sys

work, install, commit, dry_run, device, bench_size = sys.argv[1:7]
steps = [line.split() for line in open(os.path.join(work, "steps.txt"))]


def read(name: str) -> str:
    try:
        return open(os.path.join(work, name)).read()
    except OSError:
        return ""


def load(name: str) -> dict | None:
    try:
        return json.loads(read(name))
    except ValueError:
        return None


def verdict(rc: str) -> str:
    return "ok" if rc == "0" else "**timed out**" if rc in ("124", "137") else f"**failed** (exit {rc})"


peak, bench = load("peak.json"), load("bench.json")
print("# cosserve on a GPU" + (" (dry run on the CPU: the numbers mean nothing)" if dry_run == "1" else ""))
print()
gpu = peak["device"] if peak else "?"
print(f"- device: {gpu}; torch {peak['torch'] if peak else '?'}, CUDA {peak['cuda'] if peak else '?'}")
print(f"- checkout: {commit}; cosserve: {install}")
print("- steps: " + "; ".join(f"{name} {verdict(rc)} in {s} s" for name, rc, s in steps))
print()

print("## CUDA tests (`pytest -k cuda`)")
print()
lines = read("tests.log").rstrip().splitlines()
summary = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
print("```")
print("\n".join(summary[:30] + lines[-1:]) if lines else "(no output)")
print("```")
print()

print("## Matmul peak")
print()
if peak:
    print("| matmul | m x k x n | TFLOP/s |\n|---|---|---:|")
    for p in peak["peaks"]:
        print(f"| {p['name']} | {p['shape']} | {p['tflops']:.3g} |")
else:
    print("```\n" + read("peak.log")[-3000:] + "\n```")
print()

print(f"## Bench (`python -m bench {bench_size} --device {device}`)")
print()
log = read("bench.log")
table = log[log.find("| workload"):] if "| workload" in log else log[-3000:]
print("```\n" + table.rstrip() + "\n```")
print()
for name, title in (("w5", "W5: many clients, one query each (`python -m bench.many`)"),
                    ("w4", "W4 by batch size (`python -m bench.w4`)")):
    print(f"## {title}")
    print()
    log = read(f"{name}.log")
    table = log[log.find("\n|") + 1:] if "\n|" in log else log[-3000:]
    print("```\n" + table.rstrip() + "\n```")
    print()
if bench and peak:
    fp32 = next(p["tflops"] for p in peak["peaks"] if p["name"].startswith("float32 (TF32"))
    tf32 = next(p["tflops"] for p in peak["peaks"] if p["name"] == "TF32")
    shaped = next(p["tflops"] for p in peak["peaks"] if "W4" in p["name"])
    print("## W4 against the peak")
    print()
    print("The scoring core multiplies in float32 with TF32 off (torch's default), so the float32 peak is its bound.")
    print()
    print("| W4 | TFLOP/s | of float32 peak | of TF32 peak | of float32 at W4's shape |\n|---|---:|---:|---:|---:|")
    for row in (r for r in bench["rows"] if r["unit"] == "TFLOP/s"):
        for who in ("cosserve", "torch"):
            value = row[who]
            print(f"| {row['metric']}, {who} | {value:.3g} | {value / fp32:.1%} | {value / tf32:.1%} | {value / shaped:.1%} |")
EOF
[[ $? == 0 ]] || { echo "gpu.sh: the report could not be written" >&2; status=1; }
cat "$report"
exit $status
