"""The rooms of docs/architecture.md, checked from the source: what each may import, no import cycle (lazy
imports inside functions included), one module owning DeepSpeed, and functions under the size limit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ript_ds"

DOC = ROOT / "docs" / "architecture.md"


def _room_table() -> dict[str, set[str]]:
    """room -> the rooms it may import, read from docs/architecture.md's table (the one source: a hand
    copy here drifted from it). Cells: "-" (none), a comma list, or "all but X, Y"."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rooms = [n.strip(" `").removesuffix(".py").rstrip("/") for n in cells[0].split(",")]
        for room in rooms:
            rows[room] = cells[2]
    table = {}
    for room, cell in rows.items():
        if cell == "-":
            table[room] = set()
        elif cell.startswith("all but "):
            table[room] = set(rows) - {room} - {n.strip() for n in cell.removeprefix("all but ").split(",")}
        else:
            table[room] = {n.strip() for n in cell.split(",")}
    return table


ALLOWED = _room_table()
NO_DISTRIBUTED = ("model", "rl", "env")  # never torch.distributed or deepspeed (the brief)
DEEPSPEED_OWNER = "engine/deepspeed.py"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> list[str]:
    """Every module named by an import anywhere in the file (module level and inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def _room(module: str) -> str:
    return module.split(".")[1]


def test_the_room_table_reads_as_written():
    assert ALLOWED["config"] == set() and ALLOWED["rl"] == {"config", "model", "env"}
    assert ALLOWED["metrics"] == ALLOWED["progress"] == set()
    assert {"synthetic", "memory", "trainer"}.isdisjoint(ALLOWED["trainer"]) and "serving" in ALLOWED[
        "trainer"
    ]
    assert all(allowed <= set(ALLOWED) for allowed in ALLOWED.values()), "a room allows an unknown room"


def test_every_room_imports_only_what_docs_architecture_allows():
    modules = _modules()
    assert {_room(m) for m in modules if m != "ript_ds"} <= set(ALLOWED), "a new room: add it to the table"
    bad = []
    for module, path in modules.items():
        if module == "ript_ds":
            continue
        for name in _imports(path):
            other = name.startswith("ript_ds.") and _room(name) != _room(module)
            if other and _room(name) not in ALLOWED[_room(module)]:
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {
        m: {n for n in _imports(p) if n in modules and n != m and n != "ript_ds"} for m, p in modules.items()
    }
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_deepspeed_has_one_owner_and_the_algorithm_rooms_no_collectives():
    found = []
    for module, path in _modules().items():
        rel = str(path.relative_to(PACKAGE))
        for name in _imports(path):
            if name.split(".")[0] == "deepspeed" and rel != DEEPSPEED_OWNER:
                found.append(f"{rel} imports {name}")
            distributed = name.startswith("torch.distributed") or name.split(".")[0] == "deepspeed"
            if module != "ript_ds" and _room(module) in NO_DISTRIBUTED and distributed:
                found.append(f"{rel} imports {name}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", ["ript_ds", "launch", "tools"])
def test_functions_stay_under_the_size_limit(folder):
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
