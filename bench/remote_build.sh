#!/bin/bash
# Wall time of `hwprune latency-model build` of the digits example on cpu-ort-fp32: once locally,
# once through a hub and an agent on 127.0.0.1 serving a remote copy of the same profile (one
# batch job, one lease), same --samples and seed. Usage: bench/remote_build.sh [SAMPLES] (default 6).
# Run from the repository root; wrap in `flock /work/heavy.lock` on a shared machine.
set -euo pipefail
SAMPLES=${1:-6}
WORK=$(mktemp -d)
trap 'kill $AGENT $HUB 2>/dev/null || true; wait; rm -rf "$WORK"' EXIT
HW=(python -c 'from search.cli.main import main; main()')  # an array: `&` then starts python itself
hw() { "${HW[@]}" "$@"; }
mkdir "$WORK/profiles"
python - "$WORK/profiles/cpu-ort-fp32-remote.yaml" <<'PY'
import sys, yaml
profile = yaml.safe_load(open("hardware_profiles/cpu-ort-fp32.yaml"))
profile.update(location="remote", description="cpu-ort-fp32 served by an agent on this machine (bench)")
yaml.safe_dump(profile, open(sys.argv[1], "w"), sort_keys=False)
PY
export HWPRUNE_PROFILES=$WORK/profiles
DB=sqlite:///$WORK/hub.db
TOKEN=$(hw agents add local-agent -p cpu-ort-fp32-remote --db "$DB" 2>/dev/null)
"${HW[@]}" serve --db "$DB" --port 18787 > "$WORK/hub.log" 2>&1 & HUB=$!
sleep 4
HWPRUNE_AGENT_TOKEN=$TOKEN "${HW[@]}" agent --server http://127.0.0.1:18787 -p cpu-ort-fp32-remote --poll 0.2 \
    --work-dir "$WORK/agent" > "$WORK/agent.log" 2>&1 & AGENT=$!
sleep 4
for target in cpu-ort-fp32 cpu-ort-fp32-remote; do
    start=$(date +%s.%N)
    hw latency-model build --example digits -p $target --samples "$SAMPLES" --name "$target" --db "$DB" --json \
        | python -c 'import json, sys; r = json.load(sys.stdin); print(r["location"], r["layers_timed"], "layers", r["samples"], "samples, held-out MAPE", r["held_out"] and round(100 * r["held_out"]["mape"], 2), "%")'
    echo "$target: wall $(python -c "import time; print(round(time.time() - $start, 1))") s"
done
