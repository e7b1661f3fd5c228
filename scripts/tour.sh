#!/usr/bin/env bash
# The README's tour, run for real: from a trained scikit-learn model to its predictions
# queried from the central database.
#
#   scripts/tour.sh [WORKDIR]      (default: a fresh temporary folder, removed at the end)
#
# Trains a model, converts and signs it, starts a broker from broker-config/, the
# collector (SQLite), an agent; publishes the model, asks for predictions with request
# ids, posts ground truth, and queries results and accuracy with edge-fleet. Ports come
# from TOUR_PORT_BASE (default 18830: +0 devices, +1 operators, +2 the agent's HTTP).
# tests/test_tour.py runs it; every step's output is what a user sees.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PATH="$ROOT/.venv/bin:$PATH"
BASE="${TOUR_PORT_BASE:-18830}"
DEV_PORT=$BASE OPS_PORT=$((BASE + 1)) HTTP_PORT=$((BASE + 2))
# shellcheck source=scripts/e2e/walk-steps.sh
. scripts/e2e/walk-steps.sh tour "${1:-}"
cd "$W"

# 1. A data scientist trains a model and turns it into a signed package.
say "python train.py   # a RandomForest on iris, saved with joblib"
python - <<'EOF'
import joblib, numpy as np
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
x, y = load_iris(return_X_y=True)
labels = np.array(["setosa", "versicolor", "virginica"])[y]
joblib.dump(RandomForestClassifier(n_estimators=20, random_state=0).fit(x, labels), "model.joblib")
np.save("sample.npy", x.astype("float32"))
EOF
run edge-model keygen -o keys
run edge-model convert model.joblib --name iris --version 1.0.0 --sample sample.npy \
    --key keys/publisher.key -o iris-1.0.0

# 2. The central side: a broker with an account each, and the collector.
run "$ROOT/broker-config/mkconf.sh" --conf-dir broker --data-dir broker/data \
    --port "$DEV_PORT" --operator-port "$OPS_PORT" --log-dest stderr
for account in "operator ops" "collector collect-1" "device pi-1 --fleet demo"; do
    # shellcheck disable=SC2086
    run "$ROOT/broker-config/mkcreds.sh" --conf-dir broker --out creds $account
done
say "mosquitto -c broker/mosquitto.conf &"
mosquitto -c broker/mosquitto.conf 2>broker.log & pids+=($!)
until_ok 10 "the broker" bash -c "echo > /dev/tcp/127.0.0.1/$OPS_PORT"
export EDGE_BROKER="mqtt://127.0.0.1:$OPS_PORT"
say "edge-fleet collect --db sqlite:///$W/results.db --username collect-1 --password-file creds/collect-1.password &"
edge-fleet collect --db "sqlite:///$W/results.db" --username collect-1 \
    --password-file creds/collect-1.password 2>collect.log & pids+=($!)

# 3. A device: the agent, trusting the publisher's key.
cat > agent.toml <<EOF
state_dir = "$W/state"
[device]
id = "pi-1"
fleet = "demo"
[http]
port = $HTTP_PORT
[models]
trusted_keys = ["$W/keys/publisher.pub"]
[mqtt]
url = "mqtt://127.0.0.1:$DEV_PORT"
username = "pi-1"
password_file = "$W/creds/pi-1.password"
EOF
say "edge-agent run --config agent.toml &"
edge-agent run --config agent.toml 2>agent.log & pids+=($!)

# 4. The operator publishes; the device verifies, installs and serves it.
run edge-fleet publish iris-1.0.0 --fleet demo --signing-key keys/publisher.key \
    --username ops --password-file creds/ops.password
until_ok 60 "the model served" curl -sf "localhost:$HTTP_PORT/v2/models/iris/ready"

# 5. Predictions, each with the caller's request id; later, the truth for two of them.
for i in 1 2 3; do
    run curl -s "localhost:$HTTP_PORT/predict" \
        -d "{\"features\": [[5.1, 3.5, 1.4, 0.$i]], \"request_id\": \"order-$i\"}"
done
run curl -s "localhost:$HTTP_PORT/predict" -d '{"features": [[6.7, 3.0, 5.2, 2.3]], "request_id": "order-4"}'
run curl -s "localhost:$HTTP_PORT/feedback" -d '{"request_id": "order-1", "label": "setosa"}'
run curl -s "localhost:$HTTP_PORT/feedback" -d '{"request_id": "order-4", "label": "versicolor"}'

# 6. Centrally: the predictions in the database, and the model's live accuracy.
stored() { [ "$(edge-fleet results --db "sqlite:///$W/results.db" --format csv | tail -n +2 | wc -l)" -ge 4 ]; }
until_ok 30 "the results stored" stored
joined() { edge-fleet accuracy --db "sqlite:///$W/results.db" | grep -q '1.0.0'; }
until_ok 30 "the feedback joined" joined
run edge-fleet results --db "sqlite:///$W/results.db" --device pi-1
run edge-fleet accuracy --db "sqlite:///$W/results.db"
say "curl -s localhost:$HTTP_PORT/status   # the device's backlog: acknowledged, so empty"
until_ok 30 "the device's backlog acknowledged" \
    bash -c "curl -s localhost:$HTTP_PORT/status | grep -q '\"rows\": *0'"
echo "tour: done"
