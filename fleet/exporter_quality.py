"""The exporter's model-quality series, from the health sections devices send: drift per
feature, a ``--shadow`` candidate's agreement, the two arms of a ``--canary-traffic``
split. Each family is labelled by device, fleet, model and version, and holds only what
the devices' last health named, so its size follows the fleet, not the traffic.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from fleet.state import DeviceState

MODEL = ["device", "fleet", "model", "version"]


def quality_metrics(devices: list[DeviceState]) -> Iterator[Metric]:
    yield from _drift_metrics(devices)
    yield from _shadow_metrics(devices)
    yield from _canary_metrics(devices)


def _drift_metrics(devices: list[DeviceState]) -> Iterator[Metric]:
    """Drift per feature from the health ``drift`` sections: the features a device named
    in full (its top drifted ones), the rest as one aggregate per model."""
    feature = GaugeMetricFamily(
        "edge_fleet_model_drift_psi",
        "PSI of a feature's live values on the device against the training sample "
        "(the device's most drifted features, agent/wire/profile.py).",
        labels=[*MODEL, "feature"],
    )
    score = GaugeMetricFamily(
        "edge_fleet_model_drift_score", "The largest feature PSI on the device.", labels=MODEL
    )
    rest = GaugeMetricFamily(
        "edge_fleet_model_drift_rest_max_psi",
        "The largest PSI among the features the device did not name in full.",
        labels=MODEL,
    )
    output = GaugeMetricFamily(
        "edge_fleet_model_output_drift_psi",
        "PSI of the device's live predictions against the training sample's.",
        labels=MODEL,
    )
    for d in devices:
        for name, h in ((d.health or {}).get("models") or {}).items():
            drift = h.get("drift") if isinstance(h, dict) else None
            if not isinstance(drift, dict):
                continue
            labels = [d.device, d.fleet or "", name, str(drift.get("version") or "")]
            for item in drift.get("top") or []:
                if isinstance(item.get("psi"), int | float):
                    feature.add_metric([*labels, str(item["feature"])], float(item["psi"]))
            for family, value in (
                (score, drift.get("score")),
                (rest, (drift.get("rest") or {}).get("max_psi")),
                (output, drift.get("output_psi")),
            ):
                if isinstance(value, int | float):
                    family.add_metric(labels, float(value))
    yield from (feature, score, rest, output)


def _shadow_metrics(devices: list[DeviceState]) -> Iterator[Metric]:
    """A --shadow candidate against the active version, from the health ``shadow`` sections."""
    labels = [*MODEL, "candidate"]
    compared = GaugeMetricFamily(
        "edge_fleet_shadow_compared_rows",
        "Rows the device's active version and shadow candidate both answered.", labels=labels,
    )  # fmt: skip
    agreement = GaugeMetricFamily(
        "edge_fleet_shadow_agreement",
        "Share of compared rows where the candidate gave the active version's label.",
        labels=labels,
    )
    error = GaugeMetricFamily(
        "edge_fleet_shadow_abs_error_p99",
        "p99 of the absolute difference of the candidate's number (regressors).", labels=labels,
    )  # fmt: skip
    for d in devices:
        for name, h in ((d.health or {}).get("models") or {}).items():
            shadow = h.get("shadow") if isinstance(h, dict) else None
            if not isinstance(shadow, dict):
                continue
            key = [d.device, d.fleet or "", name, str(shadow.get("against") or ""),
                   str(shadow.get("version") or "")]  # fmt: skip
            if isinstance(shadow.get("compared"), int | float):
                compared.add_metric(key, float(shadow["compared"]))
            if isinstance(shadow.get("agreement"), int | float):
                agreement.add_metric(key, float(shadow["agreement"]))
            p99 = (shadow.get("error") or {}).get("p99")
            if isinstance(p99, int | float):
                error.add_metric(key, float(p99))
    yield from (compared, agreement, error)


def _canary_metrics(devices: list[DeviceState]) -> Iterator[Metric]:
    """Both arms of a traffic split, from the health ``canary`` sections
    (agent/wire/canary.py): ``version`` is the arm's, ``arm`` is active or canary."""
    labels = [*MODEL, "arm"]
    requests = GaugeMetricFamily(
        "edge_fleet_canary_requests",
        "Requests each arm of a device's traffic split ran since the split began.",
        labels=labels,
    )
    error_rate = GaugeMetricFamily(
        "edge_fleet_canary_error_rate",
        "The model's failures per request in each arm of a traffic split.", labels=labels,
    )  # fmt: skip
    p99 = GaugeMetricFamily(
        "edge_fleet_canary_p99_seconds",
        "p99 latency of each arm of a traffic split since it began.", labels=labels,
    )  # fmt: skip
    traffic = GaugeMetricFamily(
        "edge_fleet_canary_traffic_percent",
        "Percent of the device's requests the canary version serves.", labels=MODEL,
    )  # fmt: skip
    for d in devices:
        for name, h in ((d.health or {}).get("models") or {}).items():
            split = h.get("canary") if isinstance(h, dict) else None
            if not isinstance(split, dict):
                continue
            dev = [d.device, d.fleet or "", name]
            if isinstance(split.get("traffic"), int | float):
                traffic.add_metric([*dev, str(split.get("version") or "")], float(split["traffic"]))
            for arm, figures in (split.get("arms") or {}).items():
                if not isinstance(figures, dict):
                    continue
                key = [*dev, str(figures.get("version") or ""), str(arm)]
                for family, value, scale in (
                    (requests, figures.get("requests"), 1.0),
                    (error_rate, figures.get("error_rate"), 1.0),
                    (p99, figures.get("p99_ms"), 1000.0),
                ):
                    if isinstance(value, int | float):
                        family.add_metric(key, float(value) / scale)
    yield from (traffic, requests, error_rate, p99)
