"""The schedule RPCs of TaskService, a mixin so task_service.py keeps to tasks."""

from __future__ import annotations

from taskfleet.common import convert
from taskfleet.common.errors import InvalidArgument
from taskfleet.master.rpc import Context, unary
from taskfleet.master.runtime import MasterRuntime
from taskfleet.v1 import tasks_pb2

MAX_ID_CHARS = 200


class ScheduleRpcs:
    """CreateSchedule, ListSchedules, DeleteSchedule, PauseSchedule, ResumeSchedule."""

    _rt: MasterRuntime

    @unary
    async def CreateSchedule(
        self, request: tasks_pb2.CreateScheduleRequest, context: Context
    ) -> tasks_pb2.Schedule:
        if not request.HasField("schedule"):
            raise InvalidArgument("schedule: required")
        if not request.schedule.HasField("spec"):
            raise InvalidArgument("schedule.spec: required (the task each tick submits)")
        schedule = convert.schedule_from_proto(request.schedule)
        created = await self._rt.bridge.producers.run(self._rt.scheduler.create, schedule)
        return convert.schedule_to_proto(created)

    @unary
    async def ListSchedules(
        self, request: tasks_pb2.ListSchedulesRequest, context: Context
    ) -> tasks_pb2.ListSchedulesResponse:
        found = await self._rt.bridge.producers.run(self._rt.scheduler.list)
        return tasks_pb2.ListSchedulesResponse(
            schedules=[convert.schedule_to_proto(s) for s in found]
        )

    @unary
    async def DeleteSchedule(
        self, request: tasks_pb2.DeleteScheduleRequest, context: Context
    ) -> tasks_pb2.DeleteScheduleResponse:
        await self._rt.bridge.producers.run(self._rt.scheduler.delete, _schedule_id(request.id))
        return tasks_pb2.DeleteScheduleResponse()

    @unary
    async def PauseSchedule(
        self, request: tasks_pb2.PauseScheduleRequest, context: Context
    ) -> tasks_pb2.Schedule:
        schedule_id = _schedule_id(request.id)
        paused = await self._rt.bridge.producers.run(self._rt.scheduler.pause, schedule_id)
        return convert.schedule_to_proto(paused)

    @unary
    async def ResumeSchedule(
        self, request: tasks_pb2.ResumeScheduleRequest, context: Context
    ) -> tasks_pb2.Schedule:
        schedule_id = _schedule_id(request.id)
        resumed = await self._rt.bridge.producers.run(self._rt.scheduler.resume, schedule_id)
        return convert.schedule_to_proto(resumed)


def _schedule_id(schedule_id: str) -> str:
    if not schedule_id:
        raise InvalidArgument("id: must not be empty")
    if len(schedule_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"id: longer than {MAX_ID_CHARS} characters")
    return schedule_id
