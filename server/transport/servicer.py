"""The gRPC servicer: converts wire messages to domain values and back, nothing more."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc
from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc

from ..errors import AcroscreenError, InvalidRequest, NotReady
from ..logs import current_request_id, in_this_call, subject_hash
from ..service.screening import ScreeningService, check_image_count
from ..service.session import StreamSession
from ..service.types import FrameAck, FramePrediction
from . import convert
from .auth import principal_of
from .errors import REQUEST_ID_KEY
from .workers import WorkerIdentity

log = logging.getLogger(__name__)


class ScreeningServicer(pb_grpc.ScreeningServicer):
    """Answers UNAVAILABLE until `attach()` hands it the service (the model is loaded). Calls reach it
    once their first message came (transport.admission)."""

    def __init__(self, worker: WorkerIdentity) -> None:
        self._worker = worker
        self._attached: ScreeningService | None = None

    def attach(self, service: ScreeningService) -> None:
        self._attached = service

    @property
    def _service(self) -> ScreeningService:
        if self._attached is None:
            raise NotReady("the model is still loading")
        return self._attached

    def ScreenStream(
        self, request_iterator: Iterator[pb.ScreenRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ScreenResponse]:
        principal = principal_of(context.invocation_metadata())
        first = next(request_iterator, None)
        if first is None:
            raise InvalidRequest("empty stream: the first message must carry options")
        options = convert.first_options(first)
        # The session's worker thread starts in a copy of this context, so its log lines name the call.
        session = self._service.open_stream(options, principal)
        try:
            yield from self._screen(request_iterator, context, session, principal)
        finally:
            session.close()  # a call that ended before its answers were read gives its slot back too

    def _screen(
        self, request_iterator: Iterator[pb.ScreenRequest], context: grpc.ServicerContext, session: StreamSession,
        principal: str,
    ) -> Iterator[pb.ScreenResponse]:
        with self._worker.stream():  # counted before the metadata that reports it
            # Initial metadata marks the stream accepted, sent at once and whatever else holds: clients
            # send no frame before it (they wait ACCEPTANCE_WAIT_S at most), so a refusal (model
            # loading, draining, too many streams) never races a frame being written.
            self._send_initial_metadata(context)
            log.info("stream opened", extra={"subject": subject_hash(session.options.subject_id), "caller": principal})
            context.add_callback(session.cancel)
            reader = _StreamReader(request_iterator, session)
            reader.start()
            try:
                for event in session.events():
                    if isinstance(event, FramePrediction):
                        yield convert.frame_result(event)
                    elif isinstance(event, FrameAck):
                        yield convert.frame_ack(event)
                    else:
                        yield pb.ScreenResponse(subject=convert.subject_result(event))
            finally:
                ended_by = reader.error or session.ended_by
                log.info("stream closed", extra={"error": type(ended_by).__name__ if ended_by else None})
            # No join: a stream finished by a limit or by idling may still have a reader
            # blocked on the client; ending the call releases it.
            if ended_by is not None:
                raise ended_by

    def ScreenImages(self, request: pb.ScreenImagesRequest, context: grpc.ServicerContext) -> pb.SubjectResult:
        self._send_initial_metadata(context)
        check_image_count(len(request.images))  # before a million of them are converted
        frames = [convert.frame_input(image) for image in request.images]
        principal = principal_of(context.invocation_metadata())
        # The call ends early when the caller cancels, disconnects or runs out of deadline.
        result = self._service.screen_images(
            convert.session_options(request.options), frames, principal, on_call_end=context.add_callback
        )
        return convert.subject_result(result)

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        info = convert.model_info(self._service.model_info)
        self._send_initial_metadata(context)
        return info

    def _send_initial_metadata(self, context: grpc.ServicerContext) -> None:
        """Sends the initial metadata now: the worker, and the call's request id (it always has
        one behind the error-mapping interceptor, which opens the scope)."""
        request_id = current_request_id()
        ids = () if request_id is None else ((REQUEST_ID_KEY, request_id),)
        context.send_initial_metadata((*self._worker.metadata(), *ids))


class _StreamReader(threading.Thread):
    """Reads requests so the response side never waits on the sender (and vice versa).

    Runs in a copy of the call's context: what it logs carries the call's request id.
    """

    def __init__(self, requests: Iterator[pb.ScreenRequest], session: StreamSession) -> None:
        super().__init__(name="acroscreen-reader", daemon=True)
        self._requests = requests
        self._session = session
        self._read_in_call = in_this_call(self._read)
        self.error: Exception | None = None

    def run(self) -> None:
        self._read_in_call()

    def _read(self) -> None:
        try:
            for request in self._requests:
                self._session.submit(convert.frame_of(request))
        except AcroscreenError as error:
            # A malformed message or a limit ends the stream, but what was already
            # received is still analysed and the final result sent before the error.
            self.error = error
            self._session.finish()
        except grpc.RpcError:
            self._session.cancel()  # the client cancelled or disconnected
        except Exception as error:  # noqa: BLE001 — re-raised on the handler thread, mapped there
            self.error = error
            self._session.cancel()
        else:
            self._session.finish()
