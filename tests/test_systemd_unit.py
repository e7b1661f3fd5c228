"""The systemd unit: it verifies, it is hardened, and the agent runs under its limits."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit_files import (
    analyze,
    directives,
    exposure,
    needs_analyze,
    one_of,
    verify_in_scratch_root,
)

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-agent.service"
MAX_EXPOSURE = 2.0

one = one_of(UNIT)


@needs_analyze
def test_unit_verifies_without_a_warning(tmp_path):
    # The layout install-pi.sh creates, in a scratch root.
    code, output = verify_in_scratch_root(UNIT, "/opt/edge-agent/bin/edge-agent", tmp_path)
    assert code == 0, output
    # Unknown or misspelt keys are only warnings ("Unknown key ..., ignoring"): a
    # hardening line that does nothing must fail the test too.
    assert output == "", output


@needs_analyze
def test_verify_catches_a_misspelt_hardening_key(tmp_path):
    broken = tmp_path / "edge-agent.service"
    broken.write_text(
        UNIT.read_text()
        .replace("ProtectSystem=strict", "ProtectSytem=strict")
        .replace("/opt/edge-agent/bin/edge-agent", "/bin/true")
    )
    proc = subprocess.run(
        [analyze, "verify", str(broken)], check=False, capture_output=True, text=True, timeout=60
    )
    assert "Unknown key 'ProtectSytem'" in proc.stdout + proc.stderr


@needs_analyze
def test_security_exposure_is_at_most_two():
    score, word, report = exposure(UNIT)
    assert score <= MAX_EXPOSURE, f"exposure {score} {word}; worst:\n" + "\n".join(
        line for line in report.splitlines() if line.startswith("✗")
    )


def test_unit_is_a_notify_service_with_a_watchdog_and_a_start_limit():
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("Restart") == "on-failure"
    watchdog = one("WatchdogSec")
    assert re.fullmatch(r"\d+s", watchdog), watchdog
    # The start limit is what turns a config error into a failed unit, not a loop.
    assert int(one("StartLimitBurst")) >= 2
    assert one("StartLimitIntervalSec")


def test_unit_runs_as_a_dynamic_user_with_state_config_and_credentials():
    assert one("DynamicUser") == "yes"
    assert one("StateDirectory") == "edge-agent"
    assert one("ConfigurationDirectory") == "edge-agent"
    cred_id, _, source = one("LoadCredential").partition(":")
    assert cred_id and source == "/etc/edge-agent/credentials"
    assert "--config /etc/edge-agent/agent.toml" in one("ExecStart")
    assert one("UMask") == "0077"


def test_unit_keeps_request_logging_off_the_sd_card():
    assert one("LogLevelMax") == "info"
    assert one("LogRateLimitBurst").isdigit()


def test_unit_allows_only_the_socket_families_the_agent_uses():
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one("CapabilityBoundingSet") == ""
    assert "@system-service" in directives(UNIT)["SystemCallFilter"]


def test_onnxruntime_and_signatures_work_without_writable_executable_memory(tmp_path):
    """MemoryDenyWriteExecute=yes is only safe if nothing the agent loads JITs code.

    The kernel's PR_SET_MDWE is the same rule systemd applies; set it before importing
    onnxruntime, numpy and cryptography, then run a real model and check a signature.
    """
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    x = x.astype("float32")
    for name, est in {
        "linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
        "forest": RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0),
    }.items():
        est.fit(x, y)
        onx = skl2onnx.to_onnx(est, x[:1], options={id(est): {"zipmap": False}})
        (tmp_path / f"{name}.onnx").write_bytes(onx.SerializeToString())
    script = textwrap.dedent(
        f"""
        import ctypes, mmap
        PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            print("SKIP kernel without PR_SET_MDWE, errno", ctypes.get_errno()); raise SystemExit
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            raise SystemExit("W+X mapping allowed: the restriction is not in force")
        except PermissionError:
            pass
        import numpy as np, onnxruntime as ort
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        x = np.array({x[[0, 60, 120]].tolist()}, dtype=np.float32)
        for name in ("linear", "forest"):
            s = ort.InferenceSession("{tmp_path}/" + name + ".onnx",
                                     providers=["CPUExecutionProvider"])
            print(name, s.run(None, {{s.get_inputs()[0].name: x}})[0].tolist())
        key = Ed25519PrivateKey.generate()
        key.public_key().verify(key.sign(b"manifest"), b"manifest")
        print("signature ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120
    )
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr
    assert "linear [0, 1, 2]" in proc.stdout
    assert "forest [0, 1, 2]" in proc.stdout
    assert "signature ok" in proc.stdout


# --- scripts/install-pi.sh: the refusals a user meets before anything is installed ---

INSTALL_PI = ROOT / "scripts" / "install-pi.sh"


def fake_bin(tmp_path: Path, **commands: str) -> dict[str, str]:
    """PATH with stand-ins for `uname -m`, `id -u` and `dpkg --print-architecture`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, output in commands.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho {output}\n")
        script.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def run_install_pi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL_PI), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("armv7l", "armhf"), ("aarch64", "armhf")],
    ids=["32-bit", "pi4-32-bit-os"],
)
def test_install_pi_refuses_a_32_bit_arm_os_and_says_why(tmp_path, machine, arch):
    env = fake_bin(tmp_path, uname=machine, id="0", dpkg=arch)
    proc = run_install_pi("--no-apt", env=env)
    assert proc.returncode == 1
    assert "no 32-bit ARM wheels" in proc.stderr
    assert "64-bit Raspberry Pi OS" in proc.stderr
    assert not (tmp_path / "opt").exists()


def test_install_pi_needs_root_and_knows_its_options(tmp_path):
    env = fake_bin(tmp_path, uname="aarch64", id="1000", dpkg="arm64")
    proc = run_install_pi(env=env)
    assert proc.returncode == 1 and "run as root" in proc.stderr
    assert run_install_pi("--help", env=env).returncode == 0
    bad = run_install_pi("--prefx", "/opt/x", env=env)
    assert bad.returncode == 2 and "unknown option --prefx" in bad.stderr
    missing = run_install_pi(
        "--wheel",
        str(tmp_path / "nope.whl"),
        env=fake_bin(tmp_path / "root", uname="aarch64", id="0", dpkg="arm64"),
    )
    assert missing.returncode == 1 and "nope.whl does not exist" in missing.stderr
