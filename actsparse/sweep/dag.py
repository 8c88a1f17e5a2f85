"""The sweep as a DAG of keyed nodes: one calibration per stats_key, one fit per plan_key, one dense
evaluation per dense_key, one evaluation per cell_key; grid points that share a cell_key run once."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..artifacts import content_key
from .cells import Cell, DenseNode, PlanNode, StatsNode


@dataclass
class SweepDag:
    """Unique nodes by key, and which grid points each unique cell stands for."""
    grid: list[Cell]                                          # every grid point, in order
    cells: dict[str, Cell] = field(default_factory=dict)      # cell_key -> first grid point with it
    stats: dict[str, StatsNode] = field(default_factory=dict)
    plans: dict[str, PlanNode] = field(default_factory=dict)
    dense: dict[str, DenseNode] = field(default_factory=dict)
    first_cell: dict[str, Cell] = field(default_factory=dict)  # node key -> the cell whose config sets its resources

    @property
    def duplicates(self) -> list[Cell]:
        """Grid points whose cell_key an earlier grid point already has."""
        return [c for c in self.grid if self.cells[c.key] is not c]

    @property
    def sweep_key(self) -> str:
        """Hash of the set of cell keys: the same grid gives the same sweep id."""
        return content_key(sorted(self.cells))[:8]

    def only(self, cell_keys: set[str]) -> "SweepDag":
        """The sub-DAG that computes just these cells (and what they depend on)."""
        sub = SweepDag([c for c in self.grid if c.key in cell_keys and self.cells[c.key] is c])
        for c in sub.grid:
            sub._add(c)
        return sub

    def _add(self, c: Cell) -> None:
        if c.key in self.cells:
            return
        self.cells[c.key] = c
        for node in (c.stats, c.plan, c.dense):
            table = self.stats if node is c.stats else self.plans if node is c.plan else self.dense
            if node.key not in table:
                table[node.key] = node
                self.first_cell[node.key] = c


def build_dag(cells: list[Cell]) -> SweepDag:
    """Return the DAG of a validated grid, deduplicated by key."""
    dag = SweepDag(list(cells))
    for c in cells:
        dag._add(c)
    return dag
