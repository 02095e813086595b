"""Contexts, the way kubectl keeps them: named connection settings in one YAML file, one of them current.

The file is $NUMPROTECT_CONFIG or ~/.config/numprotect/config.yaml, written atomically with mode 600:

    current-context: local
    contexts:
      - name: local
        host: 127.0.0.1               # every service on its default port (50051 allocation and AdminService,
                                      # 50052 binding, 50053 translation, 50054 cdr, 50055 events) ...
        binding: 10.0.0.7:443         # ... unless the context names the service's own address
        ca-file: /abs/path/ca.pem     # the CA that signed the servers' certificates
        cert-file: /abs/path/me.pem   # mTLS: the client certificate and its key (optional)
        key-file: /abs/path/me.key
        token-file: /abs/path/op.token  # the API key's token: a file (mode 600) ...
        token-env: NUMPROTECT_TOKEN   # ... or the environment variable holding it (wins when set)
        server-name: numprotect.local # the name the server certificate carries, when not the address's host
        insecure: false               # plaintext (only for services run with NUMPROTECT_TLS=off)

The file holds paths and names, never a token.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from numprotect.cli.failures import EXIT_CONFIG, CliError

SERVICES = ("allocation", "binding", "translation", "cdr", "events")
DEFAULT_PORTS = MappingProxyType(
    {"allocation": 50051, "binding": 50052, "translation": 50053, "cdr": 50054, "events": 50055}
)
# AdminService (keys, audit) is served on allocation's port.
ADMIN_SERVICE_HOST = "allocation"
CONFIG_ENV = "NUMPROTECT_CONFIG"
CONTEXT_ENV = "NUMPROTECT_CONTEXT"
# What `make run` writes under its run directory (deploy/local/run_local.py).
RUN_DIR_CA = Path("dev") / "ca.pem"
RUN_DIR_OPERATOR_TOKEN = Path("dev") / "operator.token"


def default_config_path(environ: Mapping[str, str]) -> Path:
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "numprotect" / "config.yaml"


@dataclass(frozen=True)
class Context:
    """One context. Field names are the file's keys with '-' for '_'."""

    name: str
    host: str = ""
    allocation: str = ""
    binding: str = ""
    translation: str = ""
    cdr: str = ""
    events: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token_file: str = ""
    token_env: str = ""
    server_name: str = ""
    insecure: bool = False

    def address(self, service: str) -> str:
        explicit: str = getattr(self, service)
        if explicit:
            return explicit
        if self.host:
            return f"{self.host}:{DEFAULT_PORTS[service]}"
        raise CliError(f"context {self.name!r} has no address for {service} (set --host or --{service})")

    def token(self, environ: Mapping[str, str]) -> str | None:
        """The bearer token: from the environment variable `token_env` when set there, else from `token_file`."""
        if self.token_env and environ.get(self.token_env):
            return self._usable(environ[self.token_env].strip(), f"${self.token_env}")
        if not self.token_file:
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except UnicodeDecodeError as exc:
            raise CliError(f"context {self.name!r}: token file {self.token_file}: not UTF-8 text") from exc
        except OSError as exc:
            raise CliError(f"context {self.name!r}: token file {self.token_file}: {exc.strerror}") from exc
        if not token:
            raise CliError(f"context {self.name!r}: token file {self.token_file} is empty")
        return self._usable(token, f"token file {self.token_file}")

    def _usable(self, token: str, source: str) -> str:
        # gRPC refuses other characters in a header value with a bare "INTERNAL: Invalid metadata", as if the
        # server had failed; the token itself is never shown.
        if not all("!" <= character <= "~" for character in token):
            raise CliError(f"context {self.name!r}: {source} is not a token (printable ASCII without spaces)")
        return token

    def to_yaml(self) -> dict[str, Any]:
        """The context as written to the file: only the keys that are set."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items() if value not in ("", False)}

    @classmethod
    def from_yaml(cls, entry: object, source: Path) -> Context:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise CliError(f"{source}: every entry of contexts needs a name")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in entry.items():
            attribute = str(key).replace("-", "_")
            if attribute not in known:
                raise CliError(f"{source}: context {entry['name']!r}: unknown key {key!r}")
            wanted = bool if attribute == "insecure" else str
            if not isinstance(value, wanted):
                raise CliError(f"{source}: context {entry['name']!r}: {key} must be a {wanted.__name__}")
            values[attribute] = value
        return cls(**values)

    def updated(self, changes: Mapping[str, Any]) -> Context:
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


@dataclass
class ConfigFile:
    """The whole file: the contexts in order and the current one's name."""

    path: Path
    contexts: list[Context] = field(default_factory=list)
    current: str = ""

    @classmethod
    def load(cls, path: Path) -> ConfigFile:
        """The file's contents; an empty configuration when the file does not exist."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(path)
        except UnicodeDecodeError as exc:
            raise CliError(f"{path}: not UTF-8 text") from exc
        except OSError as exc:
            raise CliError(f"{path}: {exc.strerror}") from exc
        try:
            document = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise CliError(f"{path}: not YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(document, dict):
            raise CliError(f"{path}: expected a mapping with contexts and current-context")
        entries = document.get("contexts") or []
        if not isinstance(entries, list):
            raise CliError(f"{path}: contexts must be a list")
        current = document.get("current-context") or ""
        if not isinstance(current, str):
            raise CliError(f"{path}: current-context must be a name")
        return cls(path, [Context.from_yaml(entry, path) for entry in entries], current)

    def find(self, name: str) -> Context | None:
        return next((context for context in self.contexts if context.name == name), None)

    def get(self, name: str) -> Context:
        context = self.find(name)
        if context is None:
            raise CliError(f"no context {name!r} in {self.path} (numprotect config get-contexts)")
        return context

    def put(self, context: Context) -> None:
        for index, existing in enumerate(self.contexts):
            if existing.name == context.name:
                self.contexts[index] = context
                return
        self.contexts.append(context)

    def remove(self, name: str) -> None:
        self.get(name)
        self.contexts = [context for context in self.contexts if context.name != name]
        if self.current == name:
            self.current = ""

    def selected(self, override: str | None) -> Context:
        """The context a command uses: --context (or $NUMPROTECT_CONTEXT), else the current one."""
        name = override or self.current
        if not name:
            raise CliError(
                f"no context selected: {self.path} has no current-context "
                "(numprotect config set-context NAME ... then use-context NAME, or --context NAME)"
            )
        return self.get(name)

    def save(self) -> None:
        """Writes the file with mode 600 (its folder 700 when made here), replacing it in one step."""
        document: dict[str, Any] = {
            "current-context": self.current,
            "contexts": [context.to_yaml() for context in self.contexts],
        }
        text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(prefix=".config-", dir=self.path.parent)  # mode 600
            try:
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(text)
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise CliError(f"{self.path}: cannot write: {exc.strerror}", EXIT_CONFIG) from exc


def absolute(path: str | None) -> str | None:
    """A path as given on the command line, made absolute so the context works from any directory."""
    if path is None or path == "":
        return path
    return str(Path(path).expanduser().absolute())


def from_run_dir(run_dir: str) -> dict[str, Any]:
    """The settings of a context for the services of `make run` (whose run directory is `run_dir`)."""
    root = Path(run_dir).expanduser().absolute()
    return {
        "host": "127.0.0.1",
        "ca_file": str(root / RUN_DIR_CA),
        "token_file": str(root / RUN_DIR_OPERATOR_TOKEN),
    }
