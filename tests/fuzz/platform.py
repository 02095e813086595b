"""The whole platform as real processes for the fuzzer: allocation (with AdminService), binding, translation, cdr
and events, each `python -m numprotect.services.<name>` with TLS and API keys on one redis-server of its own, seeded
with a tenant's block, bindings, a reservation, a CDR, a blocklist entry and webhook endpoints so that valid
requests find something.

Processes, not in-process servers: a crash shows as an exited process instead of a dead test runner, and each
process's resident memory (/proc/<pid>/status) can be read before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.admin.v1 import admin_pb2, admin_pb2_grpc
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.identity.principal import Role
from numprotect.core.settings import SERVICE_NAMES
from numprotect.events.v1 import events_pb2, events_pb2_grpc
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.identity import mint
from support.processes import ServiceProcess
from support.redis_server import RedisServer
from support.tls import sync_secure_channel

TENANT = "t1"
CARRIER = "c1"
CITY = "010"
BLOCK = "70010000000"
SPARE_BLOCK = "70010000001"
PARTY_A = "13800000001"
PARTY_B = "13900000002"
PARTY_C = "13700000003"
BLOCKED_CALLER = "13600000004"
PROCESSES = SERVICE_NAMES
# Where the seeded endpoints point: loopback's discard port, where nothing listens (every delivery fails at once).
RECEIVER_URL = "http://127.0.0.1:9/hook"

# Who the fuzzer calls as: one key per role (the SERVICE key is binding's, the only service with peers).
PRINCIPALS: dict[Role, str] = {
    Role.OPERATOR: "",
    Role.TENANT: TENANT,
    Role.CARRIER: CARRIER,
    Role.REGULATOR: "",
    Role.SERVICE: "binding",
}

# Generous limits so that the fuzzer reaches validation and storage instead of the rate limiters.
PROCESS_ENV = {
    "NUMPROTECT_CREATE_BINDING_RATE": "100000",
    "NUMPROTECT_CREATE_BINDING_BURST": "100000",
    "NUMPROTECT_TRACE_NUMBER_RATE": "100000",
    "NUMPROTECT_TRACE_NUMBER_BURST": "100000",
    # events: endpoints on loopback over http (RECEIVER_URL).
    "NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8",
    "NUMPROTECT_EVENTS_ALLOW_HTTP": "on",
}


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def timestamp(seconds_from_now: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return stamp


@dataclass
class Seeded:
    """What the seeding made: ids a valid request needs."""

    virtual_number: str = ""
    binding_id: str = ""
    doomed_binding_id: str = ""  # DeleteBinding's valid target (the main binding stays)
    # One reservation per RPC that uses one up (ConfirmReservation, CancelReservation, ReplaceParty and the batch
    # forms ConfirmReservations, CancelReservations).
    reservations: dict[str, str] = field(default_factory=dict)
    spare_key_id: str = ""  # RevokeApiKey's valid target (never a key the fuzzer calls with)
    spare_number: str = SPARE_BLOCK + "0042"
    call_id: str = "fuzz-call-1"
    endpoint_id: str = ""
    doomed_endpoint_id: str = ""  # DeleteEndpoint's valid target (the main endpoint stays)


@dataclass
class Platform:
    redis: RedisServer
    processes: dict[str, ServiceProcess]
    tokens: dict[Role, str]
    seeded: Seeded = field(default_factory=Seeded)
    baseline_rss: dict[str, int] = field(default_factory=dict)
    _channels: dict[tuple[str, Role | None], grpc.Channel] = field(default_factory=dict)

    @classmethod
    def start(cls) -> Platform:
        redis = RedisServer()
        client = redis.client()
        tokens = {role: mint(client, role, principal) for role, principal in PRINCIPALS.items()}
        client.close()
        env = {"NUMPROTECT_REDIS_URL": redis.url, **PROCESS_ENV}
        processes: dict[str, ServiceProcess] = {}
        try:
            processes["allocation"] = ServiceProcess("allocation", env)
            peers = {"NUMPROTECT_ALLOCATION_ADDR": processes["allocation"].address}
            for name in PROCESSES[1:]:  # after allocation: binding needs its address, sip translation's
                processes[name] = ServiceProcess(name, {**env, **peers})
                peers[f"NUMPROTECT_{name.upper()}_ADDR"] = processes[name].address
            platform = cls(redis, processes, tokens)
            platform.seed()
            platform.wait_healthy()
        except BaseException:
            for process in processes.values():
                process.stop()
            redis.stop()
            raise
        platform.baseline_rss = platform.rss()
        return platform

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        for process in self.processes.values():
            process.stop()
        self.redis.stop()

    def channel(self, process: str, role: Role | None) -> grpc.Channel:
        """A TLS channel to `process` carrying `role`'s key (None: no key)."""
        key = (process, role)
        if key not in self._channels:
            token = None if role is None else self.tokens[role]
            self._channels[key] = sync_secure_channel(self.processes[process].address, token)
        return self._channels[key]

    def rss(self) -> dict[str, int]:
        return {name: rss_bytes(process.process.pid) for name, process in self.processes.items()}

    def rss_growth(self) -> dict[str, int]:
        now = self.rss()
        return {name: now[name] - self.baseline_rss[name] for name in now}

    def wait_healthy(self, within: float = 30.0) -> None:
        """Until every process answers SERVING: health re-checks once per NUMPROTECT_HEALTH_INTERVAL (1 s), so the
        SIP adapter turns SERVING up to a second after its first translation stream is up, and a test that asked at
        once would take the platform's start for a fault."""
        deadline = time.monotonic() + within
        while problems := self.unhealthy():
            assert time.monotonic() < deadline, f"the platform did not become healthy in {within:g} s: {problems}"
            time.sleep(0.1)

    def unhealthy(self) -> list[str]:
        """Processes that exited or do not answer SERVING (empty when all is well)."""
        problems = []
        for name, process in self.processes.items():
            if process.process.poll() is not None:
                tail = "\n".join(process.lines[-20:])
                problems.append(f"{name} exited with {process.process.returncode}:\n{tail}")
                continue
            try:
                reply = health_pb2_grpc.HealthStub(self.channel(name, None)).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            except grpc.RpcError as exc:
                problems.append(f"{name}: health check failed: {exc.code().name}")  # type: ignore[attr-defined]
                continue
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                problems.append(f"{name}: health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
        return problems

    def seed(self) -> None:
        """A tenant's two blocks (routed by CARRIER), two webhook endpoints, two bindings, a reservation, a spare key,
        a CDR, a block entry."""
        allocation: Any = allocation_pb2_grpc.AllocationServiceStub(self.channel("allocation", Role.OPERATOR))
        for block in (BLOCK, SPARE_BLOCK):
            allocation.ImportBlock(
                allocation_pb2.ImportBlockRequest(
                    block=block, tenant_id=TENANT, city_code=CITY, actor="fuzz", carrier_id=CARRIER
                ),
                timeout=10,
            )
        admin: Any = admin_pb2_grpc.AdminServiceStub(self.channel("allocation", Role.OPERATOR))
        spare = admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(role=admin_pb2.ROLE_TENANT, tenant_id=TENANT, description="fuzz spare"),
            timeout=10,
        )
        self.seeded.spare_key_id = spare.key.key_id
        events: Any = events_pb2_grpc.EventServiceStub(self.channel("events", Role.TENANT))
        for use in ("main", "doomed"):
            endpoint = events.CreateEndpoint(
                events_pb2.CreateEndpointRequest(tenant_id=TENANT, url=RECEIVER_URL, description=f"fuzz {use}"),
                timeout=10,
            ).endpoint
            if use == "main":
                self.seeded.endpoint_id = endpoint.endpoint_id
            else:
                self.seeded.doomed_endpoint_id = endpoint.endpoint_id
        binding: Any = binding_pb2_grpc.BindingServiceStub(self.channel("binding", Role.TENANT))
        time.sleep(0.3)  # the processes reload the blocks' carrier every 0.1 s (NUMPROTECT_AUTH_REFRESH_SECONDS)
        main = binding.CreateBinding(self.create_binding_request("fuzz-main"), timeout=10).binding
        doomed = binding.CreateBinding(self.create_binding_request("fuzz-doomed"), timeout=10).binding
        self.seeded.virtual_number = main.virtual_number
        self.seeded.binding_id = main.binding_id
        self.seeded.doomed_binding_id = doomed.binding_id
        reserving: Any = allocation_pb2_grpc.AllocationServiceStub(self.channel("allocation", Role.SERVICE))
        for use in ("confirm", "cancel", "replace", "confirm_batch", "cancel_batch"):
            reservation = reserving.AllocateNumber(
                allocation_pb2.AllocateNumberRequest(
                    tenant_id=TENANT,
                    mode=common_pb2.BINDING_MODE_AXB,
                    parties=[PARTY_A, PARTY_C],
                    city_code=CITY,
                    lease=Duration(seconds=600),
                ),
                timeout=10,
            )
            self.seeded.reservations[use] = reservation.reservation_id
        cdr: Any = cdr_pb2_grpc.CdrServiceStub(self.channel("cdr", Role.CARRIER))
        ingested = cdr.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[self.cdr_record()]), timeout=10)
        assert ingested.accepted == 1, ingested
        translation: Any = translation_pb2_grpc.TranslationServiceStub(self.channel("translation", Role.TENANT))
        translation.BlockCaller(
            translation_pb2.BlockCallerRequest(tenant_id=TENANT, calling_number=BLOCKED_CALLER, reason="fuzz"),
            timeout=10,
        )

    def create_binding_request(self, out_order_id: str) -> binding_pb2.CreateBindingRequest:
        return binding_pb2.CreateBindingRequest(
            tenant_id=TENANT,
            out_order_id=out_order_id,
            mode=common_pb2.BINDING_MODE_AXB,
            party_a=PARTY_A,
            party_b=PARTY_B,
            ttl=Duration(seconds=7200),
            city_code=CITY,
            call_restriction=common_pb2.CALL_RESTRICTION_NONE,
            user_consent=True,
        )

    def cdr_record(self, call_id: str | None = None) -> cdr_pb2.CallDetailRecord:
        return cdr_pb2.CallDetailRecord(
            call_id=call_id or self.seeded.call_id,
            binding_id=self.seeded.binding_id,
            tenant_id=TENANT,
            calling_number=PARTY_A,
            called_number=self.seeded.virtual_number,
            target_number=PARTY_B,
            display_number=self.seeded.virtual_number,
            call_type=cdr_pb2.CALL_TYPE_A_TO_PEER,
            call_time=timestamp(-60),
            ring_time=timestamp(-58),
            answer_time=timestamp(-55),
            release_time=timestamp(-5),
            release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
            release_cause=16,
            unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
            carrier_id=CARRIER,
        )
