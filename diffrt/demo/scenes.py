"""A small world of captioned scenes (one shape on a plain background) and a pixel analyser that reads them back.

The generator is deterministic for a seed and draws what the caption says; the analyser classifies a picture
(any size, e.g. 64² generated or 256² upscaled) into background colour, object colour, position and shape, so a
test can check that a model drew what the prompt asked. NumPy only: the runtime's tests use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64  # the scenes' side in pixels (an 8x8 latent at VAE scale factor 8)
# The CSS named colours (exact RGB values).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large", None)  # None: the caption does not say
POSITIONS = ("left", "right", "top", "bottom", "centre", None)
# Where a named position puts the object's centre (x, y) in a 64² scene; jitter is added around it.
ANCHORS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "centre": (32, 32)}
RADII = {"small": (6, 8), "large": (13, 16), None: (6, 16)}  # half-extent of the shape in pixels

# Wordings, so the text encoder learns words rather than one template.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big"), None: ("",)}
_POSITION_WORDS = {
    "left": ("on the left", "at the left", "left"),
    "right": ("on the right", "at the right", "right"),
    "top": ("at the top", "on top", "top"),
    "bottom": ("at the bottom", "bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
    None: ("",),
}
_TEMPLATES = (
    "a {size} {colour} {shape} {position} on a {background} background",
    "a {size} {colour} {shape} {position}, {background} background",
    "{size} {colour} {shape} {position} on {background}",
    "a {background} background with a {size} {colour} {shape} {position}",
    "{colour} {shape} {position}, {size}, {background} background",
)
# Every word a caption can use: the demo tokenizer gives each one a single token.
WORDS = sorted(
    {w for t in _TEMPLATES for w in t.replace(",", " ").split() if not w.startswith("{")}
    | {w for ws in (*_SIZE_WORDS.values(), *_POSITION_WORDS.values()) for p in ws for w in p.split()}
    | set(COLOURS)
    | set(SHAPES)
)


@dataclass(frozen=True)
class Scene:
    colour: str  # the object's colour name
    shape: str
    background: str
    size: str | None  # None: unsaid in the caption (any radius)
    position: str | None  # None: unsaid (anywhere)

    def caption(self, rng: np.random.Generator | None = None) -> str:
        """One wording of this scene (the first template and wordings without an rng)."""

        def pick(options):
            return options[0] if rng is None else options[rng.integers(len(options))]

        text = pick(_TEMPLATES).format(
            size=pick(_SIZE_WORDS[self.size]),
            colour=self.colour,
            shape=self.shape,
            position=pick(_POSITION_WORDS[self.position]),
            background=self.background,
        )
        text = " ".join(text.split()).replace(" ,", ",").replace(", ,", ",").strip(" ,")
        return text.replace(",,", ",")


def held_out(colour: str, shape: str, background: str) -> bool:
    """About one (colour, shape, background) triple in nine never appears in training: the tests ask for them."""
    c, s, b = list(COLOURS).index(colour), SHAPES.index(shape), list(COLOURS).index(background)
    return (c + 3 * s + 5 * b) % 9 == 4


def random_scene(rng: np.random.Generator, *, training: bool = True) -> Scene:
    """A random scene; with training=True, never one of the held-out triples."""
    names = list(COLOURS)
    while True:
        colour, background = rng.choice(len(names), size=2, replace=False)
        shape = SHAPES[rng.integers(len(SHAPES))]
        if not (training and held_out(names[colour], shape, names[background])):
            break
    return Scene(
        colour=names[colour],
        shape=shape,
        background=names[background],
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
    )


def draw(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Render a scene as a (64, 64, 3) uint8 image, with a random radius and jittered position."""
    lo, hi = RADII[scene.size]
    r = rng.uniform(lo, hi)
    if scene.position is None:
        cx, cy = rng.uniform(r + 1, SIZE - 1 - r, size=2)
    else:
        ax, ay = ANCHORS[scene.position]
        # Along the named axis a little jitter; across it more, so "left" is about x, not a fixed spot.
        jx, jy = (3, 8) if scene.position in ("left", "right") else (8, 3) if scene.position != "centre" else (3, 3)
        cx = np.clip(ax + rng.uniform(-jx, jx), r + 1, SIZE - 1 - r)
        cy = np.clip(ay + rng.uniform(-jy, jy), r + 1, SIZE - 1 - r)
    # 4x supersampled coverage gives anti-aliased edges, as a photo-like image would have.
    ss = 4
    coords = (np.arange(SIZE * ss) + 0.5) / ss
    x, y = np.meshgrid(coords, coords)
    if scene.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif scene.shape == "square":
        inside = (np.abs(x - cx) <= r * 0.89) & (np.abs(y - cy) <= r * 0.89)  # same area as the circle
    else:  # upright triangle with the same area as the circle, centred on its centroid
        side = r * 2.69
        h = side * np.sqrt(3) / 2
        top, base = cy - 2 * h / 3, cy + h / 3
        half = (y - top) / h * side / 2
        inside = (y >= top) & (y <= base) & (np.abs(x - cx) <= half)
    cover = inside.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))[..., None]  # (64, 64, 1)
    fg = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(COLOURS[scene.background], np.float32)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def batch(seed: int, n: int, *, training: bool = True) -> tuple[list[str], np.ndarray]:
    """n captions and their (n, 64, 64, 3) uint8 images, deterministic for the seed."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, training=training) for _ in range(n)]
    return [s.caption(rng) for s in scenes], np.stack([draw(s, rng) for s in scenes])


@dataclass(frozen=True)
class Reading:
    """What the analyser sees in a picture."""

    background: str
    colour: str | None  # None: no object found
    centre: tuple[float, float] | None  # object centroid (x, y) in 64-pixel units
    shape: str | None
    area: float  # object pixels as a share of the picture

    def position_matches(self, position: str) -> bool:
        """The centroid lies on the named side (with a margin), or near the middle for 'centre'."""
        if self.centre is None:
            return False
        x, y = self.centre
        half = SIZE / 2
        return {
            "left": x < half - 4,
            "right": x > half + 4,
            "top": y < half - 4,
            "bottom": y > half + 4,
            "centre": abs(x - half) < 8 and abs(y - half) < 8,
        }[position]


def analyse(image: np.ndarray) -> Reading:
    """Classify each pixel to the nearest named colour; the border's commonest colour is the background and
    the commonest other colour, away from edges, is the object's."""
    img = np.asarray(image, np.float32)
    if img.shape[0] != SIZE:  # average blocks down to 64x64 (upscaled pictures are integer multiples)
        f = img.shape[0] // SIZE
        img = img[: SIZE * f, : SIZE * f].reshape(SIZE, f, SIZE, f, 3).mean(axis=(1, 3))
    palette = np.array(list(COLOURS.values()), np.float32)
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)  # (64, 64, 8)
    label = dist.argmin(-1)
    border = np.concatenate([label[:2].ravel(), label[-2:].ravel(), label[:, :2].ravel(), label[:, -2:].ravel()])
    bg = np.bincount(border, minlength=len(palette)).argmax()
    # Object pixels: clearly nearer another named colour than the background (edge blends are left out).
    confident = dist.min(-1) < 0.5 * dist[..., bg]
    obj = (label != bg) & confident
    names = list(COLOURS)
    if obj.sum() < 8:
        return Reading(names[bg], None, None, None, 0.0)
    colour = np.bincount(label[obj], minlength=len(palette)).argmax()
    mask = label == colour
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    # Filled share of the bounding box: square ~1, circle ~pi/4, triangle ~1/2.
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    return Reading(names[bg], names[colour], (xs.mean() + 0.5, ys.mean() + 0.5), shape, float(mask.mean()))


def prompt_suite() -> list[Scene]:
    """The test prompts: every background with a different object colour, shapes and positions cycled, half of
    them (colour, shape, background) triples never seen in training."""
    names = list(COLOURS)
    scenes = []
    k = 0
    for b, background in enumerate(names):
        for c, colour in enumerate(names):
            if colour == background:
                continue
            unseen = [s for s in SHAPES if held_out(colour, s, background)]
            if not unseen and (b * 7 + c) % 2:
                continue  # keep every pair with a held-out shape and about half of the others
            shape = unseen[0] if unseen else SHAPES[(b + c) % 3]
            scenes.append(Scene(colour, shape, background, SIZES[k % 2], POSITIONS[k % 5]))
            k += 1
    return scenes
