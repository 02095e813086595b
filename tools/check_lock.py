"""Checks that requirements.lock matches the requirements files: every pin there, at the same version, with hashes.

`make lock` regenerates the lock (uv, from PyPI); this check needs no network, so `make lint` runs it everywhere.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct_pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line, following `-r other.txt` includes."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins.update(direct_pins(path.parent / line[3:].strip()))
        elif line:
            match = PIN.match(line)
            if match is None:
                raise SystemExit(f"{path.name}: not an exact pin (name==version): {line!r}")
            pins[normalized(match[1])] = match[2]
    return pins


def locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of every entry of a `--generate-hashes` lock."""
    entries: dict[str, tuple[str, int]] = {}
    current: str | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is not None:
            current = normalized(match[1])
            entries[current] = (match[2], 0)
        elif line.startswith("--hash=sha256:") and current is not None:
            version, hashes = entries[current]
            entries[current] = (version, hashes + 1)
    return entries


def problems(requirements: Path, lock: Path) -> list[str]:
    found: list[str] = []
    entries = locked(lock)
    for name, version in sorted(direct_pins(requirements).items()):
        if name not in entries:
            found.append(f"{name}=={version} is not in {lock.name}")
        elif entries[name][0] != version:
            found.append(f"{name}: {requirements.name} pins {version}, {lock.name} has {entries[name][0]}")
    found.extend(f"{name} has no --hash in {lock.name}" for name, (_, hashes) in sorted(entries.items()) if not hashes)
    return found


def main() -> int:
    found = [
        *problems(ROOT / "requirements-dev.txt", ROOT / "requirements.lock"),
        *problems(ROOT / "requirements.txt", ROOT / "requirements-runtime.lock"),
    ]
    for problem in found:
        print(f"lock files: {problem} (run `make lock`)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
