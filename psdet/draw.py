"""Drawing detections on an image for `psdet predict --draw`."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def draw_detections(image_path: Path, points: list[list[float]], slots: list[list[float]], out: Path) -> None:
    """Marks as circles, slot entrances as lines with their scores; pixel coordinates."""
    image = Image.open(image_path).convert("RGB")
    canvas = ImageDraw.Draw(image)
    radius = max(3, image.width // 120)
    for x1, y1, x2, y2, score in slots:
        canvas.line([(x1, y1), (x2, y2)], fill=(0, 220, 0), width=max(2, radius // 2))
        canvas.text(((x1 + x2) / 2 + 4, (y1 + y2) / 2 + 4), f"{score:.2f}", fill=(0, 255, 0))
    for x, y, score in points:
        canvas.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 40, 40), width=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
