"""Every Prometheus metric, defined once. Labels stay few and never carry a subject id."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Values of acroscreen_frames_skipped's `policy` label: why an acknowledged frame was not analysed.
SKIPPED_FOR_INTERVAL = "analysis_interval"  # another frame of its analysis interval looked sharper
SKIPPED_BACKLOG_FULL = "backlog_full"  # analysis was behind on a live stream
SKIPPED_AT_CAP = "max_analyzed_frames"  # the stream's own cap on analysed frames was reached
SKIPPED_STREAM_ENDED = "stream_ended"  # the stream was cancelled before the frame was analysed
STAGES = ("preview", "scene_check", "decode", "detect", "landmarks", "quality", "face_analysis", "warp", "queue_wait", "infer", "end_to_end")


class Metrics:
    """A registry of its own per server, so several servers (tests) never collide."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames_received = Counter(
            "acroscreen_frames_received", "Frames received on streams and in image requests", registry=r
        )
        self.frames_analyzed = Counter("acroscreen_frames_analyzed", "Frames that got a prediction", registry=r)
        self.frames_rejected = Counter(
            "acroscreen_frames_rejected", "Frames rejected, by reason", ["reason"], registry=r
        )
        self.frames_skipped = Counter(
            "acroscreen_frames_skipped", "Frames acknowledged but not analysed, by policy", ["policy"], registry=r
        )
        self.faces_detected = Counter("acroscreen_faces_detected", "Faces seen by the detector", registry=r)
        self.active_streams = Gauge("acroscreen_active_streams", "Streams open now", registry=r)
        self.subjects_completed = Counter(
            "acroscreen_subjects_completed", "Final subject results, by predicted score", ["predicted_score"], registry=r
        )
        self.stage_seconds = Histogram(
            "acroscreen_stage_seconds", "Time spent per pipeline stage", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "acroscreen_inference_batch_size", "Faces per model batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "acroscreen_queue_depth", "Items waiting, by queue", ["queue"], registry=r
        )
        self.model_ready = Gauge("acroscreen_model_ready", "1 when the model is loaded and warmed up", registry=r)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for queue in ("analysis", "inference"):
            self.queue_depth.labels(queue=queue)


class ProcessesSum(Collector):
    """The supervisor's /metrics with `--workers N`: every process's metrics, added up.

    Counters and histograms add up; so do the gauges (streams open, queue depths), except
    `acroscreen_model_ready`, which is the least of them and 0 until all `expected`
    processes have reported their metrics port: ready only when every process is. A
    process that does not answer fails the scrape rather than show a partial sum.
    """

    def __init__(self, urls: Callable[[], Sequence[str]], expected: int) -> None:
        self._urls = urls
        self._expected = expected

    def collect(self) -> Iterator[Metric]:
        urls = list(self._urls())
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for url in urls:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            for family in text_string_to_metric_families(text):
                if family.name.endswith("_created"):  # creation times do not add up
                    continue
                families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged = values.setdefault(family.name, {})
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if family.name == "acroscreen_model_ready":
                        merged[key] = min(merged.get(key, sample.value), sample.value)
                    else:
                        merged[key] = merged.get(key, 0.0) + sample.value
        if len(urls) < self._expected and "acroscreen_model_ready" in values:
            values["acroscreen_model_ready"] = {key: 0.0 for key in values["acroscreen_model_ready"]}
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family
        if "acroscreen_model_ready" not in families:  # no process has reported yet
            yield GaugeMetricFamily("acroscreen_model_ready", "1 when the model is loaded and warmed up", value=0.0)
