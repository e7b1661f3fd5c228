#!/usr/bin/env bash
# docs/fleet.md's walk, run for real: enrol three devices, give them a model, then a
# self-driving rollout of a bad version that halts by itself and rolls the fleet back.
#
#   scripts/fleet-walk.sh [WORKDIR]   (default: a fresh temporary folder, removed at the end)
#
# One machine plays every part: a broker from broker-config/, an operator account, three
# devices enrolled with `edge-fleet enroll`, each bundle installed with
# `scripts/install-pi.sh --bundle --config-only` into its own folder (the devices are
# agents on this machine, not systemd services), then `edge-fleet publish`, `status`,
# `rollout --steps ... --halt-if ... --rollback-on-halt --follow`, `history`. Ports come
# from WALK_PORT_BASE (default 18930: +0 devices, +1 operators, +2..+4 the agents' HTTP).
# tests/test_fleet_walk.py runs it; every step's output is what an operator sees.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PATH="$ROOT/.venv/bin:$PATH"
BASE="${WALK_PORT_BASE:-18930}"
DEV_PORT=$BASE OPS_PORT=$((BASE + 1))
# shellcheck source=scripts/e2e/walk-steps.sh
. scripts/e2e/walk-steps.sh walk "${1:-}"
cd "$W"
DEVICES=(pi-001 pi-002 pi-003)

# 1. A model, converted and signed; and 1.1.0, a bad build: its parity vectors do not
#    match what the model computes, so every device that tries it refuses it.
python - <<'EOF'
import joblib, numpy as np
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
x, y = load_iris(return_X_y=True)
joblib.dump(RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y), "model.joblib")
np.save("sample.npy", x.astype("float32"))
EOF
run edge-model keygen -o keys
run edge-model convert model.joblib --name iris --version 1.0.0 --sample sample.npy \
    --key keys/publisher.key -o iris-1.0.0
say "cp -r iris-1.0.0 iris-1.1.0   # then break its parity vectors: a bad build"
cp -r iris-1.0.0 iris-1.1.0
python - <<'EOF'
import json
m = json.load(open("iris-1.1.0/manifest.json"))
m["version"] = "1.1.0"
m.pop("signature", None)
m["parity"]["expected"]["probabilities"] = [[p + 0.3 for p in row] for row in m["parity"]["expected"]["probabilities"]]
json.dump(m, open("iris-1.1.0/manifest.json", "w"), indent=2)
EOF

# 2. The broker, and an operator account (devices get theirs from `enroll`).
run "$ROOT/broker-config/mkconf.sh" --conf-dir broker --data-dir broker/data \
    --port "$DEV_PORT" --operator-port "$OPS_PORT" --log-dest stderr
run "$ROOT/broker-config/mkcreds.sh" --conf-dir broker --out creds operator ops
say "mosquitto -c broker/mosquitto.conf &"
mosquitto -c broker/mosquitto.conf 2>broker.log & pids+=($!)
until_ok 10 "the broker" bash -c "echo > /dev/tcp/127.0.0.1/$OPS_PORT"
export EDGE_BROKER="mqtt://127.0.0.1:$OPS_PORT" EDGE_USERNAME=ops EDGE_PASSWORD_FILE="$W/creds/ops.password"
export EDGE_SIGNING_KEY="$W/keys/publisher.key"

# 3. Enrolment: accounts, ACL entries and one bundle per device, in one command.
run edge-fleet enroll "${DEVICES[@]}" --fleet shop --tags site=north --conf-dir broker \
    --mqtt-url "mqtt://127.0.0.1:$DEV_PORT" --trusted-key keys/publisher.pub -o bundles
say "kill -HUP <mosquitto>   # the broker reads the new accounts"
kill -HUP "${pids[0]}"

# 4. Each device installs its bundle (on a Pi: sudo scripts/install-pi.sh --bundle FILE)
#    and runs the agent.
for i in 0 1 2; do
    d=${DEVICES[$i]}
    run "$ROOT/scripts/install-pi.sh" --bundle "bundles/$d.tar.gz" --etc "$W/$d/etc" \
        --prefix "$ROOT/.venv" --config-only --no-apt
    say "edge-agent run --config $d/etc/agent.toml &"
    CREDENTIALS_DIRECTORY="$W/$d/etc/credentials" EDGE_AGENT_STATE_DIR="$W/$d/state" \
        EDGE_AGENT_HTTP_PORT=$((BASE + 2 + i)) \
        edge-agent run --config "$W/$d/etc/agent.toml" 2>"$d.log" & pids+=($!)
done
online() { [ "$(edge-fleet status --wait 1 --json | python -c 'import json,sys; print(sum(d["state"] == "online" for d in json.load(sys.stdin)["devices"]))')" = 3 ]; }
until_ok 60 "three devices online" online

# 5. The good version, to the whole fleet.
run edge-fleet publish iris-1.0.0 --fleet shop --strict
served() { for i in 0 1 2; do curl -sf "localhost:$((BASE + 2 + i))/v2/models/iris/versions/1.0.0/ready" || return 1; done; }
until_ok 90 "1.0.0 served on three devices" served
run edge-fleet status --wait 1

# 6. The bad version, to nobody yet; then a rollout that widens itself while the
#    devices that took it are healthy, halts when they are not, and rolls back.
run edge-fleet publish iris-1.1.0 --fleet shop --rollout 0 --strict
say "edge-fleet rollout iris --fleet shop --steps 34,67,100 --every 30s --halt-if \"rejected>0\" --rollback-on-halt --follow"
set +e
edge-fleet rollout iris --fleet shop --steps 34,67,100 --every 30s --poll 1 \
    --halt-if "rejected>0" --rollback-on-halt --follow
code=$?
set -e
[ "$code" = 1 ] || { echo "walk: the rollout of a bad version did not halt (exit $code)" >&2; exit 1; }
# Rolled back: the desired state names 1.0.0 again (a new serial), and every device
# serves it; the device that refused 1.1.0 is active on 1.0.0, not left "rejected".
back() {
    edge-fleet status --wait 1 --json | python -c '
import json, sys
rows = [m for d in json.load(sys.stdin)["devices"] for m in d["models"].values()]
ok = [m for m in rows if m["version"] == "1.0.0" and (m.get("desired") or {}).get("version") == "1.0.0" and m["deployment"]["state"] == "active"]
sys.exit(0 if len(ok) == 3 else 1)'
}
until_ok 60 "three devices on 1.0.0 again" back
run edge-fleet rollout iris --fleet shop
run edge-fleet status --wait 1
run edge-fleet history iris --fleet shop
echo "walk: done"
