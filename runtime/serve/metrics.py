"""Prometheus metrics of the daemon (`edgeflow_*`, base units: seconds, frames, counts).

Stage latencies are histograms observed per flow field; counters and gauges are read from the
daemon at scrape time, so they are never out of step with `/status`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edgeflow.runtime.pipeline import STAGES

# Seconds: from 1 ms (a preprocessing step) to 5 s (an untuned CPU build at a large size).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The daemon's registry: `observe(result)` per flow field, `render()` for /metrics."""

    def __init__(self, daemon):
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram("edgeflow_stage_seconds", "Time per flow field in each pipeline stage",
                                       ["stage"], buckets=BUCKETS, registry=self.registry)
        self.latency_seconds = Histogram("edgeflow_latency_seconds",
                                         "Time from the capture of a frame to the end of its sinks",
                                         buckets=BUCKETS, registry=self.registry)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        self.registry.register(_DaemonCollector(daemon))

    def observe(self, result) -> None:
        for stage in STAGES:
            self.stage_seconds.labels(stage).observe(result.timings[stage] / 1e3)
        self.latency_seconds.observe(result.latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DaemonCollector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        s = self.daemon.status()
        src = s["source"]
        counters = [("edgeflow_frames", "Flow fields computed (frame pairs)", s["frames"]),
                    ("edgeflow_frames_dropped", "Frames dropped by the latest-frame-wins policy", s["dropped"]),
                    ("edgeflow_source_reconnects", "Successful reopens of a lost live source", src["reconnects"]),
                    ("edgeflow_source_failures", "Failed reads or opens of the source", src["failures"]),
                    ("edgeflow_stream_restarts", "Streams started again after a failure (a file source removed, ...)",
                     s["restarts"]),
                    ("edgeflow_previews_encoded", "Preview JPEGs encoded (once per flow field watched)",
                     s["previews_encoded"])]
        for name, doc, value in counters:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        gauges = [("edgeflow_source_up", "1 while the source delivers frames", float(src["up"])),
                  ("edgeflow_stream_ended", "1 once a file source has ended (serve --loop repeats it)",
                   float(s["state"] == "ended")),
                  ("edgeflow_healthy", "1 while /healthz answers 200", float(s["healthy"])),
                  ("edgeflow_pipeline_fps", "Flow fields per second leaving the pipeline (recent)",
                   s["fps"]["pipeline"]),
                  ("edgeflow_network_fps", "Flow fields per second the network alone would give (recent)",
                   s["fps"]["network"]),
                  ("edgeflow_mjpeg_clients", "Viewers of /stream.mjpg", s["viewers"]),
                  ("edgeflow_mjpeg_buffered_bytes", "Bytes written to MJPEG viewers and not yet sent",
                   s["mjpeg_buffered_bytes"]),
                  ("edgeflow_start_time_seconds", "Start of the daemon, Unix seconds", s["started"])]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        pkg, cv = s["package"], s["opencv"]
        info = GaugeMetricFamily("edgeflow_info", "The package served and the OpenCV loaded",
                                 labels=["model", "input", "precision", "target", "opencv", "gstreamer"])
        info.add_metric([str(pkg["model"]), pkg["input"], str(pkg["precision"]), str(pkg["target"]), cv["version"],
                         str(cv["gstreamer"]).lower()], 1.0)
        yield info
