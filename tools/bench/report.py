"""Write a benchmark's result into its own section of docs/benchmarks.md (replacing the previous run)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section between `<!-- bench:name -->` markers."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], BENCHMARKS.parents[1]), *sys.argv[1:]])
    stamp = dt.date.today().isoformat()
    block = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {stamp}\n\n{body.strip()}\n<!-- /bench:{name} -->"
    )
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    BENCHMARKS.write_text(text)
