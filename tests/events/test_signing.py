"""Signatures of webhook requests, verified with the standardwebhooks library (what receivers use)."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from numprotect.services.events.signing import batch_body, message_id, signature, signed_headers

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OTHER = "whsec_" + base64.b64encode(b"another secret of 24 byt").decode()
BODY = b'{"id":"evt_a","type":"binding.created","timestamp":"2026-12-01T00:00:00.000Z","data":{"x":"\xc3\xa9"}}'


def test_the_signature_is_the_librarys() -> None:
    now = int(time.time())
    ours = signature(SECRET, "evt_a", now, BODY)
    theirs = Webhook(SECRET).sign("evt_a", datetime.fromtimestamp(now, tz=UTC), BODY.decode())
    assert ours == theirs
    # An unpadded secret decodes as the library decodes it.
    unpadded = SECRET.rstrip("=")
    assert signature(unpadded, "evt_a", now, BODY) == Webhook(unpadded).sign(
        "evt_a", datetime.fromtimestamp(now, tz=UTC), BODY.decode()
    )


def test_headers_verify_with_either_secret_during_a_rotation_and_not_with_another() -> None:
    now = int(time.time())
    headers = signed_headers([OTHER, SECRET], "evt_a", now, BODY)
    assert headers["webhook-id"] == "evt_a"
    assert headers["webhook-timestamp"] == str(now)
    assert headers["content-type"] == "application/json"
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(SECRET).verify(BODY, headers)["id"] == "evt_a"
    assert Webhook(OTHER).verify(BODY, headers)["id"] == "evt_a"
    only_new = signed_headers([OTHER], "evt_a", now, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, only_new)
    with pytest.raises(WebhookVerificationError):  # the body is covered
        Webhook(OTHER).verify(BODY + b" ", only_new)
    with pytest.raises(WebhookVerificationError):  # the id is covered
        Webhook(OTHER).verify(BODY, {**only_new, "webhook-id": "evt_b"})


def test_message_ids() -> None:
    assert message_id(["evt_a"], batched=False) == "evt_a"
    batch = message_id(["evt_a", "evt_b"], batched=True)
    assert batch.startswith("msg_") and len(batch) == 30
    assert batch == message_id(["evt_a", "evt_b"], batched=True)  # the same batch, the same id
    assert batch != message_id(["evt_b", "evt_a"], batched=True)
    assert message_id(["evt_a"], batched=True) != "evt_a"
    with pytest.raises(ValueError):
        message_id(["evt_a", "evt_b"], batched=False)
    assert batch_body([b'{"a":1}', b'{"b":2}']) == b'[{"a":1},{"b":2}]'
