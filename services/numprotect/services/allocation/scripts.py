"""The allocation service's Lua scripts: each pool script is its own file with pool_lib.lua prepended."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from numprotect.core.identity.directory import RECORD_BLOCK_CARRIER
from numprotect.core.redis_client import LuaScript

_PRELUDE = "pool_lib.lua"


def pool_script(name: str) -> LuaScript:
    """`lua/<name>` with the shared prelude (key layout, pruning, history) in front, evaluated by SHA."""
    script = LuaScript.beside(__file__, name)
    prelude = LuaScript.beside(__file__, _PRELUDE)
    script.source = prelude.source + "\n" + script.source
    script.sha = hashlib.sha1(script.source.encode()).hexdigest()
    return script


@dataclass(frozen=True)
class Scripts:
    """Every script, loaded once per servicer (no module-level state)."""

    allocate: LuaScript
    confirm: LuaScript
    cancel: LuaScript
    replace: LuaScript
    release: LuaScript
    lock: LuaScript
    unlock: LuaScript
    number_info: LuaScript
    pool_stats: LuaScript
    import_block: LuaScript
    claim_block: LuaScript
    # The carrier table's script (shared schema: numprotect.core.identity.directory).
    record_block_carrier: LuaScript

    @classmethod
    def load(cls) -> Scripts:
        return cls(
            allocate=pool_script("allocate.lua"),
            confirm=pool_script("confirm.lua"),
            cancel=pool_script("cancel.lua"),
            replace=pool_script("replace.lua"),
            release=pool_script("release.lua"),
            lock=pool_script("lock.lua"),
            unlock=pool_script("unlock.lua"),
            number_info=pool_script("number_info.lua"),
            pool_stats=pool_script("pool_stats.lua"),
            import_block=pool_script("import_block.lua"),
            claim_block=LuaScript.beside(__file__, "claim_block.lua"),
            record_block_carrier=LuaScript.from_source("record_block_carrier", RECORD_BLOCK_CARRIER),
        )
