"""Prometheus metrics of one coordinator (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.enrolled = Counter("panal_nodes_enrolled", "Nodes enrolled", registry=r)
        self.heartbeats = Counter("panal_heartbeats", "Heartbeats received", registry=r)
        self.updates = Counter("panal_updates", "Updates received, by verdict", ["status"], registry=r)
        self.round = Gauge("panal_round", "The open round of the running job", registry=r)
        self.round_seconds = Histogram(
            "panal_round_close_seconds", "Time to aggregate and publish a round", registry=r
        )
        self.quarantined = Counter(
            "panal_nodes_quarantined", "Nodes quarantined after repeated rejections", registry=r
        )
        self.update_score = Gauge(
            "panal_update_score",
            "Detection's scores of each pool's last verified update, by stage and score",
            ["pool", "stage", "score"],
            registry=r,
        )
        self.rpc_errors = Counter(
            "panal_rpc_errors", "Calls refused by the trust layer, by error", ["error"], registry=r
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (a daemon thread)."""
        start_http_server(port, addr=addr, registry=self.registry)
