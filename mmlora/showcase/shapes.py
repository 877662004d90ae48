"""The shapes world: a synthetic image-caption-segmentation domain that mmlora generates itself.

No pretrained weights or datasets can be downloaded where mmlora is tested, so the project proves that
it learns on a world it generates. Every image holds 1-3 solid shapes, each in its own cell of a 3x3
grid, on a plain or textured grey background. Each image has several captions that name every
object's size, colour, shape and position, a per-pixel class mask, and the ground-truth objects.

Three worlds, with the shifts between them fixed up front:

* **A** (the base): shapes circle, square, triangle, cross; colours red, green, blue, yellow;
  captions in a plain descriptive style ("a large red circle in the top left and ...").
* **B** (the shift): adds a new shape (star) and a new colour (purple), every image holds at least
  one of them, and captions use a new, position-first style ("top left holds a large red circle; ...").
  A new shape or colour is a visual concept, the new style a language one.
* **C** (a shift that lives only in pixels): world A's shapes, colours, sizes, layout and caption style,
  rendered differently — every shape drawn as an outline (a stroke about a quarter of its radius wide,
  in the object's colour, hollow inside) on a dark grey background (values 20-85, plain or textured, the
  same families as A's). Captions and masks are made exactly as in A (masks cover the whole shape), so
  a caption model that reads world-A images well but cannot see outlines on dark ground is limited by
  its vision tower, not by its language.

Everything is deterministic from a seed: each image draws from its own RNG keyed by
(seed, world, split, index), and files are written byte-for-byte reproducibly.

Run: ``mmlora data shapes --out data/shapes`` or ``python data_prep/make_shapes_world.py --out DIR``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmlora.cache import cached_dir
from mmlora.data.samples import CAPTION_PROMPT

GENERATOR_VERSION = 2  # 2: world C

#: Global class table shared by every world: index = mask value. 255 is the ignore index.
CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "cross", "star")
IGNORE_INDEX = 255

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 200),
}

#: Grid cells in reading order: (row, column) -> name used in captions.
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
SIZES: dict[str, tuple[float, float]] = {"small": (0.20, 0.26), "large": (0.36, 0.44)}



@dataclass(frozen=True)
class WorldSpec:
    """What a world contains. ``novel_*`` must appear in every image of the world (the shift)."""

    name: str
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    caption_style: str
    novel_shapes: tuple[str, ...] = ()
    novel_colours: tuple[str, ...] = ()
    #: Classes named in captions but never mask-supervised in dense fine-tuning (open-vocabulary eval).
    unseen_dense_classes: tuple[str, ...] = ()
    #: How shapes are drawn: ``filled`` on light grey (A, B) or ``outline`` on dark grey (C).
    render: str = "filled"


_WORLD_A = WorldSpec(
    name="A",
    shapes=("circle", "square", "triangle", "cross"),
    colours=("red", "green", "blue", "yellow"),
    caption_style="plain",
    unseen_dense_classes=("triangle",),
)
WORLDS: dict[str, WorldSpec] = {
    "A": _WORLD_A,
    "B": WorldSpec(
        name="B",
        shapes=(*_WORLD_A.shapes, "star"),
        colours=(*_WORLD_A.colours, "purple"),
        caption_style="position-first",
        novel_shapes=("star",),
        novel_colours=("purple",),
        unseen_dense_classes=("triangle",),
    ),
    # world A in other pixels: everything but the rendering is A's
    "C": replace(_WORLD_A, name="C", render="outline"),
}

DEFAULT_SPLITS: dict[str, dict[str, int]] = {
    "A": {"train": 2000, "val": 200, "test": 200},
    "B": {"train": 500, "val": 100, "test": 200},
    "C": {"train": 500, "val": 100, "test": 200},
}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str
    #: Centre (x, y) and radius in pixels.
    cx: float
    cy: float
    radius: float

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass
class ShapesSample:
    image: Image.Image
    mask: Image.Image
    objects: list[ShapeObject]
    background: str
    captions: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.38
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w),
        ]
    return None


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: int | tuple[int, int, int], outline: bool = False) -> None:
    """Draw one object, filled or (``outline``) as a hollow stroke a quarter of its radius wide. Called
    with identical geometry on the image and the mask, so they agree (masks are always filled)."""
    cx, cy, r = obj.cx, obj.cy, obj.radius
    paint = {"outline": fill, "width": max(2, round(r * 0.25))} if outline else {"fill": fill}
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **paint)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], **paint)
    else:
        poly = _shape_polygon(obj.shape, cx, cy, r)
        if poly is None:
            raise ValueError(f"unknown shape {obj.shape!r}")
        draw.polygon(poly, **paint)


def _background(rng: np.random.Generator, size: int, dark: bool = False) -> tuple[np.ndarray, str]:
    """A grey background (R=G=B) so no background pixel equals an object colour: light (values
    150-235) for worlds A and B, ``dark`` (20-85, the same plain and textured families shifted down by
    150 and scaled) for world C."""
    lo, hi = (20, 85) if dark else (150, 235)

    def level(v):  # the light family's values mapped onto the dark range (unchanged when light)
        return lo + (v - 150) * (hi - lo) / 85 if dark else v

    if rng.random() < 0.5:
        plain = int(round(level(int(rng.integers(190, 236)))))
        return np.full((size, size, 3), plain, dtype=np.uint8), "plain"
    cells = int(rng.integers(4, 10))
    coarse = rng.uniform(160, 230, size=(cells, cells))
    up = np.kron(coarse, np.ones((math.ceil(size / cells),) * 2))[:size, :size]
    if rng.random() < 0.5:  # stripes on top of the blotches
        period = int(rng.integers(4, 12))
        up = up + 12 * ((np.arange(size)[None, :] // period) % 2)
    grain = rng.normal(0, 6, size=(size, size))
    grey = np.clip(level(up + grain), lo, hi).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), "textured"


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map, so masks open as coloured pictures in any viewer."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


VOC_PALETTE = _voc_palette()


# --------------------------------------------------------------------------- captions


def _join(parts: list[str], last: str = " and ") -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + last + parts[-1]


def captions_for(objects: list[ShapeObject], background: str, style: str) -> list[str]:
    """Five captions, each naming every object's size, colour, shape and position."""
    if style == "plain":
        objs = _join([f"a {o.phrase()} in the {o.position}" for o in objects])
        return [
            f"{objs}.",
            f"there is {objs}.",
            f"an image of {objs}.",
            f"this picture shows {objs}.",
            f"{objs} on a {background} background.",
        ]
    if style == "position-first":
        return [
            "; ".join(f"{o.position} holds a {o.phrase()}" for o in objects) + ".",
            "; ".join(f"{o.position}: {o.phrase()}" for o in objects) + ".",
            "from top to bottom, " + "; ".join(f"{o.position} holds a {o.phrase()}" for o in objects) + ".",
            "; ".join(f"{o.position} shows a {o.phrase()}" for o in objects) + ".",
            "; ".join(f"{o.position} holds a {o.phrase()}" for o in objects) + f"; {background} background.",
        ]
    raise ValueError(f"unknown caption style {style!r}")


