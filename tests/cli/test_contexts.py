"""The config file: contexts written and read back (mode 600), the current one and overrides, the make-run
context, tokens never shown; a malformed file is one line and status 78. No service needed."""

from __future__ import annotations

import stat
from pathlib import Path

import yaml

from .conftest import invoke, write_secret

SECRET = "npk_0123456789abcdef_" + "S" * 43


def test_a_context_round_trips_through_the_file_with_mode_600(tmp_path: Path) -> None:
    config = tmp_path / "deep" / "config.yaml"
    token_file = write_secret(tmp_path / "op.token", SECRET)
    created = invoke(
        config,
        (
            "config",
            "set-context",
            "prod",
            "--host=np.example",
            "--binding=binding.np.example:443",
            f"--ca-file={tmp_path / 'ca.pem'}",
            f"--cert-file={tmp_path / 'me.pem'}",
            f"--key-file={tmp_path / 'me.key'}",
            f"--token-file={token_file}",
            "--server-name=numprotect.internal",
        ),
        None,
    )
    assert created.exit_code == 0, created.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    expected = {
        "name": "prod",
        "current": True,  # the first context becomes the current one
        "host": "np.example",
        "binding": "binding.np.example:443",
        "ca-file": str(tmp_path / "ca.pem"),
        "cert-file": str(tmp_path / "me.pem"),
        "key-file": str(tmp_path / "me.key"),
        "token-file": str(token_file),
        "server-name": "numprotect.internal",
    }
    assert invoke(config, ("config", "get-contexts", "-o", "json"), None).json() == [expected]

    # A second context; changing one setting keeps the others; use-context and --context / $NUMPROTECT_CONTEXT.
    assert invoke(config, ("config", "set-context", "staging", "--host=10.0.0.7", "--insecure"), None).exit_code == 0
    assert invoke(config, ("config", "set-context", "prod", "--host=np2.example"), None).exit_code == 0
    assert invoke(config, ("config", "current-context"), None).stdout == "prod\n"
    assert invoke(config, ("config", "use-context", "staging"), None).exit_code == 0
    assert invoke(config, ("config", "current-context"), None).stdout == "staging\n"
    assert invoke(config, ("--context", "prod", "config", "current-context"), None).stdout == "prod\n"
    assert invoke(config, ("config", "current-context"), {"NUMPROTECT_CONTEXT": "prod"}).stdout == "prod\n"
    listed = {c["name"]: c for c in invoke(config, ("config", "get-contexts", "-o", "json"), None).json()}
    assert listed["prod"] == {**expected, "host": "np2.example", "current": False}
    assert listed["staging"] == {"name": "staging", "current": True, "host": "10.0.0.7", "insecure": True}

    table = invoke(config, ("config", "get-contexts"), None)
    rows = [line for line in table.stdout.splitlines() if "prod" in line or "staging" in line]
    assert len(rows) == 2
    assert "*" in next(row for row in rows if "staging" in row)
    assert str(token_file) in table.stdout

    deleted = invoke(config, ("config", "delete-context", "staging"), None)
    assert deleted.exit_code == 0
    assert [c["name"] for c in invoke(config, ("config", "get-contexts", "-o", "json"), None).json()] == ["prod"]
    no_current = invoke(config, ("config", "current-context"), None)
    assert no_current.exit_code == 78
    assert no_current.stderr.startswith("numprotect: no context selected")
    assert yaml.safe_load(config.read_text())["contexts"][0]["host"] == "np2.example"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert SECRET not in config.read_text()


def test_the_make_run_context_reads_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "repo" / ".run"
    (run_dir / "dev").mkdir(parents=True)
    result = invoke(tmp_path / "c.yaml", ("config", "set-context", "local", f"--from-run-dir={run_dir}"), None)
    assert result.exit_code == 0
    (context,) = invoke(tmp_path / "c.yaml", ("config", "get-contexts", "-o", "json"), None).json()
    assert context == {
        "name": "local",
        "current": True,
        "host": "127.0.0.1",
        "ca-file": str(run_dir / "dev" / "ca.pem"),
        "token-file": str(run_dir / "dev" / "operator.token"),
    }


def test_tokens_are_never_shown(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    token_file = write_secret(tmp_path / "t", SECRET)
    outputs = [
        invoke(config, ("config", "set-context", "a", "--host=h", f"--token-file={token_file}"), None),
        invoke(config, ("config", "set-context", "b", "--host=h", "--token-env=NP_TOKEN"), {"NP_TOKEN": SECRET}),
        invoke(config, ("config", "get-contexts"), {"NP_TOKEN": SECRET}),
        invoke(config, ("config", "get-contexts", "-o", "json"), {"NP_TOKEN": SECRET}),
    ]
    assert all(result.exit_code == 0 for result in outputs)
    assert "$NP_TOKEN" in outputs[2].stdout
    for result in outputs:
        assert SECRET not in result.stdout + result.stderr
    assert SECRET not in config.read_text()


def test_a_malformed_file_is_one_line_and_status_78(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    for text, expected in (
        ("contexts: [\n", "not YAML"),
        ("contexts:\n  - name: a\n    colour: red\n", "unknown key 'colour'"),
        ("contexts:\n  - host: h\n", "needs a name"),
        ("- 1\n", "expected a mapping"),
    ):
        config.write_text(text)
        result = invoke(config, ("config", "get-contexts"), None)
        assert result.exit_code == 78, text
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"numprotect: {config}: ") and expected in line
    config.write_bytes(b"current-context: \xff\xfe\n")
    result = invoke(config, ("config", "get-contexts"), None)
    assert (result.exit_code, result.stderr) == (78, f"numprotect: {config}: not UTF-8 text\n")


def test_a_token_that_is_not_one_is_status_78_before_any_call_and_never_shown(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    unusable = {
        "spaces": b"npk_0123 4567",
        "crlf": f"{SECRET}\r\nsecond line\n".encode(),
        "non-ascii": f"{SECRET}€".encode(),
        "not-utf8": b"\xff\xfe" + SECRET.encode(),
    }
    for name, content in unusable.items():
        (tmp_path / name).write_bytes(content)
        made = invoke(config, ("config", "set-context", name, "--allocation=127.0.0.1:1", "--insecure",
                               f"--token-file={tmp_path / name}"), None)  # fmt: skip
        assert made.exit_code == 0, made.stderr
    invoke(config, ("config", "set-context", "env", "--allocation=127.0.0.1:1", "--insecure", "--token-env=NP_T"), None)
    for name in [*unusable, "env"]:
        result = invoke(config, ("--context", name, "keys", "list"), {"NP_T": f"{SECRET}\u00e9"})
        assert result.exit_code == 78, (name, result.stderr)  # a local problem, not gRPC's INTERNAL "Invalid metadata"
        (line,) = result.stderr.splitlines()
        source = "$NP_T" if name == "env" else f"token file {tmp_path / name}"
        problem = ": not UTF-8 text" if name == "not-utf8" else " is not a token (printable ASCII without spaces)"
        assert line == f"numprotect: context {name!r}: {source}{problem}"
        assert SECRET not in result.stdout + result.stderr
