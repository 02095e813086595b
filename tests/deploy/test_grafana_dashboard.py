"""deploy/grafana/numprotect.json against Grafana's schema, as the grafana-foundation-sdk models it.

The dashboard is decoded into the SDK's models (panels into their plugin's typed options and field config,
targets into Prometheus queries, variables into VariableModel) and encoded again: every key and value of the
file must come back, so a field the schema does not know (a typo, a field of another Grafana version) fails.
Then what the schema cannot say: unique panel ids, panels on the 24-column grid without overlap, every panel,
target and variable reading the datasource variable, every `$variable` used being defined.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import prometheus
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel, VariableModel

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "numprotect.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24
# Grafana's own variables (not defined by the dashboard).
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__all"}


def _load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _decoded(data: dict[str, Any]) -> Dashboard:
    register_default_plugins()  # the panel and datasource variants (typed options, Prometheus queries)
    return Dashboard.from_json(data)


def _encoded(dashboard: Dashboard) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(dashboard, cls=JSONEncoder))
    return data


def lost(original: Any, decoded: Any, path: str = "") -> Iterator[str]:
    """Paths of what `original` holds and `decoded` does not hold the same (defaults `decoded` adds are fine)."""
    if isinstance(original, dict):
        if not isinstance(decoded, dict):
            yield f"{path}: {original!r} became {decoded!r}"
            return
        for key, value in original.items():
            if key not in decoded:
                yield f"{path}/{key}: not in the schema (dropped)"
            else:
                yield from lost(value, decoded[key], f"{path}/{key}")
    elif isinstance(original, list):
        if not isinstance(decoded, list) or len(original) != len(decoded):
            yield f"{path}: {original!r} became {decoded!r}"
            return
        for index, (left, right) in enumerate(zip(original, decoded, strict=True)):
            yield from lost(left, right, f"{path}[{index}]")
    elif original != decoded or type(original) is not type(decoded):
        yield f"{path}: {original!r} became {decoded!r}"


def _panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    found: list[dict[str, Any]] = []
    for panel in data["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def test_the_dashboard_loads_into_the_schema_without_losing_anything() -> None:
    data = _load()
    dashboard = _decoded(data)
    assert not list(lost(data, _encoded(dashboard)))
    assert dashboard.panels is not None and len(dashboard.panels) == len(data["panels"])
    for model, raw in zip(dashboard.panels, data["panels"], strict=True):
        if raw["type"] == "row":
            assert isinstance(model, RowPanel)
            continue
        assert isinstance(model, Panel)
        # Decoded into the panel plugin's own options type and every target into a Prometheus query: not kept as
        # an untyped bag, which would let any field through.
        assert not isinstance(model.options, dict), f"{raw['title']}: options of unknown panel type {raw['type']}"
        assert model.targets, raw["title"]
        for target in model.targets:
            assert isinstance(target, prometheus.Dataquery), f"{raw['title']}: {type(target).__name__}"
            assert target.expr.strip()
    variables = dashboard.templating.list_val or []
    assert [v.name for v in variables] == ["datasource", "service", "tenant", "city"]
    assert all(isinstance(v, VariableModel) for v in variables)


@pytest.mark.parametrize(
    "mutation",
    [
        ("panel", lambda d: d["panels"][1].__setitem__("titel", "x")),
        ("options", lambda d: _first(d, "timeseries")["options"]["legend"].__setitem__("placment", "right")),
        ("field config", lambda d: _first(d, "timeseries")["fieldConfig"]["defaults"].__setitem__("unti", "s")),
        ("target", lambda d: _first(d, "timeseries")["targets"][0].__setitem__("legendFormt", "x")),
        ("variable", lambda d: d["templating"]["list"][1].__setitem__("definiton", "x")),
    ],
    ids=lambda m: m[0],
)
def test_an_unknown_field_is_caught(mutation: tuple[str, Any]) -> None:
    """The round trip is the check: a misspelt field anywhere is reported."""
    data = _load()
    mutation[1](data)
    assert list(lost(data, _encoded(_decoded(data))))


def _first(data: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in _panels(data) if p["type"] == kind)


def test_panel_ids_are_unique_and_the_grid_has_no_overlap() -> None:
    panels = _panels(_load())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_panel_target_and_variable_reads_the_datasource_variable() -> None:
    data = _load()
    (datasource,) = [v for v in data["templating"]["list"] if v["type"] == "datasource"]
    assert (datasource["name"], datasource["query"]) == ("datasource", "prometheus")
    for panel in _panels(data):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["title"] and panel["description"], panel["id"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_every_variable_used_is_defined() -> None:
    data = _load()
    defined = {v["name"] for v in data["templating"]["list"]} | BUILTIN_VARIABLES
    texts = [t["expr"] for p in _panels(data) for t in p.get("targets", [])]
    texts += [v["query"] for v in data["templating"]["list"] if v["type"] == "query"]
    used = {name for text in texts for name in re.findall(r"\$\{?(\w+)", text)}
    assert used <= defined, used - defined
    assert {"service", "tenant", "city"} <= used


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query and variable selector (Grafana's variables replaced by values), as the
    expression of a recording rule: `promtool check rules` fails on a syntax error."""
    data = _load()
    exprs = [t["expr"] for p in _panels(data) for t in p.get("targets", [])]
    exprs += [label_values_selector(v["query"]) for v in data["templating"]["list"] if v["type"] == "query"]
    values = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
    rules = [
        {
            "record": f"dashboard:query_{index}:check",
            "expr": re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1], ".*"), e),
        }
        for index, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def label_values_selector(query: str) -> str:
    """The series selector of a `label_values(selector, label)` variable query."""
    match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
    assert match, f"variable query {query!r} is not label_values(selector, label)"
    return match[1]
