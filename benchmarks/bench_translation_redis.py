"""Redis time per Translate: usec_per_call of EVALSHA (INFO commandstats) over 20,000 CONNECT translations.

Feeds docs/capacity.md (Redis cores per translation). Runs the real service in-process on a fresh redis-server.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import create_redis
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE, Route, RouteTable
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.translation.app import build_sync
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.inprocess import running_sync_service
from support.redis_server import RedisServer

NUMBERS = 1000
ROUNDS = 20


async def main() -> None:
    server = RedisServer()
    env = {
        "NUMPROTECT_REDIS_URL": server.url,
        "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "100000",
        "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "100000",
    }
    redis = create_redis(RedisSettings.from_env(Env(env)))
    try:
        table = RouteTable(redis)
        expire_ms = int(time.time() * 1000) + 3_600_000
        for i in range(NUMBERS):
            route = Route(
                f"b{i}", "t1", MODE_AXB, f"138{i:08d}", f"139{i:08d}", RESTRICTION_NONE, True, False, expire_ms
            )
            await table.put(f"7001000{i:08d}", route)
        admin = server.client()
        async with running_sync_service("translation", build_sync, env) as svc:
            # As deployed: a carrier's key, for the blocks it routes.
            svc.route("bench-carrier", *(f"7001000{i:08d}" for i in range(NUMBERS)))
            stub = translation_pb2_grpc.TranslationServiceStub(svc.channel_as(Role.CARRIER, "bench-carrier"))
            admin.config_resetstat()
            for round_ in range(ROUNDS):
                replies = await asyncio.gather(
                    *(
                        stub.Translate(
                            translation_pb2.TranslateRequest(
                                calling_number=f"138{i:08d}", called_number=f"7001000{i:08d}", call_id=f"c{round_}-{i}"
                            )
                        )
                        for i in range(NUMBERS)
                    )
                )
                if any(r.decision != translation_pb2.DECISION_CONNECT for r in replies):
                    raise SystemExit("a translation did not CONNECT")
            stats = admin.info("commandstats")["cmdstat_evalsha"]
        print(f"load average {os.getloadavg()[0]:.1f}")
        print(f"translations: {NUMBERS * ROUNDS}, EVALSHA calls: {stats['calls']}")
        print(f"Redis time per Translate (EVALSHA usec_per_call): {stats['usec_per_call']:.1f} us")
        print(f"=> one Redis core serves about {1e6 / stats['usec_per_call']:,.0f} translations/s")
    finally:
        await redis.aclose()
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
