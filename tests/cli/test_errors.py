"""Failed calls: one line on stderr with the status name, its message and its google.rpc details; the exit
status is the code's number; a usage error and a configuration problem have their own statuses; never a
traceback."""

from __future__ import annotations

from .conftest import BLOCK, StackFactory

UNKNOWN_NUMBER = "700999999990000"  # a well-formed 700 number in no pool


async def test_not_found_is_one_line_and_exit_status_5(stack: StackFactory) -> None:
    async with stack() as s:
        result = await s.cli("numbers", "get", UNKNOWN_NUMBER)
    assert result.exit_code == 5
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"numprotect: NOT_FOUND: {UNKNOWN_NUMBER} is in no imported block (ResourceInfo ")
    assert "Traceback" not in result.stderr


async def test_invalid_argument_names_the_field_from_the_bad_request_details(stack: StackFactory) -> None:
    async with stack() as s:
        result = await s.cli("numbers", "get", "12345")
    assert result.exit_code == 3
    (line,) = result.stderr.splitlines()
    assert line.startswith("numprotect: INVALID_ARGUMENT: ")
    assert line.endswith("(BadRequest virtual_number: must be a 15-digit 700 number (^700\\d{12}$))")


async def test_a_tenant_key_on_an_operator_rpc_is_permission_denied(stack: StackFactory) -> None:
    async with stack() as s:
        result = await s.cli("--context", "tenant", "numbers", "lock", f"{BLOCK}0001", "--reason", "fraud")
        denied_key = await s.cli("--context", "tenant", "keys", "list")
    for outcome in (result, denied_key):
        assert outcome.exit_code == 7, outcome.stderr
        (line,) = outcome.stderr.splitlines()
        assert line.startswith("numprotect: PERMISSION_DENIED: the tenant role may not call ")
        assert line.endswith("(ErrorInfo reason=ROLE_NOT_ALLOWED domain=numprotect)")
        assert s.tenant_token not in outcome.stderr + outcome.stdout


async def test_unreachable_service_is_unavailable_within_the_timeout(stack: StackFactory) -> None:
    async with stack() as s:
        moved = await s.cli(
            "config",
            "set-context",
            "gone",
            "--host",
            "127.0.0.1",
            "--allocation",
            "127.0.0.1:1",
            f"--ca-file={s.allocation.environ['NUMPROTECT_TLS_CA_FILE']}",
        )
        assert moved.exit_code == 0
        result = await s.cli("--context", "gone", "--timeout", "2", "numbers", "get", UNKNOWN_NUMBER)
    assert result.exit_code == 14
    assert result.stderr.startswith("numprotect: UNAVAILABLE: ")


async def test_usage_and_configuration_errors_have_their_own_statuses(stack: StackFactory) -> None:
    async with stack() as s:
        usage = await s.cli("numbers", "lock", f"{BLOCK}0001")  # --reason missing
        no_context = await s.cli("--context", "nope", "numbers", "get", UNKNOWN_NUMBER)
        bad_time = await s.cli("bindings", "trace", f"{BLOCK}0001", "--at", "yesterday")
    assert usage.exit_code == 64
    assert usage.stderr.startswith("numprotect: usage: ") and "--reason" in usage.stderr
    assert no_context.exit_code == 78
    assert no_context.stderr == f"numprotect: no context 'nope' in {s.config} (numprotect config get-contexts)\n"
    assert bad_time.exit_code == 64
    assert "--at" in bad_time.stderr
    for result in (usage, no_context, bad_time):
        assert len(result.stderr.splitlines()) == 1
        assert "Traceback" not in result.stderr
