"""What real calibration data looks like on disk (pure: the config validator reads it too).

A folder of images, and a text file with one caption or question per line; a VQA line may be
`question<TAB>answer`, the answer feeding the answer decoder."""
from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_files(folder: str) -> tuple[str, ...]:
    """The folder's images, sorted by name."""
    return tuple(sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))


def read_texts(path: str) -> list[tuple[str, str]]:
    """(text, answer) per non-empty line; the answer is what follows a tab, if anything."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [(text.strip(), answer.strip()) for text, _, answer in (line.partition("\t") for line in lines if line)]
