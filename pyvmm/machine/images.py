"""Built-in guest images: compiled from guest/ by the package build into pyvmm/guests/."""

from __future__ import annotations

from pathlib import Path

from pyvmm.machine.errors import ImageError

GUESTS_DIR = Path(__file__).resolve().parent.parent / "guests"


def builtin_images() -> dict[str, Path]:
    return {p.stem: p for p in sorted(GUESTS_DIR.glob("*.elf"))}


def resolve_image(name_or_path: str) -> Path:
    """A built-in guest's name (hello, memstress, ...) or a path to an ELF."""
    images = builtin_images()
    if name_or_path in images:
        return images[name_or_path]
    path = Path(name_or_path)
    if path.exists():
        return path
    known = ", ".join(images) or "none built: reinstall with pip install -e ."
    raise ImageError(f"{name_or_path}: not a file and not a built-in guest ({known})")
