"""`--output table|json`: a response printed as a rich table, or as the protobuf JSON mapping.

JSON is one document per command on stdout: the response message with the proto field names (as grpcurl prints
them), enums by name, timestamps in RFC 3339, fields at their default value included (a message field that is
unset, such as a timestamp never set, is left out); a listing with --all is one response message holding every page
(next_page_token empty). `cdrs watch` prints one document per line (JSON Lines) as records arrive.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

# Width of a table when stdout is not a terminal (a pipe, a file, a test): no cell is folded (a table is only as
# wide as its contents).
PIPE_WIDTH = 1000


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


OutputOption = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="table (for people) or json (the protobuf JSON mapping)")
]


def to_dict(message: Message) -> dict[str, Any]:
    # Fields at their default (false, 0, "", []) are printed too: every document of a type has the same keys.
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def to_json(message: Message, *, indent: int | None = 2) -> str:
    return json.dumps(to_dict(message), indent=indent, ensure_ascii=False)


def _enum_prefix(type_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type_name).upper() + "_"


def cell(message: Message, name: str) -> str:
    """One field of `message` as table text: enums without their type prefix, times in UTC, unset as empty."""
    descriptor = message.DESCRIPTOR.fields_by_name[name]
    value = getattr(message, name)
    if descriptor.is_repeated:
        if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            return ", ".join(json.dumps(to_dict(item), ensure_ascii=False) for item in value)
        return ", ".join(str(item) for item in value)
    if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        if not message.HasField(name):
            return ""
        full_name = value.DESCRIPTOR.full_name
        if full_name == "google.protobuf.Timestamp":
            moment = datetime.fromtimestamp(value.seconds + value.nanos / 1e9, UTC)
            return moment.strftime("%Y-%m-%d %H:%M:%S") + "Z"
        if full_name == "google.protobuf.Duration":
            return f"{value.seconds + value.nanos / 1e9:g}s"
        return json.dumps(to_dict(value), ensure_ascii=False)
    if descriptor.type == FieldDescriptor.TYPE_ENUM:
        enum_type = descriptor.enum_type
        assert enum_type is not None
        label = enum_type.values_by_number[value].name if value in enum_type.values_by_number else str(value)
        return label.removeprefix(_enum_prefix(enum_type.name))
    if descriptor.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    return str(value)


class Printer:
    """Prints to stdout in the chosen format."""

    def __init__(self, output: OutputFormat) -> None:
        self.output = output
        self.console = Console(soft_wrap=False, highlight=False)
        if not self.console.is_terminal:
            self.console.width = PIPE_WIDTH

    @property
    def json(self) -> bool:
        return self.output is OutputFormat.json

    def line(self, text: str) -> None:
        """A line of plain text (stdout, not rendered by rich)."""
        print(text, flush=True)

    def message_json(self, message: Message, *, indent: int | None = 2) -> None:
        self.line(to_json(message, indent=indent))

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[str]], *, title: str | None = None) -> None:
        table = Table(title=title, show_lines=False, header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def rows(self, items: Iterable[Message], columns: Sequence[str], *, title: str | None = None) -> None:
        """A table of messages, one row each, a column per named field (header: the field name, upper case)."""
        self.table(
            [column.upper() for column in columns],
            ([cell(item, column) for column in columns] for item in items),
            title=title,
        )

    def fields(self, message: Message, *, title: str | None = None, skip: Sequence[str] = ()) -> None:
        """One message as a two-column table: every field, set or not (unset shown empty)."""
        names = [f.name for f in message.DESCRIPTOR.fields if f.name not in skip]
        self.table(["FIELD", "VALUE"], ([name, cell(message, name)] for name in names), title=title)

    def listing(self, response: Message, items: str, columns: Sequence[str]) -> None:
        """A list response: JSON, the response message; table, a row per item, and on stderr how to go on."""
        if self.json:
            self.message_json(response)
            return
        self.rows(getattr(response, items), columns)
        next_page = getattr(response, "next_page_token", "")
        if next_page:
            note(f"more: --page-token {next_page} (or --all)")

    def show(self, message: Message, *, table: Message | None = None, title: str | None = None) -> None:
        """JSON: the whole response; table: `table` (a part of it, by default the response) field by field."""
        if self.json:
            self.message_json(message)
        else:
            self.fields(table if table is not None else message, title=title)


def note(text: str) -> None:
    """A remark for the person at the terminal (stderr: stdout stays parseable)."""
    print(text, file=sys.stderr, flush=True)
