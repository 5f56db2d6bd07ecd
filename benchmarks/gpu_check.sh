#!/usr/bin/env bash
# One-shot check of softcal's CUDA kernels on a lent GPU machine (H200): build, tests,
# compute-sanitizer, copy bandwidth, kernel timings, and the benchmark.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Run from the repository root. Every step logs to its own file and the script goes on after a
# failure (the return codes are in the summary). OUT_DIR receives at most 8 files:
#   summary.txt       the table printed last (also on stdout)
#   logs.tar.gz       every step's log
#   kernels.csv       softcal op timings (CUDA events, median) and GB/s against the bytes bound
#   cuda_bench.{csv,md,png}   benchmarks/bench_loss.py --device cuda --no-compile
#   cuda_compile.{csv,md}     the same for softcal vs torch.compile, when time remains
# Liger-Kernel (a baseline of the benchmark) is not on the GPU machine: download its wheel first,
# here, into the ignored folder .whl/ and name it in the device call's `carry`:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel
# Environment knobs:
#   BENCH_ARGS   extra arguments of bench_loss.py (default: --budget 0.15)
#   TEST_TIMEOUT seconds for the pytest step (default 150)
#   TOTAL_S      the whole script ends this many seconds after its start (default 530)
#   DEADLINE_S   the benchmark steps stop this many seconds after the start (default TOTAL_S - 20)
#   SKIP_BENCH=1 skip bench_loss.py;  SKIP_COMPILE=1 skip its torch.compile pass
#   SAN_TIMEOUT, KERNELS_TIMEOUT  caps of the sanitizer and kernel-timing steps (default 150)
#   LM_HEAD=1    also the LM head (section 3b, after the tests): its CUDA test and
#                benchmarks/bench_lm_head.py at (8192, 4096) x 128256 and (4096, 2048) x 256000
#                bfloat16 -> OUT_DIR/lm_head_cuda.csv (the markdown in logs.tar.gz); LM_HEAD_TIMEOUT
#                caps it (default 300). To give it the time, combine with SKIP_BENCH=1 SKIP_RACECHECK=1.
#   COPY_SO=1    copy the built softcal/_C*.so into OUT_DIR;  SKIP_BUILD=1 use the extension already built;
#   PTXAS=1      also recompile the kernels with -Xptxas -v there (CI's `make cuda-check` already
#                fails on any register spill, from the same sources);  SKIP_RACECHECK=1 skip racecheck
# The whole script, build included, ends within TOTAL_S seconds (default 530, for a device call of
# 9-10 minutes): every step's timeout is cut to the time left, and summary.txt and logs.tar.gz are
# rewritten after every step, so that what ran comes back even if the call itself is stopped.
# A second call can skip the build: run the first with COPY_SO=1 (the built extension comes back
# as so.tgz, split in parts of 15 MB: so.tgz.part-aa, ...); copy the parts into an ignored folder
# of the repo (echo /.so-cache/ >> .git/info/exclude), name it in the call's `carry`, and begin
# the command with:  cat .so-cache/so.tgz.part-* | tar xz && SKIP_BUILD=1 bash benchmarks/gpu_check.sh "$OUT"
# Files: summary.txt, logs.tar.gz, kernels.csv, cuda_bench.{csv,md,png}, cuda_compile.csv (the
# compile table's markdown goes into logs.tar.gz), with LM_HEAD=1 lm_head_cuda.csv, and with
# COPY_SO=1 the so.tgz parts (8 at most).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d /tmp/softcal_gpu_check.XXXXXX)
PY=${PYTHON:-python3}
T_START=$(date +%s)
TOTAL=${TOTAL_S:-530}
declare -a NAMES RCS SECS NOTES
time_left() { echo $((T_START + TOTAL - $(date +%s))); }

