"""A built-in, offline multimodal task suite drawn deterministically from a seed with PIL only.

Two tasks:

* ``documents``: receipts and invoices (store, date, 3-6 priced line items, total) with questions
  about the total, the date, the store, one item's price, or the number of items.
* ``scenes``: coloured circles, squares and triangles on a plain background, with questions
  "How many red circles are there?" or "What shape is the blue object?".

Every item draws from its own RNG seeded by (seed, task, index), so item i is the same whatever
``n_per_task`` is, and the files are byte-identical across runs: fixed PNG parameters, no
metadata chunks, no antialiasing, and the bitmap font built into Pillow.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TASKS = ("documents", "scenes")
MANIFEST = "suite.jsonl"
SCORER = "exact_match"

INK = (24, 24, 24)
PAPER = (250, 250, 246)
DOC_BACKGROUNDS = ((196, 196, 196), (178, 190, 200), (205, 192, 170))
# Documents are laid out at BASE_SIDE px and upscaled: the bitmap font is 6 px a glyph.
BASE_SIDE = 224
LINE_HEIGHT = 13
MARGIN = 8
PAPER_WIDTH = 176

STORES = (
    "GREEN LEAF MARKET",
    "BLUE HARBOR CAFE",
    "SUNRISE BAKERY",
    "CITY HARDWARE",
    "MAPLE GROCERS",
    "RIVERSIDE DELI",
    "NORTH STAR BOOKS",
    "OAK & IRON TOOLS",
    "PIXEL ELECTRONICS",
    "CORNER PHARMACY",
    "GOLDEN WOK",
    "HILLTOP FLOWERS",
)
ITEMS = (
    "Coffee beans",
    "Whole milk",
    "Sourdough",
    "Apples 1kg",
    "Olive oil",
    "Dish soap",
    "Batteries",
    "Notebook",
    "Green tea",
    "Rice 2kg",
    "Tomatoes",
    "Cheddar",
    "Light bulb",
    "Paper towels",
    "Orange juice",
    "Pasta",
    "Screwdriver",
    "Shampoo",
    "Chocolate",
    "Eggs x12",
    "Butter",
    "Sticky notes",
    "Yogurt",
    "Honey",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
SCENE_BACKGROUNDS = ((245, 245, 245), (232, 236, 240), (240, 234, 222))
GRID = 4


def _font() -> ImageFont.ImageFont:
    # load_default() returns a FreeType font when Pillow has FreeType, and FreeType's
    # antialiasing can change between builds; the bitmap font renders identically everywhere.
    return ImageFont.load_default_imagefont()


def _money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def _count_answers(n: int) -> list[str]:
    answers = [str(n), NUMBER_WORDS[n]]
    return answers + ["none"] if n == 0 else answers


def _document(rng: random.Random, index: int, size: tuple[int, int]) -> tuple[Image.Image, str, list[str]]:
    store = rng.choice(STORES)
    kind = rng.choice(("receipt", "invoice"))
    header = "RECEIPT" if kind == "receipt" else f"INVOICE No. {rng.randint(1000, 9999)}"
    date = f"{rng.randint(2019, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    names = rng.sample(ITEMS, rng.randint(3, 6))
    prices = [rng.randint(99, 4999) for _ in names]
    total = sum(prices)

    scale = max(1, min(size) // BASE_SIDE)
    canvas_w, canvas_h = size[0] // scale, size[1] // scale
    n_lines = 3 + len(names) + 1
    paper_h = 2 * MARGIN + n_lines * LINE_HEIGHT + 2 * (LINE_HEIGHT // 2)
    if PAPER_WIDTH + 8 > canvas_w or paper_h + 8 > canvas_h:
        raise ValueError(f"image_size {size} is too small for a document")
    x0 = rng.randint(4, canvas_w - PAPER_WIDTH - 4)
    y0 = rng.randint(4, canvas_h - paper_h - 4)

    image = Image.new("RGB", (canvas_w, canvas_h), rng.choice(DOC_BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.rectangle((x0, y0, x0 + PAPER_WIDTH - 1, y0 + paper_h - 1), fill=PAPER)
    left, right = x0 + MARGIN, x0 + PAPER_WIDTH - MARGIN
    y = y0 + MARGIN

    def line(text: str, value: str | None = None) -> None:
        nonlocal y
        draw.text((left, y), text, fill=INK, font=font)
        if value is not None:
            # Right-aligned, drawn on its own so the value's glyphs are not shifted by the label.
            draw.text((right - font.getlength(value), y), value, fill=INK, font=font)
        y += LINE_HEIGHT

    def rule() -> None:
        nonlocal y
        draw.line((left, y + 3, right, y + 3), fill=INK)
        y += LINE_HEIGHT // 2

    line(store)
    line(header)
    line(f"Date: {date}")
    rule()
    for name, cents in zip(names, prices, strict=True):
        line(name, _money(cents))
    rule()
    line("TOTAL", _money(total))

    # Balanced question types: the index picks the type, the RNG the details.
    qtype = index % 5
    if qtype == 0:
        question, answers = "What is the total amount?", [_money(total), _money(total)[1:]]
    elif qtype == 1:
        question, answers = f"What is the date on the {kind}?", [date]
    elif qtype == 2:
        question, answers = f"What is the name of the store on the {kind}?", [store]
    elif qtype == 3:
        item = rng.randrange(len(names))
        price = _money(prices[item])
        question, answers = f'What is the price of "{names[item]}"?', [price, price[1:]]
    else:
        question, answers = f"How many line items are on the {kind}?", _count_answers(len(names))

    if scale > 1:
        image = image.resize(size, Image.Resampling.NEAREST)
    return image, question, answers


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)


def _scene(rng: random.Random, index: int, size: tuple[int, int]) -> tuple[Image.Image, str, list[str]]:
    n_objects = rng.randint(3, 8)
    colours = list(COLOURS)
    if index % 2 == 0:
        objects = [(rng.choice(colours), rng.choice(SHAPES)) for _ in range(n_objects)]
        # Mostly ask about something present; sometimes about any combination, so 0 occurs.
        if rng.random() < 0.75:
            colour, shape = rng.choice(objects)
        else:
            colour, shape = rng.choice(colours), rng.choice(SHAPES)
        count = objects.count((colour, shape))
        question, answers = f"How many {colour} {shape}s are there?", _count_answers(count)
    else:
        colour, shape = rng.choice(colours), rng.choice(SHAPES)
        others = [c for c in colours if c != colour]
        objects = [(colour, shape)] + [(rng.choice(others), rng.choice(SHAPES)) for _ in range(n_objects - 1)]
        question, answers = f"What shape is the {colour} object?", [shape]

    # One object per grid cell, with a gap to the cell border, so shapes never touch.
    cell_w, cell_h = size[0] // GRID, size[1] // GRID
    cells = rng.sample(range(GRID * GRID), len(objects))
    image = Image.new("RGB", size, rng.choice(SCENE_BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    for (colour_name, shape_name), cell in zip(objects, cells, strict=True):
        side = int(min(cell_w, cell_h) * rng.uniform(0.45, 0.75))
        gx, gy = (cell % GRID) * cell_w, (cell // GRID) * cell_h
        x = gx + rng.randint(4, cell_w - side - 4)
        y = gy + rng.randint(4, cell_h - side - 4)
        _draw_shape(draw, shape_name, (x, y, x + side, y + side), COLOURS[colour_name])
    return image, question, answers


_MAKERS: dict[str, Callable[[random.Random, int, tuple[int, int]], tuple[Image.Image, str, list[str]]]] = {
    "documents": _document,
    "scenes": _scene,
}


def generate(
    out_dir: str | os.PathLike, seed: int = 0, n_per_task: int = 32, image_size: tuple[int, int] = (448, 448)
) -> Path:
    """Write ``n_per_task`` items of each task under ``out_dir``; return the manifest's path.

    Images go to ``images/<id>.png``; ``suite.jsonl`` has one row per item with id, task, image
    (relative to ``out_dir``), question, answers and scorer. The manifest is written last and
    atomically, so its presence means the suite is complete.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    size = (int(image_size[0]), int(image_size[1]))
    rows = []
    for task in TASKS:
        for i in range(n_per_task):
            rng = random.Random(f"builtin-suite:{seed}:{task}:{i}")
            image, question, answers = _MAKERS[task](rng, i, size)
            item_id = f"{task}-{i:04d}"
            relative = f"images/{item_id}.png"
            image.save(out / relative, format="PNG", optimize=False, compress_level=6)
            rows.append(
                {
                    "id": item_id,
                    "task": task,
                    "image": relative,
                    "question": question,
                    "answers": answers,
                    "scorer": SCORER,
                }
            )
    manifest = out / MANIFEST
    partial = out / (MANIFEST + ".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, manifest)
    return manifest


def load(out_dir: str | os.PathLike) -> list[dict]:
    """The manifest rows of a generated suite (image paths stay relative to ``out_dir``)."""
    path = Path(out_dir) / MANIFEST
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
