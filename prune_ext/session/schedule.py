"""When the session restrains: never, once after the last edit, or every k edits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prune_ext.spectral import Restraint

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """A restraint schedule.

    ``fn``: ``"none"`` (never restrain), ``"log"`` or ``"linear"`` (the F to apply); ``every``:
    ``None`` restrains once, after the last edit (the paper's main setting), ``k`` restrains after
    every step that reaches a multiple of k *edits* (requests; a batch that crosses one counts;
    k = 1 is the paper's "multiple", appendix C.6). ``threshold_scale``, ``protect_energy`` and
    ``protect_damp`` choose a spectral variant (:class:`prune_ext.spectral.Restraint`); protection
    alone (``fn="none"`` with ``protect_energy``) is a schedule too.
    """

    fn: Literal["none", "log", "linear"] = "log"
    every: int | None = None
    threshold_scale: float = 1.0
    protect_energy: float | None = None
    protect_damp: float = 1.0

    def __post_init__(self) -> None:
        Restraint(self.fn, 2.0, 2.0, self.threshold_scale, self.protect_energy, self.protect_damp)  # checks
        if self.every is not None and self.every < 1:
            raise ValueError(f"every must be a positive number of edits, got {self.every}")

    @property
    def protects(self) -> bool:
        return self.protect_energy is not None and self.protect_damp > 0

    @property
    def kind(self) -> Literal["none", "once", "every"]:
        if self.fn == "none" and not self.protects:
            return "none"
        return "once" if self.every is None else "every"

    def restraint(self, alpha: float, beta: float) -> Restraint:
        """The restraint this schedule applies, with F's parameter(s)."""
        return Restraint(self.fn, alpha, beta, self.threshold_scale, self.protect_energy, self.protect_damp)

    def due(self, edits_before: int, edits_after: int) -> bool:
        """Restrain after a step that took the edit count from ``edits_before`` to ``edits_after``?"""
        return self.kind == "every" and edits_after // self.every > edits_before // self.every

    def __str__(self) -> str:
        what = self.fn if self.fn != "none" else "protection"
        if self.fn != "none" and self.threshold_scale != 1.0:
            what += f" above {self.threshold_scale:g}·σmax(W)"
        if self.protects:
            what += f", protecting {self.protect_energy:g} of W's energy (damp {self.protect_damp:g}),"
        return {"none": "no restraint", "once": f"{what} restraint once, after the last edit",
                "every": f"{what} restraint every {self.every} edits"}[self.kind]
