"""The repo's current benchmark numbers per device: benchmarks/results/<device>.json (rows) and that device's
sections of BENCHMARKS.md. Each benchmark script owns some rows (by kind) and one section heading, and a merge
replaces only what it owns."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]


def device_slug(device: str) -> str:
    """The results file's name for a device ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    return "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")


def merge_rows(device: str, rows: list[dict], owns: Callable[[dict], bool]) -> pathlib.Path:
    """Replace the device's rows that `owns` by `rows`; keep the others. Returns the results file."""
    dest = ROOT / "benchmarks" / "results" / f"{device_slug(device)}.json"
    kept = [r for r in json.loads(dest.read_text()) if not owns(r)] if dest.exists() else []
    dest.write_text(json.dumps(kept + rows, indent=1) + "\n")
    return dest


def replace_section(heading_prefix: str, section: list[str]) -> None:
    """Replace the BENCHMARKS.md section whose "## " heading starts with heading_prefix by `section` (its heading
    first), or append it."""
    path = ROOT / "benchmarks" / "BENCHMARKS.md"
    page = path.read_text().rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(page) if line.startswith(heading_prefix)), None)
    if start is None:
        page += [""] + section
    else:
        end = next((i for i in range(start + 1, len(page)) if page[i].startswith("## ")), len(page))
        page[start:end] = section + ([""] if end < len(page) else [])
    path.write_text("\n".join(page) + "\n")


def merge_run(run_dir: pathlib.Path, note: str, owns: Callable[[dict], bool], heading_prefix: str) -> None:
    """Make a device run's rows (DIR/results.json) and section (DIR/BENCHMARKS_fragment.md) the current ones for its
    device: they replace the rows `owns` and the section under heading_prefix.format(device=...); `note` goes with
    every row and right under the heading."""
    got = json.loads((run_dir / "results.json").read_text())
    device = got["meta"]["device"]
    rows = [{**r, **({"note": note} if note else {})} for r in got["rows"]]
    dest = merge_rows(device, rows, owns)
    section = (run_dir / "BENCHMARKS_fragment.md").read_text().strip("\n").split("\n")
    if note:
        section[1:1] = ["", note]
    replace_section(heading_prefix.format(device=device), section)
    print(f"wrote {len(rows)} rows to {dest} and the section {heading_prefix.format(device=device)!r} of "
          "BENCHMARKS.md", file=sys.stderr)
