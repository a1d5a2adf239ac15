"""Where the Mesh files that ship with meshproxy are (the drone-delivery demo's, the examples').

In a checkout or an editable install they are the source tree's `config/`; a built package
(`pip install .`, `pipx install .`) carries a copy as `meshproxy/bundled/config`, made by
setup.py's build_py, since nothing of the source tree is beside it then.
"""

from __future__ import annotations

from pathlib import Path

SOURCE_CONFIG = Path(__file__).resolve().parents[2] / "config"
PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "bundled" / "config"


def bundled_file(*parts: str) -> Path | None:
    """The bundled file at `parts` under config/ (e.g. "demo", "mesh.yaml"): the source
    tree's when there is one, else the built package's copy; None when neither has it."""
    for root in (SOURCE_CONFIG, PACKAGED_CONFIG):
        candidate = root.joinpath(*parts)
        if candidate.is_file():
            return candidate
    return None