# --------------------------------------------------------------------------- sampling


def sample_image(spec: WorldSpec, rng: np.random.Generator, image_size: int) -> ShapesSample:
    """Draw one image of ``spec``: shapes in distinct grid cells, each with its mask pixels."""
    n = int(rng.integers(1, 4))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())
    cell = image_size / 3
    objects: list[ShapeObject] = []
    for k, idx in enumerate(cells):
        shape = str(rng.choice(spec.shapes))
        colour = str(rng.choice(spec.colours))
        size = str(rng.choice(list(SIZES)))
        lo, hi = SIZES[size]
        radius = float(rng.uniform(lo, hi)) * cell
        slack = max(cell / 2 - radius - 1, 0.0)
        row, col = divmod(idx, 3)
        cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack))
        objects.append(ShapeObject(shape, colour, size, POSITIONS[idx], cx, cy, radius))
    if spec.novel_shapes or spec.novel_colours:
        # The shift is guaranteed: one object (chosen at random) carries a novel attribute.
        k = int(rng.integers(0, n))
        o = objects[k]
        use_shape = bool(spec.novel_shapes) and (not spec.novel_colours or rng.random() < 0.5)
        if use_shape:
            o = ShapeObject(str(rng.choice(spec.novel_shapes)), o.colour, o.size, o.position, o.cx, o.cy, o.radius)
        else:
            o = ShapeObject(o.shape, str(rng.choice(spec.novel_colours)), o.size, o.position, o.cx, o.cy, o.radius)
        objects[k] = o

    outline = spec.render == "outline"
    pixels, background = _background(rng, image_size, dark=outline)
    image = Image.fromarray(pixels, "RGB")
    mask = Image.new("L", (image_size, image_size), 0)
    img_draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for o in objects:
        _draw(img_draw, o, COLOURS[o.colour], outline=outline)
        _draw(mask_draw, o, CLASSES.index(o.shape))
    return ShapesSample(image, mask, objects, background, captions_for(objects, background, spec.caption_style))


# --------------------------------------------------------------------------- writing


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", optimize=False, compress_level=6)


