"""Golden of upstream's policy-image resize (`tf_resize_golden.npz`), made by upstream's own function on its pinned
TensorFlow, and a check of another TensorFlow against it.

Upstream's LIBERO evaluation resizes each 256 px frame with `resize_image_for_policy` (openvla_utils.py):
`tf.image.encode_jpeg` (quality 95) -> `tf.io.decode_image` -> `tf.image.resize(224, "lanczos3", antialias=True)` ->
round, clip to [0, 255], uint8. The golden holds its outputs on `synthetic_frames()` (numpy only: any side can rebuild
the inputs from the seeds).

Make the golden (the venv of tests/parity/upstream_pinned_requirements.txt, tensorflow 2.15.0; the upstream checkout
of tests/parity/generate_upstream_golden.py's docstring):

    /scratch/upvenv/bin/python tests/libero/generate_tf_resize_golden.py --upstream_dir /scratch/upstream \\
        --output tests/libero/tf_resize_golden.npz

Compare another TensorFlow with it (e.g. this project's venv; the same op sequence, written here, not upstream's code):

    .venv/bin/python tests/libero/generate_tf_resize_golden.py --compare tests/libero/tf_resize_golden.npz
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

SIZE_IN, SIZE_OUT = 256, 224


# (smooth gradients, gaussian noise) per frame; every frame has the hard-edged shapes. Not all three everywhere: JPEG
# blocks on gradients and noise barely deflate, and the golden must stay small (< 300 kB).
FRAME_KINDS = {0: (True, True), 1: (False, True), 2: (True, False)}
NOISE_ROWS = slice(160, 224)


def synthetic_frame(seed: int) -> np.ndarray:
    """A (256, 256, 3) uint8 frame: hard-edged shapes (rectangles, a disc, 1 px lines) on smooth sinusoidal gradients
    or a flat grey, with or without gaussian noise (sigma 6, rows 160-223), as FRAME_KINDS says: the resize meets
    ringing edges, flat areas and high frequencies."""
    gradients, noise = FRAME_KINDS[seed]
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE_IN, 0:SIZE_IN].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    if gradients:
        img = np.stack([127 + 90 * np.sin(x / (70 + 15 * c) + y / (90 + 10 * c) + phase[c]) for c in range(3)], -1)
    else:
        img = np.full((SIZE_IN, SIZE_IN, 3), 128.0)
    for _ in range(4):  # rectangles of flat colour
        y0, x0 = rng.integers(0, SIZE_IN - 40, 2)
        h, w = rng.integers(12, 90, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    cy, cx, r = *rng.integers(60, 196, 2), rng.integers(15, 50)
    img[(y - cy) ** 2 + (x - cx) ** 2 <= r * r] = rng.integers(0, 256, 3)
    img[::17, :] = 255 * (seed % 2)  # 1 px lines: the highest frequency the antialiasing must handle
    if noise:
        img[NOISE_ROWS] += rng.normal(0, 6, img[NOISE_ROWS].shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def synthetic_frames() -> np.ndarray:
    return np.stack([synthetic_frame(s) for s in sorted(FRAME_KINDS)])


def tf_resize(img: np.ndarray) -> np.ndarray:
    """The op sequence of upstream's resize_image_for_policy, on this process's TensorFlow."""
    import tensorflow as tf

    encoded = tf.image.encode_jpeg(img)
    decoded = tf.io.decode_image(encoded, expand_animations=False, dtype=tf.uint8)
    resized = tf.image.resize(decoded, (SIZE_OUT, SIZE_OUT), method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


def _upstream_resize(upstream_dir: Path):
    """upstream's resize_image_for_policy, imported from the checkout the parity generator checks."""
    path = Path(__file__).resolve().parents[1] / "parity" / "generate_upstream_golden.py"
    spec = importlib.util.spec_from_file_location("generate_upstream_golden", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    try:
        gen.check_versions()
        gen.check_upstream(upstream_dir)
        return gen.import_upstream(upstream_dir)["openvla_utils"].resize_image_for_policy, gen
    except gen.GeneratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def generate(upstream_dir: Path, output: Path) -> None:
    import tensorflow as tf

    resize, gen = _upstream_resize(upstream_dir)
    frames = synthetic_frames()
    out = np.stack([resize(f, SIZE_OUT) for f in frames])
    own = np.stack([tf_resize(f) for f in frames])
    if not np.array_equal(out, own):  # this script's op sequence must be upstream's, or --compare means nothing
        raise SystemExit("error: tf_resize differs from upstream's resize_image_for_policy — fix tf_resize")
    np.savez_compressed(output, resized=out, seeds=np.array(sorted(FRAME_KINDS)), tensorflow=tf.__version__,
                        upstream_commit=gen.UPSTREAM_COMMIT)
    print(f"tensorflow {tf.__version__}: wrote {output} ({output.stat().st_size} bytes)")


def compare(golden: Path) -> None:
    import tensorflow as tf

    data = np.load(golden)
    want = data["resized"]
    got = np.stack([tf_resize(f) for f in synthetic_frames()])
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    print(f"tensorflow {tf.__version__} vs {data['tensorflow']}: bit-identical={bool((diff == 0).all())}, "
          f"max |diff| {diff.max()}, differing values {int((diff > 0).sum())} of {diff.size}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Upstream's TF resize golden: make it, or compare a TF with it.")
    parser.add_argument("--upstream_dir", type=Path, help="upstream checkout (with --output: make the golden)")
    parser.add_argument("--output", type=Path, help="npz to write")
    parser.add_argument("--compare", type=Path, help="npz to compare this process's TensorFlow with")
    args = parser.parse_args(argv)
    if args.compare is not None:
        if not args.compare.is_file():
            print(f"error: '{args.compare}' does not exist — give the golden npz", file=sys.stderr)
            sys.exit(2)
        compare(args.compare)
    elif args.upstream_dir is not None and args.output is not None:
        if args.output.exists():
            print(f"error: '{args.output}' already exists — remove it or give another path", file=sys.stderr)
            sys.exit(2)
        generate(args.upstream_dir, args.output)
    else:
        print("error: give --upstream_dir and --output (make the golden) or --compare NPZ", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
