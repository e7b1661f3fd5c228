"""edge-fleet enroll: accounts and ACL entries in a real broker's folder, device bundles,
enrolment records on a real mosquitto, bulk from a CSV, and clear refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

from agent.wire import payloads
from fleet.accounts import role_account
from fleet.cli import main
from tests.fixtures.broker import CONFIG, Broker, Creds
from tests.fixtures.models import Keypair

URL = "mqtts://broker.example.com:8883"


def enroll(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["enroll", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    done = subprocess.run([CONFIG / "mkca.sh", "--dir", tmp_path / "ca", "server"],
                          capture_output=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return tmp_path / "ca" / "ca.crt"


def base(broker: Broker, keypair: Keypair, out: Path) -> list[str | Path]:
    return ["-o", out, "--mqtt-url", URL, "--trusted-key", keypair.pub,
            "--conf-dir", broker.conf_dir]  # fmt: skip


def operator_login(broker: Broker) -> list[str]:
    creds = broker.operator
    return ["--broker", broker.operator_url, "--username", creds.username,
            "--password-file", str(creds.password_file)]  # fmt: skip


def unpack(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def test_enroll_writes_accounts_acl_and_a_bundle_per_device(
    broker: Broker, keypair: Keypair, ca: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "bundles"
    code, stdout, err = enroll(capsys, "pi-1", "pi-2", "--fleet", "greenhouse",
                               "--tags", "site=north", "ring=canary", "--ca", ca, "--json",
                               *base(broker, keypair, out))  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert [(d["device"], d["fleet"], d["tags"]) for d in doc["enrolled"]] == [
        ("pi-1", "greenhouse", {"site": "north", "ring": "canary"}),
        ("pi-2", "greenhouse", {"site": "north", "ring": "canary"}),
    ]
    assert "systemctl reload mosquitto" in err
    acl = (broker.conf_dir / "acl").read_text()
    assert f"\n{role_account('device', 'pi-1', 'edge', 'greenhouse').block()}\n" in acl

    bundle = out / "pi-1.tar.gz"
    assert bundle.stat().st_mode & 0o777 == 0o600  # it holds the password
    files = unpack(bundle)
    assert sorted(files) == sorted(f"pi-1/{n}" for n in ["agent.toml", "ca.crt", "publisher.pub",
                                                          "credentials/mqtt.password", "SHA256SUMS"])  # fmt: skip
    assert files["pi-1/ca.crt"] == ca.read_bytes()
    assert files["pi-1/publisher.pub"] == keypair.pub.read_bytes()
    sums = dict(reversed(ln.split("  ")) for ln in files["pi-1/SHA256SUMS"].decode().splitlines())
    assert {n: hashlib.sha256(files[f"pi-1/{n}"]).hexdigest() for n in sums} == sums
    config = tomllib.loads(files["pi-1/agent.toml"].decode())
    assert config["device"] == {"id": "pi-1", "fleet": "greenhouse",
                                "tags": {"site": "north", "ring": "canary"}}  # fmt: skip
    assert config["mqtt"] == {"url": URL, "username": "pi-1", "password_file": "mqtt.password",
                              "ca": "/etc/edge-agent/ca.crt"}  # fmt: skip
    assert config["models"] == {"trusted_keys": ["/etc/edge-agent/publisher.pub"]}
    assert config["state_dir"] == "/var/lib/edge-agent"

    # The bundle's password is the device's account on the device listener.
    password = files["pi-1/credentials/mqtt.password"].decode().strip()
    creds = Creds("pi-1", password, tmp_path / "unused")
    broker.reload(creds)
    desired = broker.subscribe("edge/fleets/greenhouse/models/+/desired", creds)
    broker.client().publish("edge/fleets/greenhouse/models/m/desired", b"d", qos=1, retain=True)
    desired.wait_for(lambda m: len(m) == 1)


def test_enrolment_records_are_published_retained_and_viewers_read_them(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = enroll(capsys, "pi-1", "--fleet", "f1", "--tags", "site=north",
                          *base(broker, keypair, tmp_path / "o"), *operator_login(broker))  # fmt: skip
    assert code == 0, err
    seen = broker.subscribe("edge/devices/+/enrolment", broker.add_viewer("grafana"))
    [msg] = seen.wait_for(lambda m: len(m) == 1)
    assert msg.retain and msg.topic == "edge/devices/pi-1/enrolment"
    record = payloads.check_enrolment(json.loads(msg.payload), msg.topic)
    assert (record["device"], record["fleet"], record["tags"]) == ("pi-1", "f1", {"site": "north"})


def test_without_a_broker_no_record_is_published(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("EDGE_BROKER", raising=False)
    code, out, _ = enroll(capsys, "pi-1", "--fleet", "f1", "--json",
                          *base(broker, keypair, tmp_path / "o"))  # fmt: skip
    assert code == 0
    assert json.loads(out)["enrolled"][0]["enrolment"].startswith("not published")


def test_bulk_from_a_csv(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sheet = tmp_path / "devices.csv"
    sheet.write_text(
        "\ufeffdevice,fleet,tags\n"  # as a spreadsheet saves it
        "pi-1,north,site=a;ring=canary\n"
        "pi-2,,site=b\n"  # the --fleet default
        "\n"
        "pi-3,south,\n"
    )
    code, out, err = enroll(capsys, "pi-0", "--fleet", "north", "--tags", "owner=ops",
                            "--csv", sheet, "--json", *base(broker, keypair, tmp_path / "o"))  # fmt: skip
    assert code == 0, err
    assert [(d["device"], d["fleet"], d["tags"]) for d in json.loads(out)["enrolled"]] == [
        ("pi-0", "north", {"owner": "ops"}),
        ("pi-1", "north", {"owner": "ops", "site": "a", "ring": "canary"}),
        ("pi-2", "north", {"owner": "ops", "site": "b"}),
        ("pi-3", "south", {"owner": "ops"}),
    ]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        f"pi-{i}.tar.gz" for i in range(4)
    ]


@pytest.mark.parametrize(
    ("csv_text", "args", "message"),
    [
        ("device,fleet\npi-1,f1\npi-1,f2\n", [], "device 'pi-1' is given twice"),
        ("device,fleet\npi-1,f1\n", ["pi-1", "--fleet", "f1"], "device 'pi-1' is given twice"),
        ("device,fleet,site\npi-1,f1,a\n", [], "unknown column 'site' (the columns are"),
        ("fleet\nf1\n", [], "no 'device' column"),
        ("device,fleet\npi 1,f1\n", [], "devices.csv:2: device: 'pi 1' is not a plain name"),
        ("device,fleet\npi-1,f/1\n", [], "devices.csv:2: fleet: 'f/1' is not a plain name"),
        ("device,fleet,tags\npi-1,f1,site\n", [], "devices.csv:2: tags: 'site' is not key=value"),
        ("device,tags\npi-1,a=b\n", [], "devices.csv:2: pi-1: no fleet"),
        ("device,fleet\npi-1,f1,extra\n", [], "devices.csv:2: more cells than the 2 columns"),
        (None, ["pi/1", "--fleet", "f1"], "DEVICE: device: 'pi/1' is not a plain name"),
        (None, ["pi-1"], "--fleet: the devices on the command line need a fleet"),
        (
            None,
            ["pi-1", "--fleet", "f1", "--tags", "si te=a"],
            "--tags: key 'si te' is not a plain name",
        ),
        (None, [], "no device to enrol"),
    ],
)
def test_bad_input_is_refused_naming_it_and_nothing_is_written(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    csv_text: str | None, args: list[str], message: str,
) -> None:  # fmt: skip
    extra: list[str | Path] = list(args)
    if csv_text is not None:
        (tmp_path / "devices.csv").write_text(csv_text)
        extra += ["--csv", tmp_path / "devices.csv"]
    acl = (broker.conf_dir / "acl").read_text()
    code, _, err = enroll(capsys, *extra, *base(broker, keypair, tmp_path / "o"))
    assert code == 2
    assert message in err, err
    assert (broker.conf_dir / "acl").read_text() == acl
    assert not (tmp_path / "o").exists()


def test_a_private_key_is_never_put_in_a_bundle(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = enroll(capsys, "pi-1", "--fleet", "f1", "-o", tmp_path / "o",
                          "--mqtt-url", URL, "--trusted-key", keypair.key,
                          "--conf-dir", broker.conf_dir)  # fmt: skip
    assert code == 2 and "is a private key" in err
    assert not (tmp_path / "o").exists()


def test_enrolled_devices_are_renewed_only_when_asked(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = broker.add_device("pi-1", fleet="f1")  # e.g. by mkcreds.sh, or an earlier enroll
    code, _, err = enroll(capsys, "pi-1", "--fleet", "f2", *base(broker, keypair, tmp_path / "o"))
    assert code == 1 and "pi-1: enrolled already; --renew" in err
    code, _, err = enroll(capsys, "pi-1", "--fleet", "f2", "--renew",
                          *base(broker, keypair, tmp_path / "o"))  # fmt: skip
    assert code == 0, err
    password = unpack(tmp_path / "o" / "pi-1.tar.gz")["pi-1/credentials/mqtt.password"]
    renewed = Creds("pi-1", password.decode().strip(), tmp_path / "unused")
    broker.reload(renewed)
    assert not broker.can_login(first)
    acl = (broker.conf_dir / "acl").read_text()
    assert "topic read edge/fleets/f2/models/+/desired" in acl
    assert "topic read edge/fleets/f1/models/+/desired" not in acl


def test_a_name_of_an_operator_listener_account_is_refused(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker.add_collector("coll-1")
    code, _, err = enroll(capsys, "coll-1", "--fleet", "f1", *base(broker, keypair, tmp_path / "o"))
    assert code == 1 and "'coll-1' is an operator-listener account already" in err


def test_an_unreachable_broker_fails_before_anything_is_written(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acl = (broker.conf_dir / "acl").read_text()
    login = operator_login(broker)
    login[1] = "mqtt://127.0.0.1:1"
    code, _, err = enroll(capsys, "pi-1", "--fleet", "f1", *base(broker, keypair, tmp_path / "o"),
                          *login)  # fmt: skip
    assert code == 1 and "mqtt://127.0.0.1:1" in err
    assert (broker.conf_dir / "acl").read_text() == acl
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device": "pi/1"}, "device: 'pi/1' is not a plain name"),
        ({"fleet": None}, "fleet: None is not a plain name"),
        ({"tags": {"site": "a b"}}, "tags.site: 'a b' is not a plain name"),
        ({"tags": ["site=a"]}, "tags: expected a table"),
        ({"enrolled_at": "yesterday"}, "enrolled_at: 'yesterday' is not an RFC 3339 time"),
    ],
)
def test_an_enrolment_record_is_checked_naming_the_field(
    change: dict[str, object], message: str
) -> None:
    record = {**payloads.enrolment("pi-1", "f1", {"site": "a"}), **change}
    with pytest.raises(payloads.InvalidPayload, match="edge/devices/pi-1/enrolment: ") as e:
        payloads.check_enrolment(record, "edge/devices/pi-1/enrolment")
    assert message in str(e.value)
