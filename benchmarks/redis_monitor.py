"""Redis commands counted on the wire: MONITOR on its own connection, each command attributed to the process whose
connection sent it (the connection's client port, found among the process's sockets in /proc), scripts named by the
SHA-1 of the repository's .lua files.

A command Redis runs inside a script is shown by MONITOR as `[<db> lua]` right after the EVALSHA that ran it; it is
counted apart ("inside scripts"), for the process that sent that EVALSHA.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import ROOT

# `+1700000000.123456 [0 127.0.0.1:54321] "EVALSHA" "4b1f..." "2" ...`; scripts' own commands show `[0 lua]`.
_LINE = re.compile(r"^\+(\d+\.\d+) \[\d+ ([^\]]+)\] (.*)$")
_ARGUMENT = re.compile(r'"((?:[^"\\]|\\.)*)"')
INSIDE_SCRIPTS = "lua"


@dataclass(frozen=True)
class Command:
    """One command as MONITOR showed it: when Redis ran it, who sent it (client address or "lua"), its words."""

    time: float
    client: str
    words: tuple[str, ...]

    @property
    def client_port(self) -> int | None:
        host, _, port = self.client.rpartition(":")
        return int(port) if host and port.isdigit() else None


def parse(line: str) -> Command | None:
    match = _LINE.match(line)
    if match is None:
        return None
    return Command(float(match.group(1)), match.group(2), tuple(_ARGUMENT.findall(match.group(3))))


class Monitor:
    """MONITOR over a raw socket read by a thread: every command the server runs from start() to stop()."""

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._sock: socket.socket | None = None
        self._lines: list[str] = []
        self._buffer = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._sock = socket.create_connection(self._address)
        self._sock.sendall(b"MONITOR\r\n")
        self._sock.settimeout(0.05)
        self._lines, self._buffer = [], b""
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, args=(self._sock,), daemon=True)
        self._thread.start()

    def _read(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                return
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\r\n")
            self._lines.extend(line.decode(errors="replace") for line in complete)

    def stop(self) -> list[Command]:
        """The commands seen since start() (the caller waits for the last replies to be shown before calling)."""
        assert self._thread is not None and self._sock is not None
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        return [command for command in map(parse, self._lines) if command is not None]


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` has open (its own processes: readable without privileges)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def client_ports(server_port: int) -> dict[int, int]:
    """Local port -> socket inode of every TCP connection to `server_port` on this host (IPv4 and IPv6)."""
    ports: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(remote.rsplit(":", 1)[1], 16) == server_port and inode:
                ports[int(local.rsplit(":", 1)[1], 16)] = inode
    return ports


def connection_owners(server_port: int, processes: dict[str, int]) -> dict[int, str]:
    """Client port -> name (of `processes`: name -> pid) for the connections to the server on `server_port`."""
    owner_of_inode = {inode: name for name, pid in processes.items() for inode in socket_inodes(pid)}
    return {port: owner_of_inode[inode] for port, inode in client_ports(server_port).items() if inode in owner_of_inode}


def script_names(root: Path = ROOT) -> dict[str, str]:
    """SHA-1 -> name of the scripts the repository's .lua files (under libs/ and services/) make: each file alone, and
    two files of one folder joined by a newline (a shared prelude in front of a script: "prelude+script"). A SHA
    not among them is shown by its first 10 characters."""
    names = {}
    for folder in ("libs", "services"):
        by_folder: dict[Path, list[Path]] = {}
        for path in sorted((root / folder).rglob("*.lua")):
            by_folder.setdefault(path.parent, []).append(path)
        for paths in by_folder.values():
            sources = {path.stem: path.read_text(encoding="utf-8") for path in paths}
            for stem, source in sources.items():
                names[_sha(source)] = stem
                for prelude, prelude_source in sources.items():
                    if prelude != stem:
                        names.setdefault(_sha(prelude_source + "\n" + source), f"{prelude}+{stem}")
    return names


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


@dataclass
class Tally:
    """What one sender ran: commands sent over the network by kind, in how many round trips, and how many commands
    its scripts ran."""

    sent: Counter[str] = field(default_factory=Counter)
    round_trips: int = 0  # requests on the network: a connection's commands sent together count once
    inside_scripts: int = 0


# Commands one connection sent together (a pipeline, or concurrent commands a client wrote at once) reach Redis in
# one read and run back to back: 5-13 us apart in the runs measured here; a command sent after the previous reply
# came back follows it by a loopback round trip and the client's own work (>= ~210 us from the services). Commands
# sent at once on two connections cannot be told apart this way (11 us to 500 us apart): only the client sees them.
PIPELINED_GAP_SECONDS = 50e-6


def tally(commands: list[Command], owners: dict[int, str], scripts: dict[str, str]) -> dict[str, Tally]:
    """Sender name -> Tally; senders not in `owners` are "other <address>". A command starts a new round trip
    unless the one before it (scripts' commands aside) came from the same connection less than PIPELINED_GAP_SECONDS
    after the last command Redis ran (its scripts' included)."""
    tallies: dict[str, Tally] = {}
    last_sender, last_client, last_time = "other", "", 0.0
    for command in commands:
        port = command.client_port
        if port is None and command.client.endswith(INSIDE_SCRIPTS):
            tallies.setdefault(last_sender, Tally()).inside_scripts += 1
            last_time = command.time
            continue
        sender = owners.get(port, f"other {command.client}") if port is not None else f"other {command.client}"
        counts = tallies.setdefault(sender, Tally())
        counts.sent[kind(command.words, scripts)] += 1
        if command.client != last_client or command.time - last_time >= PIPELINED_GAP_SECONDS:
            counts.round_trips += 1
        last_sender, last_client, last_time = sender, command.client, command.time
    return tallies


def kind(words: tuple[str, ...], scripts: dict[str, str]) -> str:
    """A command's name; EVALSHA with its script's name."""
    if not words:
        return "?"
    name = words[0].upper()
    if name == "EVALSHA" and len(words) > 1:
        return f"EVALSHA {scripts.get(words[1].lower(), words[1][:10])}"
    if name == "EVAL":
        return "EVAL (source)"
    return name
