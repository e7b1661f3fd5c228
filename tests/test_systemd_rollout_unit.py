"""The follower's systemd unit: it verifies, it is hardened, and its command line, with
the environment and credentials the unit gives it, drives a rollout to the end."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fleet.publish import publish
from fleet.rollout_driver import SETTLE_S
from fleet.rollout_plans import create
from tests.delivery_helpers import operator
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import retained
from tests.unit_files import directives, exposure, needs_analyze, one_of, verify_in_scratch_root

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-fleet-rollout.service"
MAX_EXPOSURE = 2.0
EXE = "/opt/edge-agent/bin/edge-fleet"

one = one_of(UNIT)


@needs_analyze
def test_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    code, output = verify_in_scratch_root(UNIT, EXE, tmp_path)
    assert code == 0 and output == "", output


@needs_analyze
def test_security_exposure_is_at_most_two() -> None:
    score, _word, report = exposure(UNIT)
    assert score <= MAX_EXPOSURE, report


def test_unit_restarts_always_and_keeps_its_secrets_in_credentials() -> None:
    assert one("Restart") == "always"
    assert one("DynamicUser") == "yes"
    assert shlex.split(one("ExecStart")) == [EXE, "rollout", "--follow"]
    creds = dict(v.split(":", 1) for v in directives(UNIT)["LoadCredential"])
    assert set(creds) == {"mqtt-password", "signing-key"}
    env = " ".join(directives(UNIT)["Environment"])
    assert "EDGE_PASSWORD_FILE=%d/mqtt-password" in env
    assert "EDGE_SIGNING_KEY=%d/signing-key" in env
    assert "StateDirectory" not in directives(UNIT)  # every bit of state is on the broker


def test_the_units_command_drives_a_rollout_under_its_restrictions(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """ExecStart= with the unit's environment (EnvironmentFile=, credentials as %d) and
    the kernel's W^X rule that MemoryDenyWriteExecute=yes applies."""
    ops = operator(broker)
    publish(ops, iris_package, fleet="f1", key=keypair.key)
    publish(ops, iris_package_v2, fleet="f1", percent=0, key=keypair.key)
    create(ops, "iris", fleet="f1", steps=[50, 100], every_s=1, halt_if="rejected>0",
           promote_if=None, rollback_on_halt=False, where={}, key=keypair.key, who="test")  # fmt: skip

    creds = tmp_path / "credentials"
    creds.mkdir()
    shutil.copy(broker.operator.password_file, creds / "mqtt-password")
    shutil.copy(keypair.key, creds / "signing-key")
    env = {"PATH": "/usr/bin:/bin", "EDGE_BROKER": broker.operator_url,
           "EDGE_USERNAME": broker.operator.username}  # the EnvironmentFile=  # fmt: skip
    for assignment in directives(UNIT)["Environment"]:
        for item in shlex.split(assignment):
            key, _, value = item.partition("=")
            env[key] = value.replace("%d", str(creds))
    argv = [*shlex.split(one("ExecStart"))[1:], "--poll", "0.5"]
    script = textwrap.dedent(
        f"""
        import ctypes, sys
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            print("no PR_SET_MDWE on this kernel", file=sys.stderr)
        from fleet.cli import main
        sys.exit(main({argv!r}))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    topic = "edge/fleets/f1/models/iris/rollout"
    try:
        deadline = time.monotonic() + 60
        plan: dict[str, object] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            plan = json.loads(retained(broker, topic)[topic])
            if plan["state"] == "done":
                time.sleep(SETTLE_S + 1)  # it says so once its claim has settled
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert plan.get("state") == "done", out
    assert "widening to 100%" in out and "done at step 2/2 (100%)" in out