def generate_world(
    out_dir: str | Path,
    world: str = "A",
    splits: dict[str, int] | None = None,
    seed: int = 0,
    image_size: int = 128,
) -> Path:
    """Write world ``world`` under ``out_dir/world_<world>`` and return that folder.

    Layout (the real formats, so the same readers serve real data)::

        world_A/
          world.json                         spec, seed, counts, class list, generator version
          classes.txt                        one class name per line (index = mask value)
          images/<split>/<id>.png            RGB images
          masks/<split>/<id>.png             VOC-style palette PNG, value = class index
          ImageSets/Segmentation/<split>.txt image ids, VOC style
          annotations/captions_<split>.json  COCO captions (+ ground-truth objects per image)
          llava_<split>.json                 LLaVA conversation JSON, image paths relative to it
    """
    spec = WORLDS[world]
    splits = dict(splits or DEFAULT_SPLITS[world])
    root = Path(out_dir) / f"world_{world}"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    world_idx = ord(world)
    for split_idx, (split, count) in enumerate(sorted(splits.items())):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        coco_images, coco_anns, llava, ids = [], [], [], []
        for i in range(count):
            rng = np.random.default_rng([seed, world_idx, sum(map(ord, split)), i])
            sample = sample_image(spec, rng, image_size)
            image_id = f"{world}_{split}_{i:05d}"
            rel = f"images/{split}/{image_id}.png"
            _save_png(sample.image, root / rel)
            mask = sample.mask.convert("P")
            mask.putpalette(VOC_PALETTE)
            _save_png(mask, root / "masks" / split / f"{image_id}.png")
            ids.append(image_id)
            coco_images.append({
                "id": i,
                "file_name": rel,
                "width": image_size,
                "height": image_size,
                "mmlora_id": image_id,
                "background": sample.background,
                "objects": [
                    {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(o).items()}
                    for o in sample.objects
                ],
            })
            for k, cap in enumerate(sample.captions):
                coco_anns.append({"id": i * 10 + k, "image_id": i, "caption": cap})
            llava.append({
                "id": image_id,
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                    {"from": "gpt", "value": sample.captions[i % len(sample.captions)]},
                ],
            })
        _write_json(root / "annotations" / f"captions_{split}.json", {
            "info": {"description": f"mmlora shapes world {world}, split {split}", "version": GENERATOR_VERSION},
            "licenses": [],
            "images": coco_images,
            "annotations": coco_anns,
            "type": "captions",
        })
        _write_json(root / f"llava_{split}.json", llava)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    _write_json(root / "world.json", {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "splits": splits,
        "classes": list(CLASSES),
        "ignore_index": IGNORE_INDEX,
        "spec": asdict(spec),
        "colours": {c: list(COLOURS[c]) for c in spec.colours},
        "caption_prompt": CAPTION_PROMPT,
    })
    return root


def generate(
    out_dir: str | Path,
    worlds: tuple[str, ...] = ("A", "B", "C"),
    seed: int = 0,
    image_size: int = 128,
    scale: float = 1.0,
) -> dict[str, Path]:
    """Generate the default worlds; ``scale`` multiplies every split's size (tests use small scales)."""
    out = {}
    for w in worlds:
        splits = world_settings(w, seed, image_size, scale)["splits"]
        out[w] = generate_world(out_dir, w, splits, seed=seed, image_size=image_size)
    return out


def world_settings(world: str, seed: int = 0, image_size: int = 128, scale: float = 1.0) -> dict:
    """What ``world.json`` of ``world`` generated by :func:`generate` with these arguments records."""
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "image_size": image_size,
            "splits": {s: max(1, round(n * scale)) for s, n in DEFAULT_SPLITS[world].items()}}


def world_differs(folder: Path, world: str, seed: int = 0, image_size: int = 128, scale: float = 1.0) -> str | None:
    """Why the world in ``folder`` is not what :func:`generate` writes with these arguments (one
    phrase: missing, or the first setting that differs), or None when it is."""
    meta_file = Path(folder) / "world.json"
    if not meta_file.is_file():
        return f"no world {world} in {folder}"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return f"{meta_file} is not readable JSON"
    for key, want in world_settings(world, seed, image_size, scale).items():
        if meta.get(key) != want:
            return f"{meta_file} has {key} {meta.get(key)!r}, not {want!r}"
    return None


def corpus(worlds: tuple[str, ...] = ("A", "B")) -> list[str]:
    """Every word a shapes-world caption can use, in caption-like sentences (tokenizer training)."""
    lines: list[str] = [CAPTION_PROMPT]
    for w in worlds:
        spec = WORLDS[w]
        rng = np.random.default_rng([1234, ord(w)])
        for _ in range(400):
            sample = sample_image(spec, rng, 96)
            lines.extend(sample.captions)
    return lines


def cached_worlds(seed: int = 0, image_size: int = 128, scale: float = 1.0) -> Path:
    """The default worlds A, B and C, generated once into mmlora's cache; returns the folder holding
    ``world_A/``, ``world_B/`` and ``world_C/``."""

    params = {"seed": seed, "image_size": image_size, "scale": scale, "version": GENERATOR_VERSION}
    return cached_dir("shapes", params, ["showcase/shapes.py"], lambda tmp: generate(tmp, seed=seed, image_size=image_size, scale=scale) and None)
