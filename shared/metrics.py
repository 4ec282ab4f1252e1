"""What the gateway's and the workers' Prometheus pages have in common: the pool series and the format.

The gateway (gateway/metrics.py) and every worker (workers/metrics.py) each export only their own
process's series, so a `sum()` over targets is the fleet's figure; the connection pools are the one
kind of series both have, and they are written here so both name them alike.

`_created` series are switched off, process-wide: in the 0.0.4 text format prometheus-client
writes each counter's and histogram's creation time as a separate gauge (`x_created`), which
doubles the series for no use (Prometheus sees counter resets from the values themselves)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric

disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the format `generate_latest` writes

# pool_stats() keys (shared/bus.py, ChatClient.pool_stats) -> series name and help
POOL_SERIES = {
    "max_connections": ("voicepipe_pool_connections_max", "Connections the pool may hold at most."),
    "in_use": ("voicepipe_pool_connections_in_use", "Pool connections checked out now."),
    "created": ("voicepipe_pool_connections_open", "Pool connections held now, in use or idle."),
}


def pool_families(pools: Mapping[str, Mapping[str, int]], labels: Mapping[str, str] | None = None) -> Iterator[Metric]:
    """Gauges of this process's connection pools, labelled `pool` (`redis`, `llm_http`) and `labels`."""
    labels = dict(labels or {})
    names = [*labels, "pool"]
    for key, (name, help_) in POOL_SERIES.items():
        family = GaugeMetricFamily(name, help_, labels=names)
        for pool, stats in pools.items():
            if key in stats:
                family.add_metric([*labels.values(), pool], stats[key])
        yield family
