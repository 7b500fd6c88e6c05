"""One model for every worker process: crops travel by pipe to one inference process.

With `--workers N` each worker decodes, detects, tracks and crops its own streams
(escaping one interpreter's GIL), but the model lives in one process, so the GPU
holds one CUDA context instead of N and batches span the streams of all workers.

Each worker has a pipe pair to the model process. A request is two messages, a
12-byte header (request id, owner key) and the crop's raw pixels (160×160×3 =
75 KiB); the answer is one message, the three probabilities or an error. A
cancel is one 4-byte message, the request id: a worker whose stream cancels a
crop forgets it at once (its place counts no more, a later answer is ignored)
and tells the model process, which cancels the crop in its batcher if it is
still queued (a crop already in a batch runs; no answer is sent for a cancelled
one). A pipe rather than shared memory: at 3,000 crops/s the two copies cost
about a fifth of a core (~30-35 µs a crop on each side here, with the pipe widened to
1 MiB), and there are no slots to manage, leak or corrupt. The model process's
`DynamicBatcher` keeps its queue policy: when full it sheds the oldest crop of the
stream (across all workers) with the most queued.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import struct
import threading
from collections.abc import Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from ..errors import INFERENCE_FAILED, AcroscreenError, ModelError, Overloaded
from ..runtime.card import ModelCard, card_from_metadata, card_to_metadata
from .batcher import DynamicBatcher
from .pipeline import Probabilities

log = logging.getLogger(__name__)

_REQUEST = struct.Struct("<IQ")  # request id, owner key (the stream, as the worker knows it)
# A reply says what it is in its fifth byte, never by its length (a failure's words could be any length).
_REPLY = struct.Struct("<IB")  # request id, what follows
_SCORED, _OVERLOADED, _FAILED = 0, 1, 2  # P(1), P(2), P(3) follow; or an Overloaded's or a ModelError's words
_RESULT = struct.Struct("<IB3f")
_CANCEL = struct.Struct("<I")  # request id (a message of this size on the requests pipe is a cancel)
MODEL_PROCESS_GONE = "the model process is gone"  # what waiting crops fail with; the cause is logged


PIPE_BYTES = 1 << 20  # Linux's limit for an unprivileged process (/proc/sys/fs/pipe-max-size)


def _widen(connection: Connection) -> None:
    """Room for a dozen crops in the pipe: with Linux's default 64 KiB a 75 KiB crop cannot be
    written until the model process's reader has run, so every send waited for it (measured here:
    median of 7 runs of 20,000 crops, a crop's send 52 → 36 µs of the worker's CPU, 118 → 68 µs wall). Elsewhere, or
    refused, the pipe keeps its default size."""
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


@dataclass(frozen=True, slots=True)
class ModelLink:
    """One worker's two pipes to the model process; each side uses its own two ends."""

    requests_out: Connection  # worker writes crops
    requests_in: Connection  # model process reads them
    results_out: Connection  # model process writes answers
    results_in: Connection  # worker reads them

    @classmethod
    def create(cls) -> ModelLink:
        requests_in, requests_out = multiprocessing.Pipe(duplex=False)
        results_in, results_out = multiprocessing.Pipe(duplex=False)
        _widen(requests_out)
        return cls(requests_out, requests_in, results_out, results_in)

    @property
    def worker_ends(self) -> tuple[Connection, Connection]:
        return self.requests_out, self.results_in

    @property
    def model_ends(self) -> tuple[Connection, Connection]:
        """Each process closes the other side's ends after fork, so that side's exit reads as EOF."""
        return self.requests_in, self.results_out


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What a server says about its model wherever the model runs: the card, the weights
    file's sha256 ("" for untrained weights) and the arithmetic (fp16, bf16, fp32 or int8)."""

    card: ModelCard
    sha256: str
    arithmetic: str

    def to_json(self) -> dict[str, object]:
        """For the model process's ready message; `from_json` reads it back in the supervisor."""
        return {"card": card_to_metadata(self.card), "sha256": self.sha256, "arithmetic": self.arithmetic}

    @classmethod
    def from_json(cls, message: dict[str, object]) -> ServedModel:
        return cls(card_from_metadata(message["card"]), str(message["sha256"]), str(message["arithmetic"]))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RemoteModel:
    """What a worker holds of the model process's model: the link, and what that process reported."""

    link: ModelLink
    model: ServedModel


