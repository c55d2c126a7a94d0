"""The environment switches of flashdelta.patch(): FLASHDELTA_PATCH (master) and one per component.

They are read once per patch() call (never in a hot path). Keyword arguments of patch() override
them. Resolution for one component, first match wins:

1. the keyword argument (True / False), when not None;
2. FLASHDELTA_PATCH set to an "off" value: off;
3. the component's own variable (FLASHDELTA_GDN, ...), when set;
4. on (FLASHDELTA_PATCH set to "on", or nothing set at all: every component defaults to on).
"""

import os
from dataclasses import dataclass
from typing import Mapping, Optional

MASTER = "FLASHDELTA_PATCH"

_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})


def parse_switch(name: str, value: str) -> bool:
    """'1/0/true/false/on/off/yes/no' in any case (surrounding spaces allowed) -> bool; anything
    else raises ValueError naming the variable."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(
        f"{name}={value!r} is not a valid switch value; use one of 1/0, true/false, on/off, "
        f"yes/no (any case)"
    )


def read_switch(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[bool]:
    """The value of one switch variable, or None when it is not set (an empty string counts as
    not set)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    return parse_switch(name, raw)


@dataclass(frozen=True)
class Decision:
    enabled: bool
    source: str  # "keyword", the variable's name, or "default"

    @property
    def explicit(self) -> bool:
        """True when someone asked for this (keyword or variable), not just the default."""
        return self.source != "default"


def decide(
    component_env: str,
    keyword: Optional[bool],
    master: Optional[bool],
    environ: Optional[Mapping[str, str]] = None,
) -> Decision:
    """Whether one component is on, and why (see the module docstring for the order)."""
    if keyword is not None:
        if not isinstance(keyword, bool):
            raise TypeError(
                f"flashdelta.patch: the keyword for {component_env} must be True, False or None, "
                f"got {keyword!r}"
            )
        return Decision(keyword, "keyword")
    if master is False:
        return Decision(False, MASTER)
    own = read_switch(component_env, environ)
    if own is not None:
        return Decision(own, component_env)
    if master is True:
        return Decision(True, MASTER)
    return Decision(True, "default")
