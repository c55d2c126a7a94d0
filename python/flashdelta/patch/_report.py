"""PatchReport: what one flashdelta.patch() call found, replaced and left alone.

`str(report)` is a table for people; the attributes are for code (tests, benchmarks):

- `components`: one ComponentStatus per registered component (gdn, fused_ops, moe, cross_entropy):
  whether it was on, why (keyword / environment variable / default), its state and notes;
- `sites`: one Site per replaced object: the module (or the class, for instance attributes), the
  symbol, what was there, what replaced it, and how many live instances were rebound.
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List

logger = logging.getLogger("flashdelta")

# ComponentStatus.state values
PATCHED = "patched"
OFF = "off"
NOTHING_FOUND = "nothing found to patch"
NO_IMPLEMENTATION = "no implementation in this build"


@dataclass
class Site:
    """One replaced object."""

    component: str
    where: str  # module name, or the instances' class (module.Class) for instance attributes
    symbol: str  # module attribute, or "<instance>.attr"
    original: str  # what was there
    replacement: str  # what is there now
    instances: int = 0  # live instances rebound (instance attributes, class swaps)
    kind: str = "symbol"  # "symbol", "instance attribute", "availability check"
    already: bool = False  # already in place from an earlier patch() call

    def row(self) -> List[str]:
        inst = str(self.instances) if self.kind != "symbol" or self.instances else "-"
        what = self.replacement + (" (already)" if self.already else "")
        return [self.component, self.where, self.symbol, self.original, what, inst]


@dataclass
class ComponentStatus:
    name: str
    enabled: bool
    source: str  # "keyword", "FLASHDELTA_...", or "default"
    state: str = OFF
    notes: List[str] = field(default_factory=list)
    restored: int = 0  # sites of an earlier patch() undone because the component is now off

    @property
    def explicit(self) -> bool:
        return self.source != "default"


@dataclass
class PatchReport:
    components: Dict[str, ComponentStatus] = field(default_factory=dict)
    sites: List[Site] = field(default_factory=list)
    model: str = ""  # the model's class and device, when one was given

    def patched(self, component: str) -> bool:
        """True when `component` is on and has at least one replaced site."""
        status = self.components.get(component)
        return status is not None and status.state == PATCHED

    def sites_of(self, component: str) -> List[Site]:
        return [s for s in self.sites if s.component == component]

    @property
    def problems(self) -> List[str]:
        """Requested components that are not fully in effect (what strict=True refuses)."""
        out = []
        for c in self.components.values():
            if not c.enabled:
                continue
            if c.state == NO_IMPLEMENTATION:
                if c.explicit:
                    out.append(f"{c.name}: {c.state} (requested by {c.source})")
            elif c.state != PATCHED:
                out.append(f"{c.name}: {c.state}")
            for note in c.notes:
                if note.startswith("cannot run"):
                    out.append(f"{c.name}: {note}")
        return out

    def __str__(self) -> str:
        lines = ["flashdelta.patch report" + (f" for {self.model}" if self.model else "")]
        comp_rows = [["component", "on", "why", "state", "notes"]]
        for c in self.components.values():
            notes = list(c.notes)
            if c.restored:
                notes.append(f"restored {c.restored} earlier replacement(s)")
            comp_rows.append(
                [c.name, "yes" if c.enabled else "no", c.source, c.state, "; ".join(notes)]
            )
        lines += _table(comp_rows)
        if self.sites:
            lines.append("")
            lines.append("replaced:")
            rows = [["component", "module / class", "symbol", "was", "now", "instances"]]
            rows += [s.row() for s in self.sites]
            lines += _table(rows)
        else:
            lines.append("")
            lines.append("replaced: nothing")
        return "\n".join(lines)

    def log(self) -> None:
        logger.info("%s", self)


def _table(rows: List[List[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
