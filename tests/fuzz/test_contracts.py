"""Fuzzing every contract: every RPC of every service (read from the descriptors), called over TLS with a real key of
every role the policy lets call it, with random requests generated from its descriptor and with near-valid ones
(a valid request with one field changed). No answer may be INTERNAL or UNKNOWN (contracts.FORBIDDEN), every
INVALID_ARGUMENT names a field of the request, and afterwards every process is alive, SERVING, and its resident
memory has grown by less than RSS_GROWTH_LIMIT since the platform started.

Examples per RPC: NUMPROTECT_FUZZ_PROFILE (profiles.py). A failure shows the RPC, the role and the request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from fuzz.contracts import SERVED_BY, Rpc, all_rpcs, call, problems, shown
from fuzz.platform import Platform
from fuzz.profiles import FUZZ
from fuzz.requests import VALID
from fuzz.strategies import Strategies
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from numprotect.core.identity.policy import POLICY
from numprotect.core.identity.principal import Role

# Hypothesis warns when it describes a list at its limit (a thousand CDRs); the description is not used.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
RPCS = all_rpcs()
# Repeated fields the services bound, at their default settings: also tried with exactly that many and one more.
REPEATED_LIMITS = {
    "numprotect.cdr.v1.IngestCdrsRequest.records": 1000,  # NUMPROTECT_CDR_MAX_BATCH
    "numprotect.translation.v1.TranslateStreamRequest.requests": 1000,  # ..._TRANSLATION_STREAM_MAX_REQUESTS
    "numprotect.allocation.v1.AllocateNumberRequest.parties": 2,
    # allocation's MAX_BATCH_ITEMS
    "numprotect.allocation.v1.AllocateNumbersRequest.requests": 256,
    "numprotect.allocation.v1.ConfirmReservationsRequest.requests": 256,
    "numprotect.allocation.v1.CancelReservationsRequest.requests": 256,
}
STRATEGIES = Strategies(REPEATED_LIMITS)
# Resident memory a process may gain over the whole fuzz run: the allocator keeps up to ~50 MiB after 4-MiB
# messages (test_size_limits), a leak of 2 KiB per call shows over the long profile's 130,000 calls.
RSS_GROWTH_LIMIT = 256 * 1024 * 1024
# Near-valid requests that legitimately fail once the fuzzer has changed the state (the seeded number locked, a
# reservation confirmed...): their valid request may answer these instead of OK.
STATE_DEPENDENT = {
    "AllocationService.ImportBlock": {grpc.StatusCode.OK},
    "AllocationService.ReleaseNumber": {grpc.StatusCode.FAILED_PRECONDITION},
    "AllocationService.UnlockNumber": {grpc.StatusCode.FAILED_PRECONDITION},
}


def _ids(rpc: Rpc) -> str:
    return rpc.name


def requests_of(rpc: Rpc) -> st.SearchStrategy[Any]:
    """Random requests of `rpc`: one message, or a few for a client stream."""
    message = STRATEGIES.message_of(rpc.input)
    return st.lists(message, max_size=4) if rpc.method.client_streaming else message


def near_valid_of(rpc: Rpc, platform: Platform) -> st.SearchStrategy[Any]:
    base = VALID[rpc.name](platform)
    return STRATEGIES.near_valid_stream(base) if isinstance(base, list) else STRATEGIES.near_valid(base)


def fuzz(platform: Platform, rpc: Rpc, requests: st.SearchStrategy[Any]) -> Counter[str]:
    """Calls `rpc` with FUZZ's number of examples, each as one of its roles; returns the answers' codes counted."""
    codes: Counter[str] = Counter()

    @FUZZ
    @given(role=st.sampled_from(rpc.roles), request=requests)
    def one(role: Role, request: Message | Sequence[Message]) -> None:
        answer = call(platform.channel(rpc.process, role), rpc, request)
        codes[answer.code.name] += 1
        found = problems(rpc, answer)
        assert not found, f"{rpc.name} as {role.name}: {found}\nrequest:\n{shown(request)}"

    one()
    print(f"{rpc.name}: {sum(codes.values())} calls {dict(codes)}")
    return codes


def assert_platform_fine(platform: Platform) -> None:
    assert not platform.unhealthy(), platform.unhealthy()
    growth = platform.rss_growth()
    assert max(growth.values()) < RSS_GROWTH_LIMIT, f"resident memory grew (bytes): {growth}"


def test_every_rpc_is_served_has_a_policy_roles_and_a_valid_request() -> None:
    """A new RPC (or service) fails here until the fuzzer can reach it and has a valid request to start from."""
    assert len(RPCS) >= 44  # the six gRPC services of today (AdminService in allocation's process)
    for rpc in RPCS:
        assert rpc.method.containing_service.full_name in SERVED_BY, rpc.path
        assert rpc.path in POLICY, rpc.path
        assert rpc.roles, f"{rpc.path}: no role may call it"
        assert rpc.name in VALID, f"{rpc.name}: no valid request in fuzz/requests.py"
    assert set(VALID) == {rpc.name for rpc in RPCS}, "fuzz/requests.py names RPCs that do not exist"


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_strategies_cover_every_field_type() -> None:
    """Every field of every request (and of the messages inside) has a strategy: none raises."""
    for rpc in RPCS:
        STRATEGIES.message_of(rpc.input).example()


@pytest.mark.parametrize("rpc", RPCS, ids=_ids)
def test_valid_request_succeeds(platform: Platform, rpc: Rpc) -> None:
    """Where the near-valid strategies start from is valid: OK as the first role the RPC allows."""
    base = VALID[rpc.name](platform)
    role = next(r for r in (Role.TENANT, Role.CARRIER, Role.SERVICE, Role.OPERATOR) if r in rpc.roles)
    answer = call(platform.channel(rpc.process, role), rpc, base)
    allowed = {grpc.StatusCode.OK} | STATE_DEPENDENT.get(rpc.name, set())
    assert answer.code in allowed, f"{rpc.name} as {role.name}: {answer.code.name}: {answer.details}"
    assert not answer.stream_errors and not answer.rejected_fields and not answer.item_errors, answer


@pytest.mark.parametrize("rpc", RPCS, ids=_ids)
def test_random_requests(platform: Platform, rpc: Rpc) -> None:
    codes = fuzz(platform, rpc, requests_of(rpc))
    assert codes.total() >= (1 if not rpc.input.fields else min(20, FUZZ.max_examples)), codes
    assert_platform_fine(platform)


@pytest.mark.parametrize("rpc", RPCS, ids=_ids)
def test_near_valid_requests(platform: Platform, rpc: Rpc) -> None:
    codes = fuzz(platform, rpc, near_valid_of(rpc, platform))
    assert codes.total() >= (1 if not rpc.input.fields else min(20, FUZZ.max_examples)), codes
    assert_platform_fine(platform)
