"""The broker's docs: what to install for the commands they use, the Debian route that works."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_doc_naming_mosquitto_pub_or_sub_says_which_package_has_them() -> None:
    """Debian's mosquitto package has the broker only; the clients are mosquitto-clients."""
    missing = [
        p.name
        for p in DOCS
        if re.search(r"\bmosquitto_(pub|sub)\b", p.read_text())
        and "mosquitto-clients" not in p.read_text()
    ]
    assert missing == []


def test_no_doc_sends_the_broker_through_an_include_dir_that_mosquitto_ignores() -> None:
    """include_dir is read from the main file only: in conf.d it is silently ignored."""
    for p in DOCS:
        assert not re.search(r"include_dir \S+' > /etc/mosquitto/conf\.d", p.read_text()), p.name
    broker = (ROOT / "docs" / "broker.md").read_text()
    assert "--snippet /etc/mosquitto/conf.d/edge.conf" in broker
