"""Where something is in a configuration file, and what is wrong there.

A `Diagnostic` prints as `FILE:LINE:COL: message` (or `FILE:LINE:COL: warning: message`), the
shape editors and CI logs link to. Line and column are 1-based; 0 means "the whole file"
(a missing path, a file that is not text), and the position is then left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, order=True)
class Pos:
    """A place in a file: 1-based line and column, or 0/0 for the file as a whole."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}" if self.line else self.file


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning about the configuration, with the place it is about."""

    file: str
    line: int
    col: int
    message: str
    severity: str = ERROR

    @property
    def pos(self) -> Pos:
        """The place this diagnostic points at."""
        return Pos(self.file, self.line, self.col)

    @property
    def is_error(self) -> bool:
        """True for errors, False for warnings."""
        return self.severity == ERROR

    def __str__(self) -> str:
        if self.severity == WARNING:
            return f"{self.pos}: warning: {self.message}"
        return f"{self.pos}: {self.message}"


def sort_key(diag: Diagnostic) -> tuple[str, int, int]:
    """Order diagnostics as a reader meets them: by file, then line, then column."""
    return (diag.file, diag.line, diag.col)


class ConfigError(Exception):
    """The configuration has at least one error; nothing of it may be put in force.

    `diagnostics` holds the errors (sorted by file, line, column), `warnings` any warnings
    found on the way; `str()` is one `FILE:LINE:COL: message` line per error.
    """

    def __init__(self, diagnostics: Iterable[Diagnostic], warnings: Iterable[Diagnostic] = ()) -> None:
        self.diagnostics: list[Diagnostic] = sorted(diagnostics, key=sort_key)
        self.warnings: list[Diagnostic] = sorted(warnings, key=sort_key)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class Diagnostics:
    """Collects every error and warning of one load, so that all are reported, not the first."""

    def __init__(self) -> None:
        self._items: list[Diagnostic] = []

    def error(self, pos: Pos, message: str) -> None:
        """Record an error at `pos`."""
        self._items.append(Diagnostic(pos.file, pos.line, pos.col, message, ERROR))

    def warning(self, pos: Pos, message: str) -> None:
        """Record a warning at `pos`."""
        self._items.append(Diagnostic(pos.file, pos.line, pos.col, message, WARNING))

    def extend(self, diagnostics: list[Diagnostic]) -> None:
        """Record diagnostics found earlier (a cached parse of an unchanged file)."""
        self._items.extend(diagnostics)

    def recorded(self) -> list[Diagnostic]:
        """Every diagnostic in the order recorded."""
        return list(self._items)

    def count(self) -> int:
        """How many diagnostics (errors and warnings) were recorded so far."""
        return len(self._items)

    def errors_since(self, mark: int) -> bool:
        """True when an error was recorded after `count()` returned `mark`."""
        return any(d.is_error for d in self._items[mark:])

    @property
    def errors(self) -> list[Diagnostic]:
        """The errors, sorted by file, line and column."""
        return sorted((d for d in self._items if d.is_error), key=sort_key)

    @property
    def warnings(self) -> list[Diagnostic]:
        """The warnings, sorted by file, line and column."""
        return sorted((d for d in self._items if not d.is_error), key=sort_key)
