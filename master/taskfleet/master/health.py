"""The standard gRPC health service and server reflection, so load balancers and
grpcurl-style tools work with the master out of the box (no token needed: the
token interceptor guards only taskfleet's own services)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskfleet.v1 import tasks_pb2, worker_pb2

TASKFLEET_SERVICES = (
    tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
)


class Health:
    """The health service of one master: SERVING once ``serving`` is called,
    NOT_SERVING while its store is unreachable (``not_serving``), and for good
    once ``draining`` is."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        reflection.enable_server_reflection(
            (*TASKFLEET_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        """NOT_SERVING until ``serving`` is called again (ignored once draining)."""
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_all(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", *TASKFLEET_SERVICES):
            await self._servicer.set(service, status)

    async def draining(self) -> None:
        await self._servicer.enter_graceful_shutdown()
