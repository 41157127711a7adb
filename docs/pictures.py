"""Draw docs/image-jobs.png: text to image, image to image and inpainting with the built-in demo model.

    .venv/bin/python docs/pictures.py

The same calls as the README's commands (Python API, no upscale), side by side at 4x nearest-neighbour.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffrt import Pipeline
from diffrt.demo import demo_bundle

OUT = Path(__file__).with_name("image-jobs.png")


def main() -> None:
    pipe = Pipeline.load(demo_bundle(), backend="ort-cpu")
    kw = dict(seed=0, upscale=False)
    base = pipe("a small red circle on the left on a blue background", **kw).images[0]
    square = pipe("a large red square on the left on a blue background", image=base, strength=0.75, **kw).images[0]
    w, h = base.size
    mask = Image.new("L", base.size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, w // 2, h), fill=255)
    inpaint = pipe(
        "a yellow circle on the left on a blue background", image=base, mask_image=mask, paste_back=True, **kw
    ).images[0]
    tiles = [base, square, mask.convert("RGB"), inpaint]
    grid = np.concatenate([np.asarray(t.resize((4 * w, 4 * h), Image.NEAREST)) for t in tiles], axis=1)
    Image.fromarray(grid).save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
