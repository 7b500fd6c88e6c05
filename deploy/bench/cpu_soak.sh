#!/usr/bin/env bash
# Memory soak at the CPU target load: `acroscreen serve` (demo weights, defaults) under 4 live
# 30-fps streams for DURATION seconds; the server's RSS (summed over its processes with
# SERVER_ARGS=--workers=N; pages they share are counted in each) is sampled every 10 s.
# Writes $OUT/soak.json: the bench report, the RSS samples, and the growth after warm-up
# (mean RSS of the last minute against the second minute).
#   OUT=/tmp/soak bash deploy/bench/cpu_soak.sh        # from the repository root, after `make test` set-up
set -euo pipefail
: "${OUT:?set OUT}"
DURATION=${DURATION:-600}
BIN=${BIN:-.venv/bin}
VIDEOS=${VIDEOS:-../shared/data/videos}
mkdir -p "$OUT"
log="$OUT/server.log"
"$BIN/acroscreen" serve --port 0 --metrics-port 0 ${SERVER_ARGS:-} >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
# With --workers the supervisor serves every process's metrics added up: scrape that.
for _ in $(seq 600); do
    grep -q "serving on" "$log" && { [[ "${SERVER_ARGS:-}" != *--workers* ]] || grep -q "supervisor metrics" "$log"; } && break
    sleep 0.5
done
ports=$(sed -n 's/.*serving on [^ ]*:\([0-9]*\) (metrics :\([0-9]*\)).*/\1 \2/p' "$log" | head -1)
read -r port metrics <<<"$ports"
summed=$(sed -n 's/.*supervisor metrics :\([0-9]*\).*/\1/p' "$log" | head -1)
metrics=${summed:-$metrics}
(while kill -0 "$server" 2>/dev/null; do  # RSS of the server and its children (workers, model process)
    echo "$(date +%s.%N) $(cat /proc/"$server"/status $(pgrep -P "$server" | sed 's|.*|/proc/&/status|') 2>/dev/null \
        | awk '/^VmRSS/ {kb += $2} END {print kb}')"
    sleep 10
done) >"$OUT/rss.txt" &
sampler=$!
"$BIN/acroscreen" bench "$VIDEOS/retalking_face1.mp4" "$VIDEOS/liveportrait_d9.mp4" \
    "$VIDEOS/hamilton_short_clip.mp4" "$VIDEOS/retalking_face3.mp4" --streams 4 --pace realtime \
    --duration "$DURATION" --server "127.0.0.1:$port" --metrics-url "http://127.0.0.1:$metrics/metrics" \
    --out "$OUT/bench.json" >/dev/null
kill "$sampler" 2>/dev/null || true
"$BIN/python" - "$OUT" <<'PY'
import json, platform, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [line.split() for line in (out / "rss.txt").read_text().splitlines() if len(line.split()) == 2]
start = float(rows[0][0])
samples = [(round(float(t) - start), round(int(kb) / 1024, 1)) for t, kb in rows]
second = [mb for t, mb in samples if 60 <= t < 120]
end = max(t for t, _ in samples)
last = [mb for t, mb in samples if t > end - 60]
growth = (sum(last) / len(last)) / (sum(second) / len(second)) - 1
report = {"machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
          "rss_mb_every_10s": samples, "rss_growth_after_warmup": round(growth, 4),
          "bench": json.loads((out / "bench.json").read_text())}
(out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"RSS {sum(second) / len(second):.0f} MB in minute 2 -> {sum(last) / len(last):.0f} MB in the last minute "
      f"({growth:+.1%}); analysed/s {report['bench']['server']['analyzed_per_s']}")
PY
