"""A stored endpoint's secrets never show in its repr, nor in that of a request claimed for it (what a log line, an
error or a test's failure message would print)."""

from __future__ import annotations

from numprotect.events.v1 import events_pb2 as pb
from numprotect.services.events.dispatcher import ClaimedEvent, ClaimedRequest
from numprotect.services.events.endpoints import StoredEndpoint, new_secret


def test_secrets_are_not_in_the_repr() -> None:
    endpoint = pb.Endpoint(tenant_id="t-repr", endpoint_id="ep_" + "a" * 26, url="https://a.example/h")
    stored = StoredEndpoint(endpoint, new_secret(), new_secret(), 10**13)
    request = ClaimedRequest(stored, 1, (ClaimedEvent("1-0", "evt_" + "b" * 26, "binding.created", b"{}", 1),))
    for text in (repr(stored), repr(request), str(stored)):
        assert "whsec_" not in text, text
        assert stored.secret not in text and stored.previous_secret not in text
    assert "ep_" + "a" * 26 in repr(stored)  # still says which endpoint it is