class ModelProcessClient:
    """A worker's handle on the shared model: `submit` like `DynamicBatcher.submit`, one future per crop.

    At most `max_in_flight` crops wait for answers; beyond that a crop fails at once
    with Overloaded (the worker's share of the model queue is full). A cancelled
    future frees its place at once and is cancelled in the model process too. If the
    model process goes away, every waiting and later crop fails with ModelError.
    """

    def __init__(self, link: ModelLink, crop_shape: tuple[int, int, int], max_in_flight: int) -> None:
        self._link = link
        self._crop_bytes = int(np.prod(crop_shape))
        self._max_in_flight = max_in_flight
        self._pending: dict[int, Future[Probabilities]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._gone: str | None = None
        self._reader = threading.Thread(target=self._read_results, name="acroscreen-model-results", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._fail_all("the worker is stopping")
        self._link.requests_out.close()  # the model process sees EOF and forgets this worker
        self._reader.join(timeout=5.0)

    def submit(self, pixels: np.ndarray, owner: Hashable = None) -> Future[Probabilities]:
        if pixels.nbytes != self._crop_bytes or pixels.dtype != np.uint8:
            raise ValueError(f"crop of {pixels.nbytes} bytes ({pixels.dtype}), the model takes {self._crop_bytes} uint8")
        future: Future[Probabilities] = Future()
        with self._lock:
            if self._gone is not None:
                raise ModelError(self._gone)
            if len(self._pending) >= self._max_in_flight:
                raise Overloaded(f"this worker already has {self._max_in_flight} faces waiting for the model")
            request_id = next(self._ids) & 0xFFFFFFFF
            self._pending[request_id] = future
        try:
            with self._send_lock:
                self._link.requests_out.send_bytes(_REQUEST.pack(request_id, id(owner) & 0xFFFFFFFFFFFFFFFF))
                self._link.requests_out.send_bytes(np.ascontiguousarray(pixels).reshape(-1).data)  # 1-D: counted in bytes
        except OSError as error:
            log.error("sending a crop to the model process failed: %s: %s", type(error).__name__, error)
            self._fail_all(MODEL_PROCESS_GONE)
        future.add_done_callback(lambda done: self._forget_if_cancelled(request_id, done))
        return future

    def _forget_if_cancelled(self, request_id: int, future: Future[Probabilities]) -> None:
        if not future.cancelled():
            return
        with self._lock:
            if self._pending.get(request_id) is not future:
                return  # already answered, or failed with the link
            del self._pending[request_id]
        try:
            with self._send_lock:
                self._link.requests_out.send_bytes(_CANCEL.pack(request_id))
        except OSError:
            pass  # the link is gone: the reader fails everything else

    def _read_results(self) -> None:
        try:
            while True:
                message = self._link.results_in.recv_bytes()
                request_id, kind = _REPLY.unpack_from(message)
                with self._lock:
                    future = self._pending.pop(request_id, None)
                if future is None:
                    continue
                try:
                    if kind == _SCORED:
                        future.set_result(tuple(map(float, _RESULT.unpack(message)[2:])))  # type: ignore[arg-type]
                    else:
                        text = message[_REPLY.size :].decode("utf-8", "replace")
                        future.set_exception(Overloaded(text) if kind == _OVERLOADED else ModelError(text))
                except InvalidStateError:  # cancelled by its stream meanwhile
                    pass
        except (EOFError, OSError) as error:
            if self._gone is None:  # not this worker's own stop()
                log.error("the link to the model process closed: %s", type(error).__name__)
            self._fail_all(MODEL_PROCESS_GONE)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._gone = self._gone or reason
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                try:
                    future.set_exception(ModelError(reason))
                except InvalidStateError:
                    pass


class ModelProcessServer:
    """In the model process: one reader thread per worker feeds the shared batcher."""

    def __init__(
        self,
        links: list[ModelLink],
        batcher: DynamicBatcher[np.ndarray, Probabilities],
        crop_shape: tuple[int, int, int],
    ) -> None:
        self._links = links
        self._batcher = batcher
        self._crop_shape = crop_shape
        self._readers = [
            threading.Thread(target=self._serve_worker, args=(index,), name=f"acroscreen-worker-{index}", daemon=True)
            for index in range(len(links))
        ]

    def start(self) -> None:
        for reader in self._readers:
            reader.start()

    @property
    def serving(self) -> bool:
        """False once every worker has closed its pipe (stopped or died)."""
        return any(reader.is_alive() for reader in self._readers)

    def _serve_worker(self, index: int) -> None:
        link = self._links[index]
        send_lock = threading.Lock()
        expected = int(np.prod(self._crop_shape))

        def send(message: bytes) -> None:
            try:
                with send_lock:
                    link.results_out.send_bytes(message)
            except OSError:
                pass  # the worker is gone; its reader below ends on EOF

        def failure(request_id: int, error: BaseException) -> bytes:
            """Our own errors keep their words; anything else was logged by the batcher and is sent as INFERENCE_FAILED."""
            text = str(error) if isinstance(error, AcroscreenError) else INFERENCE_FAILED
            return _REPLY.pack(request_id, _OVERLOADED if isinstance(error, Overloaded) else _FAILED) + text.encode()

        queued: dict[int, Future[Probabilities]] = {}  # this worker's crops in the batcher, for cancels
        queued_lock = threading.Lock()

        def answer(request_id: int, done: Future[Probabilities]) -> None:
            with queued_lock:
                queued.pop(request_id, None)
            if done.cancelled():
                return  # the worker cancelled it and forgot it
            error = done.exception()
            send(_RESULT.pack(request_id, _SCORED, *done.result()) if error is None else failure(request_id, error))

        try:
            while True:
                header = link.requests_in.recv_bytes()
                if len(header) == _CANCEL.size:
                    with queued_lock:
                        cancelled = queued.get(_CANCEL.unpack(header)[0])
                    if cancelled is not None:
                        cancelled.cancel()  # False once in a batch: it runs, and its answer is ignored
                    continue
                request_id, owner = _REQUEST.unpack(header)
                pixels = link.requests_in.recv_bytes()
                if len(pixels) != expected:
                    send(failure(request_id, ModelError(f"crop of {len(pixels)} bytes, expected {expected}")))
                    continue
                crop = np.frombuffer(pixels, np.uint8).reshape(self._crop_shape)
                try:
                    future = self._batcher.submit(crop, owner=(index, owner))
                except Overloaded as error:  # the model is shutting down
                    send(failure(request_id, error))
                    continue
                with queued_lock:
                    queued[request_id] = future
                future.add_done_callback(lambda done, rid=request_id: answer(rid, done))
        except (EOFError, OSError):
            log.info("worker %d closed its link to the model process", index)
        with send_lock, contextlib.suppress(OSError):  # already closed if this process is going away
            link.results_out.close()  # so the worker's reader sees EOF too and its stop() need not wait
