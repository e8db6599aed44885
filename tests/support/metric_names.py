"""The metric names the service exports, and the names PromQL expressions use, for checking
alerting rules and dashboards against each other."""

from __future__ import annotations

import re
from pathlib import Path

from billing_service.metrics import Metrics
from billing_service.storage.database import create_engine

# The charge metrics, written by the payments side of the service: the alerting rules and the
# runbooks name exactly these.
CHARGE_METRICS = frozenset(
    {
        "billing_charges_total",
        "billing_charges_pending",
        "billing_charge_oldest_pending_seconds",
        "billing_charges_needing_operator",
    }
)

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}
# A metric of ours in an expression: not a recording rule's name (those have colons), not a
# label (grpc_service, grpc_code: no metric of ours starts like them).
_METRIC = re.compile(r"(?<![\w:])((?:billing|grpc_server|process|python)_\w+)(?![\w:])")


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Every sample name a server's /metrics can show, labelled or not, seen or not yet."""
    metrics = Metrics()
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'metric-names.db'}")
    metrics.watch_pool(engine)
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def metric_names_in(expression: str) -> set[str]:
    return set(_METRIC.findall(expression))
