"""Standard Webhooks signatures (docs/events.md, "Signing and verification").

A request carries `webhook-id`, `webhook-timestamp` (the attempt's time, s) and `webhook-signature`: one
`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` per signing secret, space-separated (the current secret's
first, then the previous one's while its rotation grace runs), so a receiver verifies with any Standard Webhooks
library. The HMAC is the one `standardwebhooks.Webhook.sign` computes (tests check one against the other), done here
on the body's bytes, without the library's round trip through str and datetime.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
CONTENT_TYPE = "application/json"
USER_AGENT = "numprotect-webhooks/1"
BATCH_ID_PREFIX = "msg_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a "whsec_<base64>" secret, decoded as the standardwebhooks library decodes it."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    return base64.b64decode(encoded + "==")  # tolerates unpadded base64, like the library


def signature(secret: str, message_id: str, timestamp_s: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` of "{message_id}.{timestamp_s}.{body}" with `secret`."""
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp_s, body)
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def message_id(event_ids: Sequence[str], *, batched: bool) -> str:
    """The webhook-id of a request: the event's own id ("evt_...") for a single event, the same on every attempt;
    for a batch (an endpoint with batch_size above 1), "msg_" + 26 base32 characters of a hash of its events' ids,
    so the same batch sent again has the same id (the events' own ids are in the body)."""
    if not batched:
        (event_id,) = event_ids
        return event_id
    digest = hashlib.sha256("|".join(event_ids).encode()).digest()
    return BATCH_ID_PREFIX + base64.b32encode(digest).decode()[:26].lower()


def signed_headers(secrets: Sequence[str], message_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """Every header of a webhook request: the three of Standard Webhooks (one signature per secret, in the order
    given), content-type and user-agent."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": " ".join(signature(secret, message_id, timestamp_s, body) for secret in secrets),
        "content-type": CONTENT_TYPE,
        "user-agent": USER_AGENT,
    }


def batch_body(payloads: Sequence[bytes]) -> bytes:
    """A batch's body: the JSON array of the events' single bodies, as they are."""
    return b"[" + b",".join(payloads) + b"]"
