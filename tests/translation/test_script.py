"""lua/translate.lua on its own: the reply shapes the servicers rely on, and refusal of unknown route formats."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ResponseError

from numprotect.core.clock import SystemClock
from numprotect.core.routes import caller_key
from numprotect.core.settings import Env
from numprotect.services.translation.blocklist import BlocklistView
from numprotect.services.translation.core import SCRIPT, Prepared, TranslationSettings, Translator
from numprotect.translation.v1 import translation_pb2 as pb

X = "700100000000001"
A = "13800000001"
B = "13900000002"

# The defaults, with a small per-caller limit and no per-binding one.
SETTINGS = TranslationSettings.from_env(
    Env({"NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "2", "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "0"})
)


def _anyone(virtual_number: str) -> None:
    """Authorizes every number (the carrier check is the servicer's, tested over gRPC)."""


def _prepared(translator: Translator, caller: str, called: str = X) -> Prepared:
    prepared = translator.prepare(pb.TranslateRequest(calling_number=caller, called_number=called), _anyone)
    assert isinstance(prepared, Prepared)
    return prepared


async def test_reply_shapes_and_counters(tr: Any, redis_sync: Any) -> None:
    translator = Translator(SETTINGS, BlocklistView(), SystemClock())
    await tr.put(tr.route("b1", tenant_id="t9", recording=False))
    prepared = _prepared(translator, A)
    assert all("{" + X + "}" in key for key in prepared.keys)  # one hash slot
    reply = await SCRIPT(tr.redis, prepared.keys, prepared.args)
    assert [r.decode() if isinstance(r, bytes) else r for r in reply] == [1, 0, "b1", "t9", B, "0"]
    assert redis_sync.get(f"np:rl:{{{X}}}:c:{A}") == b"1"
    assert 0 < redis_sync.pttl(f"np:rl:{{{X}}}:c:{A}") <= 60_000
    await SCRIPT(tr.redis, prepared.keys, prepared.args)
    limited = await SCRIPT(tr.redis, prepared.keys, prepared.args)
    assert limited[:2] == [2, pb.REJECT_REASON_RATE_LIMITED]
    assert translator.finish(prepared, limited).reject_reason == pb.REJECT_REASON_RATE_LIMITED

    missing = await SCRIPT(tr.redis, *_args(_prepared(translator, A, "700100000000009")))
    assert missing == [2, pb.REJECT_REASON_NO_BINDING]


async def test_an_unknown_route_format_is_an_error_not_a_decision(tr: Any, redis_sync: Any) -> None:
    redis_sync.set(caller_key(X, A), "b1|r9|t1|1|a|b|1|0|0|0")
    with pytest.raises(ResponseError, match="unknown route format"):
        await SCRIPT(tr.redis, *_args(_prepared(Translator(SETTINGS, BlocklistView(), SystemClock()), A)))


def _args(prepared: Prepared) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return prepared.keys, prepared.args