step() {  # step NAME TIMEOUT_S CMD...   (logs to $LOGS/NAME.log; the timeout is cut to the time left)
  local name=$1 limit=$2
  shift 2
  local t0 rc left
  left=$(($(time_left) - 15))
  if [ "$left" -lt 5 ]; then
    echo "=== [$name] skipped: no time left"
    NAMES+=("$name"); RCS+=("skip"); SECS+=(0); NOTES+=("no time left (TOTAL_S=$TOTAL)")
    write_summary
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  echo "=== [$name] $* (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  NAMES+=("$name")
  RCS+=("$rc")
  SECS+=("$(($(date +%s) - t0))")
  NOTES+=("")
  tail -n 3 "$LOGS/$name.log" | sed "s/^/    [$name] /"
  write_summary
  return $rc
}
note() { NOTES[$((${#NOTES[@]} - 1))]="$1"; write_summary; }

write_summary() {  # summary.txt and logs.tar.gz as they stand (called after every step)
  for f in "$OUT"/cuda_compile.md; do [ -f "$f" ] && cp "$f" "$LOGS/" && rm -f "$f"; done
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  {
    echo
    echo "softcal gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), $(($(date +%s) - T_START)) s so far, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    grep -A14 -E '^op +dtype' "$LOGS/kernels.log" 2>/dev/null | head -1
    grep -E '^cross_entropy_(fwd|bwd|fused) +bfloat16 +(1000000 +10|4096 +128256|4096 +32000) ' "$LOGS/kernels.log" 2>/dev/null
    grep -m1 -E '^copy bandwidth' "$LOGS/kernels.log" 2>/dev/null
    grep -E '^== |^ +(eager|torch|torch-chunked|compile|softcal|softcal@[0-9]+|liger) +(min|failed)' "$LOGS/lm_head_bench.log" 2>/dev/null
    grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" 2>/dev/null | head -8
    printf '%-14s %5s %6s  %s\n' step rc sec note
    for i in "${!NAMES[@]}"; do
      printf '%-14s %5s %6s  %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
    done
  } >"$OUT/summary.txt"
}

# ------------------------------------------------------------------ 1. machine and versions
step env 60 bash -c "nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv; \
  nvcc --version; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), \"SMs\", torch.cuda.get_device_properties(0).multi_processor_count)'; \
  $PY -c 'import triton; print(\"triton\", triton.__version__)'; compute-sanitizer --version | tail -1; ncu --version | tail -1; nproc; free -g"
note "$(grep -m1 -o 'NVIDIA H[0-9A-Za-z ]*' "$LOGS/env.log" || true)"

# ------------------------------------------------------------------ 2. build
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  if ! step build 420 $PY -m pip install --no-build-isolation --no-deps -v -e .; then
    step build_inplace 420 $PY setup.py build_ext --inplace
  fi
fi
step import 60 $PY -c "import softcal, torch; d = softcal._ops.kernel_devices(); print('kernel devices', d); assert 'cuda' in d, d"
note "$(grep -m1 'kernel devices' "$LOGS/import.log" || true)"
# Register / spill report and 16-byte loads in SASS: recompiles the kernel files with
# -Xptxas -v on the CPU, in the background while the GPU runs the tests.
PTXAS_PID=
[ "${PTXAS:-0}" = "1" ] && (
  TI=$($PY -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths(device_type="cuda")))' 2>/dev/null \
       || $PY -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths(cuda=True)))')
  PYI=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  STD=$($PY -c 'import torch; print("c++20" if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 14) else "c++17")')
  for f in cross_entropy_fwd cross_entropy_bwd cross_entropy_fused soft_target shard softmax temperature_stats; do
    # shellcheck disable=SC2086
    nvcc -c "csrc/cuda/$f.cu" -o "/tmp/softcal_ptxas_$f.o" -Icsrc $TI -I"$PYI" -std=$STD -O3 --use_fast_math \
      -lineinfo --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=_C \
      -gencode=arch=compute_90,code=sm_90 -Xptxas -v >"/tmp/softcal_ptxas_$f.txt" 2>&1 &
  done
  wait
  for f in cross_entropy_fwd cross_entropy_bwd cross_entropy_fused soft_target shard softmax temperature_stats; do
    echo "=== $f"
    grep -E 'error|Function properties|Used|spill' "/tmp/softcal_ptxas_$f.txt"
    echo "$f: LDG.E.128 in SASS: $(cuobjdump --dump-sass "/tmp/softcal_ptxas_$f.o" | grep -c 'LDG.E.128'), LDL/STL: $(cuobjdump --dump-sass "/tmp/softcal_ptxas_$f.o" | grep -cE '(LDL|STL)')"
  done
) >"$LOGS/ptxas.log" 2>&1 &
PTXAS_PID=$!

# ------------------------------------------------------------------ 3. tests
export SOFTCAL_EXPECT_CUDA=1
step tests ${TEST_TIMEOUT:-150} $PY -m pytest -q -rfE --maxfail=25 -p no:cacheprovider tests/test_cuda.py tests/test_core.py -k "cuda or test_cuda"
note "$(grep -E '[0-9]+ (passed|failed)' "$LOGS/tests.log" | tail -1)"

# ------------------------------------------------------------------ 3b. the LM head (LM_HEAD=1)
# softcal.linear_cross_entropy on the GPU: its CUDA test (errors against float64 within 1.25 x
# eager's), then the benchmark at the issue's GPU shapes against eager F.linear + F.cross_entropy,
# torch's linear_cross_entropy with and without options, torch.compile and Liger's fused linear
# cross-entropy (when its wheel is in .whl/), with time, peak memory beyond the gradients (x the
# logits) and the fraction of the GEMM bound (6 N H V flops at the bf16 GEMM rate measured there).
if [ "${LM_HEAD:-0}" = "1" ]; then
  if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$LOGS/liger_install.log" 2>&1 \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  step lm_head_test 120 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_lm_head_ops.py -k cuda
  note "$(grep -E '[0-9]+ (passed|failed|skipped)' "$LOGS/lm_head_test.log" | tail -1)"
  # softcal@1024: a 1 GiB workspace (2-4 chunks at these shapes), since each chunk reads and
  # writes the float32 dW accumulator (V x H x 8 bytes) once
  step lm_head_bench ${LM_HEAD_TIMEOUT:-300} $PY benchmarks/bench_lm_head.py --device cuda \
    --impls eager,torch,torch-chunked,compile,softcal,softcal@1024,liger \
    --out "$LOGS/lm_head" --note "gpu_check.sh"
  [ -f "$LOGS/lm_head/lm_head_cuda.csv" ] && cp "$LOGS/lm_head/lm_head_cuda.csv" "$OUT/"
  note "$(grep -cE '^cuda,' "$LOGS/lm_head/lm_head_cuda.csv" 2>/dev/null || echo 0) rows"
fi

# ------------------------------------------------------------------ 4. compute-sanitizer
cat >"$LOGS/sanitize_ops.py" <<'PYEOF'
# Every op once on small shapes covering each launch path (tile, rows-per-block, block-per-row,
# resident and two-read fused, strided softmax), under compute-sanitizer.
import torch, softcal
ops = torch.ops.softcal
torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float32, torch.bfloat16):
    for n, c in ((37, 10), (9, 130), (3, 3000), (2, 40000)):
        x = torch.randn(n, c, device=dev, dtype=dtype)
        t = torch.randint(0, c, (n,), device=dev)
        t[::3] = -100
        w = (torch.rand(c, device=dev) + 0.5).to(dtype)
        T = torch.tensor(1.3, device=dev)
        for red in (0, 1, 2):
            loss, lse, den = ops.cross_entropy_fwd(x, t, w, T, 1.0, 0.1, -100, red)
            gl = torch.ones(n, device=dev, dtype=dtype) if red == 0 else torch.tensor(1.0, device=dev, dtype=dtype)
            ops.cross_entropy_bwd(gl, x, t, w, lse, den, T, 1.0, 0.1, -100, red, True, True)
            ops.cross_entropy_fused(x, t, w, T, 1.0, 0.1, -100, red, True)
            xi = x.clone()
            ops.cross_entropy_fused_(xi, t, None, None, 1.5, 0.0, -100, red, False)
        xs = torch.randn(n, c + 3, device=dev, dtype=dtype)[:, 1:c + 1]  # misaligned rows
        ops.cross_entropy_fwd(xs, t, None, None, 1.0, 0.0, -100, 1)
        ops.scale_rows_(xi, torch.tensor(2.0, device=dev))
        ops.scale_rows_(xi, torch.rand(n, device=dev))
        p = ops.softmax_fwd(x, T, 1.0, -1, False)
        ops.softmax_bwd(torch.randn_like(p), p, T, 1.0, -1, False, True)
        ops.temperature_stats(x, t.clamp(min=0), 0.7)
        half = c // 2
        st = ops.shard_stats(x[:, half:], t, w[half:], T, 1.0, half, -100, True)
        acc = torch.float32
        lse2 = torch.stack([st[:, 0], st[:, 1]], 1).contiguous()
        coef = torch.rand(n, 3, device=dev, dtype=acc)
        ops.shard_grad(x[:, half:], t, w[half:], lse2, coef, T, 1.0, 0.01, half, -100, True, True)
        ops.shard_grad_(x[:, half:].contiguous(), t, None, lse2, coef, None, 1.3, 0.0, half, -100, False)
    y = torch.randn(4, 33, 7, device=dev, dtype=dtype)
    for log in (False, True):
        q = ops.softmax_fwd(y, None, 2.0, 1, log)
        ops.softmax_bwd(torch.randn_like(q), q, None, 2.0, 1, log, False)
torch.cuda.synchronize()
print("sanitize_ops: done")
PYEOF
step memcheck ${SAN_TIMEOUT:-150} compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 $PY "$LOGS/sanitize_ops.py"
note "$(grep -m1 -E 'ERROR SUMMARY' "$LOGS/memcheck.log" || true)"
[ "${SKIP_RACECHECK:-0}" = "1" ] || step racecheck ${SAN_TIMEOUT:-150} compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 --print-limit 20 $PY "$LOGS/sanitize_ops.py"
note "$(grep -m1 -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$LOGS/racecheck.log" || true)"

# ------------------------------------------------------------------ 5. bandwidth + kernel timings
cat >"$LOGS/kernels.py" <<'PYEOF'
# Copy bandwidth (bytes read + written / time, CUDA events, median) and the time of each
# softcal op at the shapes that pick each launch path, against the bytes it must move.
import csv, statistics, sys, torch
import softcal  # noqa: F401  (loads the extension: registers torch.ops.softcal.*)
out_csv = sys.argv[1]
dev = "cuda"
ops = torch.ops.softcal


def bench(fn, reps=30, warm=5, flush=True):
    cache = torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # 256 MiB > L2
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        if flush:
            cache.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(ts), min(ts)


n = 1 << 30  # 1 GiB per buffer
src = torch.empty(n, dtype=torch.uint8, device=dev).random_()
dst = torch.empty_like(src)
med, mn = bench(lambda: dst.copy_(src), reps=20, flush=False)
bw = 2 * n / med / 1e9
print(f"copy bandwidth: {bw:.0f} GB/s median ({2 * n / mn / 1e9:.0f} best), 1 GiB -> 1 GiB")
del src, dst
rows = [dict(op="copy", dtype="uint8", N=n, C=1, path="", median_ms=med * 1e3, bytes=2 * n,
             GBps=bw, pct=100.0)]

def path_of(c, dtype):
    # the streaming launch shape of csrc/cuda/launch.cuh (kPolicy's kStream), for N large enough
    # to fill the device; "(fused: resident|2read)" says which fused path the row takes
    v = 16 // torch.empty(0, dtype=dtype).element_size()
    if c * (16 // v) <= 128:
        return "tile"
    nv = -(-c // v)
    def pick(per):
        t = 1
        while t < -(-nv // per):
            t *= 2
        t = max(t, 4)
        return 128 if t == 64 else min(t, 512)
    resident = nv <= pick(4) * 4
    return f"tpr{min(pick(16), 256)}" + ("/res" if resident else "/2read")

cases = [(1_000_000, 10), (1_000_000, 64), (262_144, 128), (65_536, 1000), (16_384, 4096),
         (8192, 16384), (4096, 32000), (4096, 32768), (4096, 33000), (8192, 50257), (4096, 128256)]
for dtype in (torch.bfloat16, torch.float32):
    b = torch.empty(0, dtype=dtype).element_size()
    for N, C in cases:
        if N * C * b > 4 << 30:
            continue
        x = torch.randn(N, C, device=dev, dtype=dtype)
        t = torch.randint(0, C, (N,), device=dev)
        T = torch.tensor(1.5, device=dev)
        nb = N * C * b
        side = N * 8 + N * 4  # target read + lse written
        loss, lse, den = ops.cross_entropy_fwd(x, t, None, T, 1.0, 0.1, -100, 1)
        one = torch.tensor(1.0, device=dev, dtype=dtype)
        xi = x.clone()
        todo = [
            ("cross_entropy_fwd", lambda: ops.cross_entropy_fwd(x, t, None, T, 1.0, 0.1, -100, 1), nb + side),
            ("cross_entropy_bwd", lambda: ops.cross_entropy_bwd(one, x, t, None, lse, den, T, 1.0, 0.1, -100, 1, True, False), 2 * nb + side),
            ("cross_entropy_fused", lambda: ops.cross_entropy_fused(x, t, None, T, 1.0, 0.1, -100, 1, False), 2 * nb + 2 * N * 8),
            ("cross_entropy_fused_", lambda: ops.cross_entropy_fused_(xi, t, None, T, 1.0, 0.1, -100, 1, False), 2 * nb + 2 * N * 8),
            ("softmax_fwd", lambda: ops.softmax_fwd(x, T, 1.0, -1, False), 2 * nb),
            ("temperature_stats", lambda: ops.temperature_stats(x, t, 0.7), nb + N * 8),
        ]
        for name, fn, nbytes in todo:
            try:
                med, mn = bench(fn, reps=15 if nb > (1 << 29) else 30)
            except Exception as e:  # keep going
                print(f"{name} {dtype} {N}x{C}: {type(e).__name__}: {e}")
                continue
            g = nbytes / med / 1e9
            rows.append(dict(op=name, dtype=str(dtype).replace("torch.", ""), N=N, C=C,
                             path=path_of(C, dtype), median_ms=med * 1e3, bytes=nbytes, GBps=g,
                             pct=100 * g / bw))
        del x, xi, t, lse
        torch.cuda.empty_cache()
with open(out_csv, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
print(f"{'op':<18}{'dtype':<9}{'N':>9}{'C':>8} {'path':<12}{'ms':>9}{'GB/s':>8}{'%copy':>7}")
for r in rows:
    print(f"{r['op']:<18}{r['dtype']:<9}{r['N']:>9}{r['C']:>8} {r['path']:<12}{r['median_ms']:>9.4f}"
          f"{r['GBps']:>8.0f}{r['pct']:>7.1f}")
print(f"BANDWIDTH_GBPS={bw:.0f}")
PYEOF
step kernels ${KERNELS_TIMEOUT:-150} $PY "$LOGS/kernels.py" "$OUT/kernels.csv"
BW=$(grep -m1 -o 'BANDWIDTH_GBPS=[0-9]*' "$LOGS/kernels.log" | cut -d= -f2)
note "copy ${BW:-?} GB/s"

# ------------------------------------------------------------------ 6. benchmark
# First without torch.compile (always fits), then the compile baseline if time remains
# (one compilation per shape, dtype and pass). Hard stop at DEADLINE_S after the start.
DEADLINE=$((T_START + ${DEADLINE_S:-$((TOTAL - 20))}))
left() { local l=$((DEADLINE - $(date +%s))); [ $l -lt 30 ] && l=30; echo $l; }
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$LOGS/liger_install.log" 2>&1 \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # shellcheck disable=SC2086
  step bench "$(left)" $PY benchmarks/bench_loss.py --device cuda --out "$OUT" ${BW:+--bandwidth $BW} \
    --no-compile ${BENCH_ARGS:---budget 0.15}
  note "$(grep -c . "$OUT/cuda_bench.csv" 2>/dev/null || echo 0) csv lines"
  if [ "${SKIP_COMPILE:-0}" != "1" ] && [ $((DEADLINE - $(date +%s))) -gt 90 ]; then
    # shellcheck disable=SC2086
    step bench_compile "$(left)" $PY benchmarks/bench_loss.py --device cuda --out "$OUT" ${BW:+--bandwidth $BW} \
      --impls softcal,softcal-fused,compile --tag compile --no-plot ${BENCH_ARGS:---budget 0.15}
    note "$(grep -c . "$OUT/cuda_compile.csv" 2>/dev/null || echo 0) csv lines"
  fi
fi
if [ "${PTXAS:-0}" = "1" ]; then
wait "$PTXAS_PID" 2>/dev/null
NAMES+=(ptxas); RCS+=("$(grep -q 'LDG.E.128' "$LOGS/ptxas.log" && echo 0 || echo 1)"); SECS+=("-")
NOTES+=("$(grep -c 'spill' "$LOGS/ptxas.log") kernels, $(grep -cE '[1-9][0-9]* bytes spill stores' "$LOGS/ptxas.log") spilling; $(grep 'LDG.E.128' "$LOGS/ptxas.log" | grep -o 'LDG.E.128 in SASS: [0-9]*' | cut -d' ' -f4 | paste -sd+ | sed 's/^/LDG.E.128: /')")
fi

# The built extension, so that a later run can skip the build (COPY_SO=1; parts of 15 MB).
if [ "${COPY_SO:-0}" = "1" ]; then tar -czf - softcal/_C*.so | split -b 15M - "$OUT/so.tgz.part-"; fi

# ------------------------------------------------------------------ summary (printed last)
write_summary
cat "$OUT/summary.txt"
