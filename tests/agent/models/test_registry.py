"""The registry: which model answers, and swaps that never fail a request in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.models.registry import PROBATION, Registry
from agent.models.runtime import LoadedModel, load_model
from agent.wire.errors import ModelNotFound, NotReady
from agent.wire.package import read_manifest


def loaded(package: Path) -> LoadedModel:
    return load_model(package, read_manifest(package))


def test_empty_registry_is_not_ready() -> None:
    with pytest.raises(NotReady):
        Registry().get()


def test_the_only_model_is_the_default(iris_package: Path) -> None:
    registry = Registry()
    registry.swap(loaded(iris_package))
    assert registry.get().name == "iris"
    assert registry.get("iris", "1.0.0").version == "1.0.0"
    with pytest.raises(ModelNotFound, match=r"model 'iris' version '9\.0' is not installed"):
        registry.get("iris", "9.0")
    with pytest.raises(ModelNotFound, match="model 'nope' is not installed"):
        registry.get("nope")


def test_a_nameless_request_goes_to_the_first_installed_or_models_default(
    iris_package: Path, regressor_package: Path
) -> None:
    registry = Registry()
    registry.set_order(["ridge", "iris"])  # the store's order: ridge was installed first
    registry.swap(loaded(iris_package))
    assert registry.get().name == "iris"  # the only one loaded yet
    registry.swap(loaded(regressor_package))
    assert registry.names() == ["iris", "ridge"]
    assert registry.get().name == "ridge" and registry.default_name() == "ridge"
    assert registry.get("iris").name == "iris"
    unordered = Registry()  # nobody gave an order: the first swapped in
    unordered.swap(loaded(iris_package))
    unordered.swap(loaded(regressor_package))
    assert unordered.get().name == "iris"
    with_default = Registry(default="ridge")
    with_default.swap(loaded(iris_package))
    with_default.swap(loaded(regressor_package))
    assert with_default.get().name == "ridge"


def test_swap_returns_the_replaced_model_and_sets_state(
    iris_package: Path, iris_package_v2: Path
) -> None:
    registry = Registry()
    first = loaded(iris_package)
    assert registry.swap(first) is None
    registry.set_state("iris", PROBATION, "watching 1.1.0")
    assert registry.swap(loaded(iris_package_v2)) is first
    status = registry.status()["iris"]
    assert (status["version"], status["state"]) == ("1.1.0", "active")


def test_requests_in_flight_never_fail_during_swaps(
    iris_package: Path, iris_package_v2: Path
) -> None:
    registry = Registry()
    versions = [loaded(iris_package), loaded(iris_package_v2)]
    registry.swap(versions[0])
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    input_name = versions[0].manifest.inputs[0].name
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                model = registry.get()
                out = model.run({input_name: x})
                assert out["label"][0] == "setosa"
                seen.add(model.version)
            except BaseException as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(200):
        registry.swap(versions[i % 2])
        time.sleep(0.001)  # let the clients run on both versions
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert seen == {"1.0.0", "1.1.0"}
