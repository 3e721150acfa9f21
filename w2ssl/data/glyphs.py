"""A labelled image set rendered from the fonts matplotlib ships, for kNN and probe benchmarks on a CPU.

Each class is a letter. A sample draws it in one of 16 DejaVu / STIX faces (sans, serif, mono; regular,
bold, italic) at 60-90 % of the side, turned up to 15°, near the centre, in a random shade on a gentle
gradient of another with noise, sometimes crossed by a clutter stroke, in grey levels by default. Shades
are drawn independently of the class, so brightness or colour tells the classes nothing: a trunk must see
shapes. Nothing is downloaded; the fonts come with matplotlib's wheel (DejaVu: Bitstream Vera licence;
STIX: SIL Open Font License 1.1; both free to redistribute).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from w2ssl.errors import UserError

CLASSES = "ABCDEFGHKLMNPRSTUVXY"  # 20 letters; I/J/O/Q/W/Z left out (near-duplicates under rotation and fonts)
FACES = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
         "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
         "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
         "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta")
PER_CLASS = {"train": 60, "val": 30}
SIZE = 64
DONE = ".complete"


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder; a UserError naming the fix when matplotlib is missing."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise UserError("the glyph dataset renders the fonts bundled with matplotlib: pip install matplotlib")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float64)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``[size, size, 3]`` float: a gradient between two random colours along a random direction, plus noise."""
    a = _colour(rng)
    b = np.clip(a + rng.uniform(-40, 40, 3), 0, 255)  # a gentle gradient: no strong edge of its own
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    return a * (1 - t) + b * t + rng.normal(0, rng.uniform(2, 12), (size, size, 3))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, count: int) -> None:
    """``count`` random lines and arcs in random colours: edges that belong to no class."""
    for _ in range(count):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(-size // 4, size + size // 4, 4))
        colour = tuple(int(c) for c in _colour(rng))
        width = int(rng.integers(1, max(2, size // 16) + 1))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=colour, width=width)
        else:
            box = (min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1)
            draw.arc(box, float(rng.uniform(0, 360)), float(rng.uniform(0, 360)), fill=colour, width=width)


def render(char: str, font: Path, size: int, rng: np.random.Generator, grey: bool = True) -> Image.Image:
    """One RGB ``size x size`` sample of ``char`` in ``font``: random scale (60-90 % of the side), angle
    (±15°), offset (up to a tenth of the side from the centre), colours (glyph at least 60 luma levels from
    the local background) and one or two clutter strokes; grey levels only with ``grey``."""
    bg = _background(rng, size)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    _clutter(ImageDraw.Draw(img), rng, size, int(rng.integers(0, 2)))
    # The glyph alone, on a transparent canvas large enough to rotate it without clipping.
    face = ImageFont.truetype(str(font), max(4, int(size * rng.uniform(0.6, 0.9))))
    canvas = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(canvas).text((size, size), char, fill=255, font=face, anchor="mm")
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC)
    box = canvas.getbbox() or (0, 0, 1, 1)
    mask = canvas.crop(box)
    w, h = mask.size
    jitter = size // 10
    x = (size - w) // 2 + int(rng.integers(-jitter, jitter + 1))
    y = (size - h) // 2 + int(rng.integers(-jitter, jitter + 1))
    under = _luma(bg[max(y, 0):y + h, max(x, 0):x + w].reshape(-1, 3).mean(0)) if w and h else 128.0
    ink = _colour(rng)
    while abs(_luma(ink) - under) < 60:  # legible: contrast in brightness, whatever the hues
        ink = _colour(rng)
    img.paste(Image.new("RGB", mask.size, tuple(int(c) for c in ink)), (x, y), mask)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    return img.convert("L").convert("RGB") if grey else img


def _seed(seed: int, split: str, label: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{split}/{label}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def build(root: str | Path, per_class: dict[str, int] | None = None, size: int = SIZE, seed: int = 0,
          grey: bool = True) -> Path:
    """Write ``root/{train,val}/<letter>/<i>.png`` once and return ``root``.

    The same arguments always give the same pixels (each sample is seeded by ``seed``, split, class and
    index). A finished tree is marked by ``root/.complete`` holding its arguments; a tree made with other
    arguments, or left half-written, is rebuilt (written beside ``root`` and renamed into place).
    """
    root = Path(root)
    per_class = dict(PER_CLASS if per_class is None else per_class)
    stamp = f"glyphs v3 classes={CLASSES} per_class={sorted(per_class.items())} size={size} seed={seed} grey={grey}"
    if (root / DONE).is_file() and (root / DONE).read_text() == stamp:
        return root
    fonts = font_dir()
    faces = [fonts / f"{name}.ttf" for name in FACES]
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, count in per_class.items():
        for label, char in enumerate(CLASSES):
            out = tmp / split / char
            out.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng(_seed(seed, split, label, i))
                render(char, faces[int(rng.integers(len(faces)))], size, rng, grey).save(out / f"{i}.png")
    (tmp / DONE).write_text(stamp)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root
