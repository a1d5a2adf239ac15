"""A small JSON document store shared by every instance of a service (SQLite in WAL mode).

Several instances of `delivery` (v1 and v2) and of `package` serve the same records, as they
would in front of a shared database; a per-process dict would make an answer depend on which
instance the balancer picked. Calls are short and synchronous: fine for a demo app's loop.

Where the file lives: `--store PATH`, else `$DEMO_STORE_DIR/ROLE.sqlite`, else under the data
folder `meshproxy up` gives its apps (`$MESHPROXY_APP_DATA`, in its state directory), else a
temporary folder named after the parent process (one mesh shares one folder).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Callable


def default_path(role: str) -> Path:
    """Return where the `role` store lives when `--store` is not given."""
    folder = os.environ.get("DEMO_STORE_DIR") or os.environ.get("MESHPROXY_APP_DATA")
    if not folder:
        folder = os.path.join(tempfile.gettempdir(), f"meshproxy-demo-{os.getuid()}-{os.getppid()}")
    return Path(folder) / f"{role}.sqlite"


class Store:
    """JSON objects by key. Every method commits before it returns."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), timeout=5.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str) -> dict | None:
        """Return the object stored at `key`, or None."""
        row = self._db.execute("SELECT value FROM records WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def update(self, key: str, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, dict | None]:
        """Apply `change(old)` atomically; it returns the new object, or None to leave it as is.

        Returns (old, new); new is None when nothing was written.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT value FROM records WHERE key = ?", (key,)).fetchone()
            old = json.loads(row[0]) if row else None
            new = change(None if old is None else dict(old))
            if new is not None:
                self._db.execute("INSERT OR REPLACE INTO records (key, value) VALUES (?, ?)",
                                 (key, json.dumps(new)))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return old, new

    def items(self) -> list[tuple[str, dict]]:
        """Return every (key, object) stored."""
        return [(key, json.loads(value)) for key, value in
                self._db.execute("SELECT key, value FROM records ORDER BY rowid")]

    def count(self) -> int:
        """Return how many objects are stored."""
        return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        self._db.close()
