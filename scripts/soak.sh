#!/usr/bin/env bash
# The long soak (tests/test_soak.py with CAIO_SOAK=1): per asyncio
# configuration, 1,000,000 mixed reads/writes/fsyncs/fdsyncs with random
# cancellations, then exact fd/thread/AIO checks, RSS/malloc tolerances and a
# sha256 comparison with the model. 7 configurations, 3.5 minutes on two
# shared cores (figures: docs/soak-and-sanitizers.md).
#
#   nice -n 5 scripts/soak.sh [pytest args...]   e.g. scripts/soak.sh -k linux_aio
#
# Environment: VENV (default .venv; created by dev-setup.sh when missing),
# CAIO_SOAK_OPS / CAIO_SOAK_OPS_<BACKEND> / CAIO_SOAK_SEED /
# CAIO_SOAK_CANCEL_SHARE (see tests/test_soak.py), CAIO_SOAK_REPORT (JSON
# lines, default build/soak/report-<time>.jsonl). Prints a summary table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
    ./scripts/dev-setup.sh "${PYTHON:-python3}" "$VENV"
fi
REPORT=${CAIO_SOAK_REPORT:-build/soak/report-$(date +%Y%m%d-%H%M%S).jsonl}
mkdir -p "$(dirname "$REPORT")"
export CAIO_SOAK=1 CAIO_SOAK_REPORT="$REPORT"

started=$SECONDS
status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -v \
    tests/test_soak.py::test_soak "$@" || status=$?
elapsed=$((SECONDS - started))

"$VENV/bin/python" - "$REPORT" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
head = ("config", "ops", "s", "ops/s", "cancelled", "RSS KiB", "malloc KiB",
        "blocks", "fds", "threads", "aio rings", "aio-nr")
print()
print(" | ".join(head))
for r in rows:
    d = r["deltas"]
    kib = lambda v: "n/a" if v is None else "{:+.0f}".format(v / 1024)
    print(" | ".join(str(x) for x in (
        r["config"], r["ops"], r["seconds"], r["ops_per_second"],
        r["stats"]["cancelled"], kib(d["rss"]), kib(d["malloc"]),
        "{:+d}".format(d["blocks"]), d["fds"], d["threads"], d["aio_rings"],
        d["aio_nr"],
    )))
EOF
echo
echo "soak: ${elapsed} s in total, pytest exit status $status, report $REPORT"
exit $status
