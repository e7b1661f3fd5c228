"""A second model installed beside the first does not break callers that name none.

Real ``edge-agent run``: a request without ``?model=`` goes to ``models.default`` or
else to the first model installed, before and after a second one arrives, and after a
restart (the store keeps the order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

IRIS_ROW = {"features": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.mark.slow
def test_second_model_keeps_the_first_installed_as_default_over_a_restart(
    start_agent: Any, iris_package: Path, columns_package: Path
) -> None:
    agent = start_agent(packages=[iris_package])
    code, body = agent.request("POST", "/predict", IRIS_ROW)
    assert (code, body["model"]) == (200, "iris")
    agent.install(columns_package)  # beside the running agent; 'columns' sorts first
    agent.wait_for(lambda st: "columns" in st["models"], timeout=10)
    code, body = agent.request("POST", "/predict", IRIS_ROW)
    assert (code, body["model"]) == (200, "iris"), body
    assert agent.status()["default_model"] == "iris"
    agent.stop()
    agent.start()
    code, body = agent.request("POST", "/predict", IRIS_ROW)
    assert (code, body["model"]) == (200, "iris"), body
    code, body = agent.request("POST", "/predict?model=columns",
                               {"features": [{"age": 31, "city": "Oslo"}]})  # fmt: skip
    assert (code, body["model"]) == (200, "columns"), body


@pytest.mark.slow
def test_models_default_wins_over_the_install_order(
    start_agent: Any, iris_package: Path, columns_package: Path
) -> None:
    agent = start_agent({"models": {"default": "columns"}},
                        packages=[iris_package, columns_package])  # fmt: skip
    code, body = agent.request("POST", "/predict", {"features": [{"age": 31, "city": "Oslo"}]})
    assert (code, body["model"]) == (200, "columns"), body
    assert agent.status()["default_model"] == "columns"
