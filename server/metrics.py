"""Every Prometheus metric, defined once. Labels stay few and never carry a subject id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("preview", "decode", "detect", "landmarks", "quality", "face_analysis", "warp", "queue_wait", "infer", "end_to_end")


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
