"""Fault 6: overload. A burst of 5,000 concurrent GetBinding calls over one connection (HTTP/2 streams of one
channel), each with a 10 s deadline.

Required: past its capacity the service sheds load on purpose: every answer is OK, RESOURCE_EXHAUSTED or
UNAVAILABLE, within the caller's deadline, never CANCELLED (nor INTERNAL); it serves what it admits, and it serves
normally right after the burst.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
from google.protobuf import duration_pb2

from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.common.v1 import common_pb2
from support.chaos_load import Recorder, code_name
from support.chaos_run import Profile, report
from support.chaos_stack import CALL_DEADLINE_SECONDS, CITY, DEADLINE_MARGIN_SECONDS, TENANT, ChaosStack
from support.chaos_verify import Figures
from support.tls import client_credentials

SHED = {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
# Longer than the load's 2 s: one Python client takes seconds just to start and finish 5,000 calls on this
# machine, so with 2 s the client's own lag, not the service, would decide which calls miss their deadline.
BURST_DEADLINE_SECONDS = 10.0


async def test_a_burst_of_getbinding_over_one_connection_is_shed_never_cancelled(
    profile: Profile, stack: ChaosStack
) -> None:
    metadata = [("authorization", f"Bearer {stack.tokens['tenant']}")]
    recorder = Recorder()
    async with grpc.aio.secure_channel(stack.address("binding"), client_credentials()) as channel:
        binding = binding_pb2_grpc.BindingServiceStub(channel)
        created = await binding.CreateBinding(
            binding_pb2.CreateBindingRequest(
                tenant_id=TENANT,
                out_order_id=f"overload-{time.time_ns()}",
                mode=common_pb2.BINDING_MODE_AXB,
                party_a="13700000001",
                party_b="13700000002",
                ttl=duration_pb2.Duration(seconds=3600),
                city_code=CITY,
                user_consent=True,
            ),
            metadata=metadata,
            timeout=10,
        )
        request = binding_pb2.GetBindingRequest(binding_id=created.binding.binding_id, tenant_id=TENANT)
        await binding.GetBinding(request, metadata=metadata, timeout=10)  # the connection is up and warm

        async def one() -> None:
            start = time.monotonic()
            try:
                await binding.GetBinding(request, metadata=metadata, timeout=BURST_DEADLINE_SECONDS)
                recorder.add("GetBinding", "OK", start)
            except grpc.aio.AioRpcError as error:
                recorder.add("GetBinding", code_name(error), start, error.details() or "")

        recorder.mark("load_start")
        await asyncio.gather(*(one() for _ in range(profile.overload_calls)))
        recorder.mark("load_stop")
        after = await binding.GetBinding(request, metadata=metadata, timeout=CALL_DEADLINE_SECONDS)

    codes = Counter(a.code for a in recorder.answers)
    late = [a for a in recorder.answers if a.latency > BURST_DEADLINE_SECONDS + DEADLINE_MARGIN_SECONDS]
    row = Figures(
        fault=f"overload: {profile.overload_calls} concurrent GetBinding, one connection, {BURST_DEADLINE_SECONDS:g} s",
        load_seconds=recorder.marks["load_stop"] - recorder.marks["load_start"],
        calls=len(recorder.answers),
        unavailable=codes["UNAVAILABLE"],
        internal=codes["INTERNAL"] + codes["UNKNOWN"],
        forbidden=sum(codes[c] for c in codes if c not in SHED),
        late=len(late) + codes["DEADLINE_EXCEEDED"],
        unexpected=Counter({f"GetBinding:{c}": n for c, n in codes.items() if c not in SHED}),
        acknowledged=Counter(),
        lost=0,
        recovery_seconds=None,
        codes={"GetBinding": codes},
        slowest={"GetBinding": max(a.latency for a in recorder.answers)},
    )
    details = Counter(a.detail[:80] for a in recorder.answers if a.code not in ("OK",))
    report(row, f"  messages: {dict(details.most_common(4))}")
    problems: list[str] = []
    if set(codes) - SHED:
        problems.append(f"answers other than {sorted(SHED)}: { {c: n for c, n in codes.items() if c not in SHED} }")
    if late:
        problems.append(f"{len(late)} answers later than the deadline + {DEADLINE_MARGIN_SECONDS} s")
    if not codes["OK"]:
        problems.append("nothing was served")
    if after.binding.binding_id != created.binding.binding_id:
        problems.append("GetBinding after the burst did not answer the binding")
    problems += [f"log: {line}" for line in stack.unexpected_errors()[:3]]
    assert not problems, "\n".join([row.text(), *problems])
