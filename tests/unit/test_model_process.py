"""The shared model process's protocol: crops by pipe, answers by request id, failures to every waiter.

Both ends run here in one process (threads instead of forked processes); the pipes,
the batcher and the model are the real ones.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from acroscreen.server.errors import INFERENCE_FAILED, ModelError, Overloaded
from acroscreen.server.metrics import Metrics
from acroscreen.server.runtime.model import SeverityModel
from acroscreen.server.runtime.weights import untrained_weights
from acroscreen.server.service.batcher import BatcherConfig, DynamicBatcher
from acroscreen.server.service.model_process import ModelLink, ModelProcessClient, ModelProcessServer
from acroscreen.server.service.pipeline import model_batch_runner

SHAPE = (160, 160, 3)


@pytest.fixture(scope="module")
def model() -> SeverityModel:
    weights = untrained_weights(0)
    return SeverityModel(weights.net, weights.card, "cpu", "fp32")


def _serve(links: list[ModelLink], run, metrics: Metrics, **config) -> DynamicBatcher:
    batcher = DynamicBatcher(run, BatcherConfig(**config), metrics)
    batcher.start()
    ModelProcessServer(links, batcher, SHAPE).start()
    return batcher


def _one_worker(run, max_in_flight: int) -> tuple[ModelLink, ModelProcessClient, DynamicBatcher]:
    """One worker's client and a model side that runs every crop alone, at once."""
    link = ModelLink.create()
    batcher = _serve([link], run, Metrics(), max_batch_size=1, max_delay_ms=0)
    client = ModelProcessClient(link, SHAPE, max_in_flight=max_in_flight)
    client.start()
    return link, client, batcher


def test_crops_of_two_workers_share_batches_and_get_their_own_answers(model: SeverityModel) -> None:
    links = [ModelLink.create(), ModelLink.create()]
    metrics = Metrics()
    batcher = _serve(links, model_batch_runner(model.predict), metrics, max_batch_size=16, max_delay_ms=200)
    clients = [ModelProcessClient(link, SHAPE, max_in_flight=16) for link in links]
    for client in clients:
        client.start()
    crops = np.random.default_rng(1).integers(0, 256, (8, *SHAPE), dtype=np.uint8)
    futures = [clients[i % 2].submit(crop, owner=f"stream-{i % 3}") for i, crop in enumerate(crops)]
    answers = np.array([future.result(timeout=60) for future in futures])
    expected = model.predict(crops).probabilities
    np.testing.assert_allclose(answers, expected, atol=1e-4)  # each answer is its own crop's, in any order
    batch_count = metrics.batch_size.collect()[0].samples
    count = next(s.value for s in batch_count if s.name.endswith("_count"))
    assert count < 8  # crops of both workers went through the model together
    for client in clients:
        client.stop()
    batcher.stop()


def test_a_worker_full_of_waiting_crops_is_told_at_once() -> None:
    release = threading.Event()

    def slow(crops):
        release.wait(30)
        return [(1.0, 0.0, 0.0)] * len(crops)

    _link, client, batcher = _one_worker(slow, max_in_flight=2)
    crop = np.zeros(SHAPE, np.uint8)
    waiting = [client.submit(crop), client.submit(crop)]
    with pytest.raises(Overloaded, match="2 faces waiting"):
        client.submit(crop)
    release.set()
    assert [f.result(timeout=30) for f in waiting] == [(1.0, 0.0, 0.0)] * 2
    client.submit(crop).result(timeout=30)  # room again
    client.stop()
    batcher.stop()


def test_model_errors_reach_the_worker_and_a_lost_model_process_fails_every_crop() -> None:
    hold = threading.Event()

    def failing(crops):
        hold.wait(30)
        raise RuntimeError("CUDA error: an illegal memory access")

    link, client, batcher = _one_worker(failing, max_in_flight=8)
    crop = np.zeros(SHAPE, np.uint8)
    first = client.submit(crop)
    hold.set()
    with pytest.raises(ModelError) as failed:  # the exception's text stays in the model process's log
        first.result(timeout=30)
    assert str(failed.value) == INFERENCE_FAILED
    with pytest.raises(ValueError, match="the model takes"):
        client.submit(np.zeros((80, 80, 3), np.uint8))

    hold.clear()
    waiting = client.submit(crop)
    # The model process dies: the worker reads EOF where its answers come from. (Only that end is
    # closed here: closing the requests' end too would race the model side's reader, which closes
    # the answers' end itself when its input fails, and two threads closing one Connection at once
    # can close its descriptor twice, EBADF. The worker's stop() below ends that reader cleanly.)
    link.results_out.close()
    with pytest.raises(ModelError, match="model process is gone"):
        waiting.result(timeout=30)
    with pytest.raises(ModelError, match="model process is gone"):
        client.submit(crop)
    hold.set()
    client.stop()
    batcher.stop()


def test_a_cancelled_crop_frees_its_place_at_once_and_does_not_reach_a_busy_model() -> None:
    """The model is busy with crop 1; crop 2 waits in the model process's queue. Both are
    cancelled by their streams: each place is free again at once (crops 3 and 4 are taken,
    with room for two), crop 2 never runs, and crop 1's late answer is ignored."""
    running = threading.Event()
    release = threading.Event()
    seen: list[int] = []

    def slow(crops):
        seen.extend(int(crop[0, 0, 0]) for crop in crops)
        running.set()
        release.wait(30)
        return [(float(crop[0, 0, 0]), 0.0, 0.0) for crop in crops]

    link = ModelLink.create()
    metrics = Metrics()
    batcher = _serve([link], slow, metrics, max_batch_size=1, max_delay_ms=0)
    client = ModelProcessClient(link, SHAPE, max_in_flight=2)
    client.start()

    def crop(value: int) -> np.ndarray:
        return np.full(SHAPE, value, np.uint8)

    first = client.submit(crop(1))
    assert running.wait(30)  # the model holds crop 1
    second = client.submit(crop(2))
    assert second.cancel()
    third = client.submit(crop(3))  # would be Overloaded if crop 2 still held its place
    assert first.cancel()
    fourth = client.submit(crop(4))
    queue_depth = metrics.queue_depth.labels(queue="inference")
    deadline = time.monotonic() + 30
    while queue_depth._value.get() < 3 and time.monotonic() < deadline:  # 2 (cancelled), 3, 4 reached the batcher
        time.sleep(0.01)
    release.set()
    assert third.result(timeout=30) == (3.0, 0.0, 0.0)
    assert fourth.result(timeout=30) == (4.0, 0.0, 0.0)
    assert seen == [1, 3, 4]  # crop 2's cancel came before crop 3, so it was cancelled while queued
    client.submit(crop(5)).result(timeout=30)  # crop 1's answer was ignored and the link still works
    client.stop()
    batcher.stop()


def test_a_worker_writes_several_crops_before_the_model_process_reads() -> None:
    """The requests pipe holds a dozen crops, so a send does not wait for the model process's reader."""
    link = ModelLink.create()
    crop = np.zeros(SHAPE, np.uint8).reshape(-1)
    sent = threading.Event()

    def send() -> None:
        for _ in range(10):
            link.requests_out.send_bytes(crop.data)
        sent.set()

    threading.Thread(target=send, daemon=True).start()
    assert sent.wait(10.0), "sends blocked with nobody reading"
    received = [link.requests_in.recv_bytes() for _ in range(10)]
    assert all(len(r) == crop.nbytes for r in received)
