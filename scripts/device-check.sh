#!/usr/bin/env bash
# The device check (docs/devices.md): on a machine with a CUDA GPU, in under 8 minutes,
#   1. the tests marked `device` (pytest -m device) with SAFFRON_DEVICE=cuda, so `auto` is the GPU;
#   2. `saffron compare --limit 2 --device cuda` on the embedded stack (none, best-of-n, saffron; no sweep);
#   3. `saffron bench cache --device cuda`;
#   4. `saffron bench parity --device cuda --json`: every method on the GPU and on the CPU in fp32, token for token;
#   5. `saffron bench throughput --k 1,16 --json`, where this installation has that benchmark;
# then prints ONE JSON line: {"gpu": ..., "device": ..., "ok": ..., "seconds": ..., "steps": {name: {ok, seconds,
# rc, figures...}}}. Each step has its own time limit; a step that fails does not stop the others.
#
# Without a GPU it says so ("gpu": false), runs only the device-marked tests (on the CPU, where they must pass
# too) and skips the rest, which measure an accelerator. --dry-run runs nothing: it prints the GPU plan (stderr)
# and the JSON with every step skipped. Exit status: 0 when every step that ran passed.
#
# Environment: PYTHON (default: python), DEVICE_CHECK_OUT (working folder, default: a fresh temporary one).
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "device-check: unknown argument '$1' (known: --dry-run, --help)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
WORK="${DEVICE_CHECK_OUT:-$(mktemp -d -t saffron-device-check.XXXXXX)}"
mkdir -p "$WORK"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"

if [ "$DRY" = 1 ]; then
  GPU=unknown
else
  GPU=$("$PY" -c "import torch; print('yes' if torch.cuda.is_available() else 'no')" 2>/dev/null || echo no)
fi
DEVICE_NAME=$([ "$GPU" = yes ] && "$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null)

# step NAME LIMIT_SECONDS CMD...: runs CMD under a time limit, keeping stdout, stderr, rc and seconds in $WORK
step() {
  local name=$1 limit=$2; shift 2
  echo "device-check: $name: $*" >&2
  if [ "$DRY" = 1 ]; then echo "dry run" > "$WORK/$name.skip"; return 0; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
  echo $? > "$WORK/$name.rc"
  echo $((SECONDS - t0)) > "$WORK/$name.seconds"
}
skip() { echo "$2" > "$WORK/$1.skip"; echo "device-check: $1: skipped ($2)" >&2; }

SAFFRON=("$PY" -m saffron.cli)
if [ "$GPU" = yes ] || [ "$DRY" = 1 ]; then
  SAFFRON_DEVICE=cuda step tests 60 "$PY" -m pytest -q -m device -p no:cacheprovider tests
  step compare 120 "${SAFFRON[@]}" compare --limit 2 --device cuda --no-sweep --methods none,best-of-n,saffron \
    --method-budgets best-of-n=32 --method-budgets saffron=44 --out "$WORK/compare" --json
  step cache 60 "${SAFFRON[@]}" bench cache --device cuda --repeats 2 --json
  step parity 90 "${SAFFRON[@]}" bench parity --device cuda --json
  if [ "$DRY" = 1 ] || "${SAFFRON[@]}" bench throughput --help > /dev/null 2>&1; then
    step throughput 150 "${SAFFRON[@]}" bench throughput --device cuda --k 1,16 --json
  else
    skip throughput "this installation has no 'saffron bench throughput'"
  fi
else
  # the CPU-meaningful part: the same tests, which must pass on the CPU as well
  step tests 300 "$PY" -m pytest -q -m device -p no:cacheprovider tests
  for s in compare cache parity throughput; do skip "$s" "no GPU: it measures an accelerator"; done
fi

"$PY" - "$WORK" "$GPU" "${DEVICE_NAME:-}" <<'EOF'
import json, re, sys
from pathlib import Path

work, gpu, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def last_json(text: str) -> dict:
    """The JSON object a command printed (its whole stdout, or its last line)."""
    for candidate in (text, *reversed(text.strip().splitlines())):
        try:
            obj = json.loads(candidate)
            if isinstance(obj, dict):
                return obj
        except ValueError:
            continue
    return {}


def figures(name: str, out: str) -> dict:
    if name == "tests":
        counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out))
        return {"counts": counts}
    data = last_json(out)
    if name == "compare":
        methods = data.get("methods", {})
        return {"target_tflops": data.get("target_tflops"),
                "methods": {m: {k: d.get(k) for k in ("asr", "tflops_per_prompt", "budget", "n")}
                            for m, d in methods.items()}}
    if name == "parity":
        return {"ran": data.get("ran"), "cases": data.get("cases"), "equal_share": data.get("equal_share"),
                "rows": {r["case"]: {"equal": r.get("equal"), "first_difference": r.get("first_difference"),
                                     **{w: r[w].get("error", "ok") for w in ("device", "device_auto")}}
                         for r in data.get("rows", [])}}
    if name == "cache":
        keep = ("runner_seconds", "nocache_seconds", "speedup_vs_nocache", "speedup_vs_copies", "kv_bytes",
                "overhead_fraction", "runner_tflops")
        return {k: data.get(k) for k in keep}
    return data


steps, total, ok = {}, 0, True
for s in ("tests", "compare", "cache", "parity", "throughput"):
    skipped = read(work / f"{s}.skip").strip()
    if skipped:
        steps[s] = {"ok": None, "skipped": skipped}
        continue
    rc = int(read(work / f"{s}.rc") or 1)
    secs = int(read(work / f"{s}.seconds") or 0)
    total += secs
    err = read(work / f"{s}.err").strip().splitlines()
    entry = {"ok": rc == 0, "rc": rc, "seconds": secs, **figures(s, read(work / f"{s}.out"))}
    if rc in (124, 137):
        entry["timed_out"] = True
    if rc != 0 and err:
        entry["error"] = err[-1][:300]
    ok = ok and rc == 0
    steps[s] = entry
print(json.dumps({"gpu": {"yes": True, "no": False}.get(gpu), "device": name or None, "ok": ok, "seconds": total,
                  "work": str(work), "steps": steps}, sort_keys=False))
sys.exit(0 if ok else 1)
EOF
