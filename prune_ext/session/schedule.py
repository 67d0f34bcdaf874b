"""When the session restrains: never, once after the last edit, or every k edits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """A restraint schedule.

    ``fn``: ``"none"`` (never restrain), ``"log"`` or ``"linear"`` (the F to apply); ``every``:
    ``None`` restrains once, after the last edit (the paper's main setting), ``k`` restrains after
    every step that reaches a multiple of k *edits* (requests; a batch that crosses one counts;
    k = 1 is the paper's "multiple", appendix C.6).
    """

    fn: Literal["none", "log", "linear"] = "log"
    every: int | None = None

    def __post_init__(self) -> None:
        if self.fn not in ("none", "log", "linear"):
            raise ValueError(f"restrain must be 'none', 'log' or 'linear', got {self.fn!r}")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every must be a positive number of edits, got {self.every}")

    @property
    def kind(self) -> Literal["none", "once", "every"]:
        return "none" if self.fn == "none" else ("once" if self.every is None else "every")

    def due(self, edits_before: int, edits_after: int) -> bool:
        """Restrain after a step that took the edit count from ``edits_before`` to ``edits_after``?"""
        return self.kind == "every" and edits_after // self.every > edits_before // self.every

    def __str__(self) -> str:
        return {"none": "no restraint", "once": f"{self.fn} restraint once, after the last edit",
                "every": f"{self.fn} restraint every {self.every} edits"}[self.kind]
