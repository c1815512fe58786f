import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from objectives import builtin_suite

SCALE = 2  # 448 px images are 224 px layouts upscaled by 2


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    builtin_suite.generate(out)
    return out, builtin_suite.load(out)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_regenerates_byte_identically(suite, tmp_path):
    first, _ = suite
    builtin_suite.generate(tmp_path / "again")
    a, b = _files(first), _files(tmp_path / "again")
    assert len(a) == 2 * 32 + 1
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_other_seed_differs_and_items_do_not_depend_on_n(suite, tmp_path):
    first, rows = suite
    small = tmp_path / "small"
    builtin_suite.generate(small, n_per_task=3)
    small_rows = builtin_suite.load(small)
    assert small_rows == [r for r in rows if int(r["id"].split("-")[1]) < 3]
    for row in small_rows:
        assert (small / row["image"]).read_bytes() == (first / row["image"]).read_bytes()
    builtin_suite.generate(tmp_path / "seed1", seed=1, n_per_task=3)
    assert builtin_suite.load(tmp_path / "seed1") != small_rows


def test_manifest_rows(suite):
    out, rows = suite
    assert [r["task"] for r in rows] == ["documents"] * 32 + ["scenes"] * 32
    assert len({r["id"] for r in rows}) == 64
    for row in rows:
        assert set(row) == {"id", "task", "image", "question", "answers", "scorer"}
        assert row["scorer"] == "exact_match" and row["answers"] and row["question"].endswith("?")
        with Image.open(out / row["image"]) as image:
            assert image.size == (448, 448) and image.mode == "RGB"
            assert not image.info  # no metadata chunks


# --- scenes: count what was drawn, independently of the generator's bookkeeping -------------


def _components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """4-connected components of a boolean mask, each as its row runs (y, x_start, x_end)."""
    runs: list[tuple[int, int, int]] = []
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []
    for y in np.flatnonzero(mask.any(axis=1)):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask[y].astype(np.int8), [0]))))
        current = []
        for start, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            i = len(runs)
            runs.append((int(y), start, end))
            parent.append(i)
            current.append(i)
            for j in previous:
                prev_y, prev_start, prev_end = runs[j]
                if prev_y == y - 1 and prev_start < end and start < prev_end:
                    parent[find(i)] = find(j)
        previous = current
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(find(i), []).append(run)
    return list(groups.values())


def _shape_of(runs: list[tuple[int, int, int]]) -> str:
    # Fill ratio of the bounding box: square 1, circle pi/4, triangle 1/2.
    area = sum(end - start for _, start, end in runs)
    h = max(y for y, _, _ in runs) - min(y for y, _, _ in runs) + 1
    w = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
    ratio = area / (h * w)
    return "square" if ratio > 0.92 else "circle" if ratio > 0.65 else "triangle"


def _scene_objects(path: Path) -> list[tuple[str, str]]:
    pixels = np.asarray(Image.open(path))
    objects = []
    for colour, rgb in builtin_suite.COLOURS.items():
        for component in _components((pixels == rgb).all(axis=2)):
            objects.append((colour, _shape_of(component)))
    return objects


def test_scene_answers_match_the_drawing(suite):
    out, rows = suite
    scenes = [r for r in rows if r["task"] == "scenes"]
    counts_seen = set()
    for row in scenes:
        objects = _scene_objects(out / row["image"])
        assert 3 <= len(objects) <= 8
        if m := re.fullmatch(r"How many (\w+) (\w+)s are there\?", row["question"]):
            count = objects.count((m.group(1), m.group(2)))
            assert row["answers"][0] == str(count), row
            counts_seen.add(count)
        else:
            m = re.fullmatch(r"What shape is the (\w+) object\?", row["question"])
            assert m, row["question"]
            assert [shape for colour, shape in objects if colour == m.group(1)] == row["answers"]
    assert 0 in counts_seen and len(counts_seen) >= 2  # absent combinations are asked about too


# --- documents: find the answer text in the image by template matching ------------------------


def _ink(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path))[::SCALE, ::SCALE]
    return (pixels == builtin_suite.INK).all(axis=2)


def _find(ink: np.ndarray, text: str) -> list[tuple[int, int]]:
    """(y, x) of each place ``text``, as the bitmap font draws it, appears exactly in ``ink``;
    y is the text line's origin, so matches on one line share it."""
    font = ImageFont.load_default_imagefont()
    canvas = Image.new("L", (int(font.getlength(text)) + 4, 16), 0)
    ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=font)
    left, top, right, bottom = canvas.getbbox()
    template = np.asarray(canvas)[top:bottom, left:right] > 0
    windows = np.lib.stride_tricks.sliding_window_view(ink, template.shape)
    ys, xs = np.nonzero((windows == template).all(axis=(2, 3)))
    return [(int(y) - top, int(x) - left) for y, x in zip(ys, xs, strict=True)]


def _read_money(ink: np.ndarray, y: int, x: int) -> int:
    """Cents of the "$d.dd" drawn with its "$" at origin (y, x): the font is 6 px a glyph."""
    font = ImageFont.load_default_imagefont()
    glyphs = {}
    for char in "0123456789.":
        cell = Image.new("L", (6, 11), 0)
        ImageDraw.Draw(cell).text((0, 0), char, fill=255, font=font)
        glyphs[char] = np.asarray(cell) > 0
    text = ""
    x += 6
    while x + 6 <= ink.shape[1]:
        cell = ink[y : y + 11, x : x + 6]
        char = next((c for c, g in glyphs.items() if cell.shape == g.shape and (cell == g).all()), None)
        if char is None:
            break
        text, x = text + char, x + 6
    whole, cents = text.split(".")
    return int(whole) * 100 + int(cents)


def test_document_answers_are_drawn(suite):
    out, rows = suite
    docs = [r for r in rows if r["task"] == "documents"]
    kinds = set()
    for row in docs:
        ink = _ink(out / row["image"])
        # Read every amount back: item lines first, the TOTAL line last, which must add up.
        ((total_y, _),) = _find(ink, "TOTAL")
        amounts = sorted(_find(ink, "$"))
        assert amounts[-1][0] == total_y
        cents = [_read_money(ink, y, x) for y, x in amounts]
        assert sum(cents[:-1]) == cents[-1], row
        question, answer = row["question"], row["answers"][0]
        if question == "What is the total amount?":
            assert answer == f"${cents[-1] // 100}.{cents[-1] % 100:02d}"
            kinds.add("total")
        elif m := re.fullmatch(r'What is the price of "(.+)"\?', question):
            ((item_y, _),) = _find(ink, m.group(1))
            assert item_y in {y for y, _ in _find(ink, answer)}
            kinds.add("price")
        elif question.startswith("How many line items"):
            assert len(amounts) - 1 == int(answer)
            kinds.add("count")
        else:
            assert len(_find(ink, answer)) == 1, row
            kinds.add(question.split()[3])  # "date" / "name"
    assert kinds == {"total", "price", "count", "date", "name"}
