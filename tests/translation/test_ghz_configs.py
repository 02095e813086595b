"""deploy/ghz/*.json: every config names an existing method and its data (templates filled) parses into the request."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool, json_format, message_factory

from numprotect.binding.v1 import binding_pb2  # noqa: F401  (registers the descriptors)
from numprotect.translation.v1 import translation_pb2  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "deploy" / "ghz").glob("*.json"))

# ghz template actions the configs use, with a sample value each (ghz: Go text/template + its functions).
_PRINTF = re.compile(r'\{\{printf \\?"(%0?\d*d)\\?" \.(RequestNumber|WorkerID)\}\}')
_ACTIONS = {
    re.compile(r"\{\{\.RequestNumber\}\}"): "12345",
    re.compile(r"\{\{\.WorkerID\}\}"): "w7",
    re.compile(r"\{\{\.TimestampUnix\}\}"): "1790000000",
    re.compile(r"\{\{newUUID\}\}"): str(uuid.UUID(int=7)),
    re.compile(r"\{\{randomInt (\d+) \d+\}\}"): r"\1",
}


def fill_templates(text: str) -> str:
    text = _PRINTF.sub(lambda m: m.group(1) % 12345, text)
    for pattern, value in _ACTIONS.items():
        text = pattern.sub(value, text)
    assert "{{" not in text, f"unknown template action in {text!r}"
    return text


def test_there_are_configs_for_translate_and_the_binding_calls() -> None:
    calls = {json.loads(p.read_text())["call"] for p in CONFIGS}
    assert {
        "numprotect.translation.v1.TranslationService.Translate",
        "numprotect.binding.v1.BindingService.CreateBinding",
        "numprotect.binding.v1.BindingService.GetBinding",
    } <= calls


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_names_a_method_and_its_data_parses(path: Path) -> None:
    config: dict[str, Any] = json.loads(path.read_text())
    assert (ROOT / config["proto"]).is_file()
    assert all((ROOT / p).is_dir() for p in config["import-paths"])
    service_name, _, method_name = config["call"].rpartition(".")
    service = descriptor_pool.Default().FindServiceByName(service_name)
    method = service.methods_by_name[method_name]
    assert config["proto"].endswith(service.file.name)
    request_class = message_factory.GetMessageClass(method.input_type)
    data = json.loads(fill_templates(json.dumps(config["data"])))
    request = json_format.ParseDict(data, request_class())
    assert request.ByteSize() > 0
    if method_name == "Translate":
        # Realistic: a 15-digit 700 number and a caller translation accepts.
        from numprotect.services.translation.numbers import normalize_caller, validate_called

        validate_called(data["called_number"])
        normalize_caller(data["calling_number"])


def test_template_filling_is_not_a_no_op() -> None:
    assert fill_templates('"7001{{printf \\"%011d\\" .RequestNumber}}"') == '"700100000012345"'
