"""The loader's fast image paths give exactly the pixels of the straightforward implementations they replaced.

The references below are the plain formulations (TF's crop_and_resize formula with four corner gathers per output
pixel; colour jitter with np.where; pixel values via cat + addcmul + stack). The fast paths reorder work (separable
lerp, per-plane passes, in-place buffers, branch-free case selection, channel-planar storage) but must perform the
same float32 operations per value: equality is exact, never a tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tf_reference import tf_decode_resize

from prismatic.data import collator as collator_module
from prismatic.data.augmentation import AugmentationConfig, adjust_saturation_hue, augment_image
from prismatic.data.collator import VLACollator
from prismatic.data.image_ops import center_crop, crop_resize_bilinear, crop_resize_bilinear_planes
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.models.image_transform import images_to_pixel_values, planar_images_to_pixel_values
from prismatic.training.train_step import to_device

NAME = "libero_10_no_noops"


def reference_crop(image: np.ndarray, area: float, top_frac: float, left_frac: float, size: int) -> np.ndarray:
    pixels = image.astype(np.float32) * np.float32(1.0 / 255.0)
    side = np.float32(min(max(np.sqrt(np.float32(area)), 0.0), 1.0))
    margin = np.float32(1.0) - side
    y0 = margin / np.float32(2.0) if top_frac == 0.5 else np.float32(margin * np.float32(top_frac))
    x0 = margin / np.float32(2.0) if left_frac == 0.5 else np.float32(margin * np.float32(left_frac))

    def axis(n_in: int, start: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stop = start + side  # TF's box is (start, start + side); its width is recomputed from the box
        scale = np.float32((stop - start) * np.float32(n_in - 1)) / np.float32(size - 1)
        coords = (start * np.float32(n_in - 1) + np.arange(size, dtype=np.float32) * scale).astype(np.float32)
        low = np.floor(coords).astype(np.int64)
        return low, np.ceil(coords).astype(np.int64), (coords - low).astype(np.float32)

    top, bottom, yw = axis(image.shape[0], y0)
    left, right, xw = axis(image.shape[1], x0)
    xw = xw[None, :, None]
    upper = pixels[top][:, left] + (pixels[top][:, right] - pixels[top][:, left]) * xw
    lower = pixels[bottom][:, left] + (pixels[bottom][:, right] - pixels[bottom][:, left]) * xw
    out = upper + (lower - upper) * yw[:, None, None]
    return (np.clip(out, 0.0, 1.0) * np.float32(255.5)).astype(np.uint8)


def reference_saturation_hue(planes: np.ndarray, saturation_factor: float, hue_delta: float) -> np.ndarray:
    r, g, b = planes[0], planes[1], planes[2]
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    inv = np.float32(1.0) / np.maximum(c, np.float32(1e-12))
    is_r = v == r
    is_g = ~is_r & (v == g)
    is_b = ~(is_r | is_g)
    hue = np.where(is_r, g - b, np.where(is_g, b - r, r - g)) * inv
    hue += is_g * np.float32(2.0) + is_b * np.float32(4.0) + np.float32(6.0 + 6.0 * hue_delta)
    chroma = np.minimum(c * np.float32(saturation_factor), v)
    out = np.empty_like(planes)
    for i, n in enumerate((5.0, 3.0, 1.0)):
        k = hue + np.float32(n)
        k -= np.float32(6.0) * np.floor(k * np.float32(1.0 / 6.0))
        w = np.clip(np.minimum(k, np.float32(4.0) - k), 0.0, 1.0)
        out[i] = v - chroma * w
    return out


def reference_augment(image: np.ndarray, rng: np.random.Generator, config: AugmentationConfig, size: int = 224
                      ) -> np.ndarray:
    top, left, bright, contrast, sat, hue = rng.random(6)
    image = reference_crop(image, config.crop_area, float(top), float(left), size)
    bright_lut = np.clip(np.arange(256, dtype=np.float64) / 255.0 + (2.0 * bright - 1.0) * config.brightness, 0, 1)
    factor = config.contrast[0] + contrast * (config.contrast[1] - config.contrast[0])
    x = np.empty((3, size, size), dtype=np.float32)
    for c in range(3):
        channel = np.ascontiguousarray(image[:, :, c])
        mean = float(np.bincount(channel.ravel(), minlength=256) @ bright_lut) / channel.size
        x[c] = np.clip((bright_lut - mean) * factor + mean, 0.0, 1.0).astype(np.float32)[channel]
    s_factor = config.saturation[0] + sat * (config.saturation[1] - config.saturation[0])
    x = np.clip(reference_saturation_hue(x, s_factor, (2.0 * hue - 1.0) * config.hue), 0.0, 1.0)
    return np.rint(x * np.float32(255.0)).astype(np.uint8).transpose(1, 2, 0)


def reference_pixel_values(images: np.ndarray, normalization: dict | None = None) -> torch.Tensor:
    norm = normalization or {"mean": ((0.485, 0.456, 0.406), (0.5,) * 3), "std": ((0.229, 0.224, 0.225), (0.5,) * 3)}
    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)
    mean = torch.tensor([v for group in norm["mean"] for v in group], dtype=torch.float64)
    std = torch.tensor([v for group in norm["std"] for v in group], dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, 6, 1, 1)
    bias = (-mean / std).to(torch.float32).view(1, 6, 1, 1)
    return torch.addcmul(bias, torch.cat([x, x], dim=1), scale).reshape(-1, *x.shape[2:])


def _images(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Random, flat, quantised (many max-channel ties) and grey images, square and not."""
    images = []
    for i in range(count):
        shape = (224, 224, 3) if i % 3 else (int(rng.integers(60, 300)), int(rng.integers(60, 300)), 3)
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        if i % 5 == 0:
            image[:] = image[:1, :1]
        elif i % 5 == 1:
            image[..., 1] = image[..., 0]
        elif i % 5 == 2:
            image = (image // 64 * 64).astype(np.uint8)
        elif i % 5 == 3:
            image[..., 1:] = image[..., :1]
        images.append(image)
    return images


def test_crop_resize_equals_the_four_corner_formula():
    rng = np.random.default_rng(0)
    for i, image in enumerate(_images(rng, 60)):
        top, left = (0.5, 0.5) if i % 7 == 0 else ((0.0, 1.0) if i % 7 == 1 else rng.random(2))
        area = float(rng.choice([0.9, 0.5, 0.81, 0.95]))
        size = int(rng.choice([224, 96, 300]))
        want = reference_crop(image, area, float(top), float(left), size)
        got = crop_resize_bilinear(image, area, float(top), float(left), size)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(crop_resize_bilinear_planes(image, area, float(top), float(left), size),
                                      want.transpose(2, 0, 1))
        assert got.flags.c_contiguous


def test_saturation_hue_equals_the_where_formulation():
    rng = np.random.default_rng(1)
    for _ in range(40):
        planes = rng.random((3, 31, 17)).astype(np.float32)
        planes[:, :5] = planes[:1, :5]  # grey pixels: chroma 0
        planes[1, 5:9] = planes[0, 5:9]  # r == g ties
        planes[:, 9:11] = np.round(planes[:, 9:11] * 4) / 4  # more ties, exact 0 and 1
        s_factor, delta = 0.8 + 0.4 * rng.random(), 0.1 * rng.random() - 0.05
        want = reference_saturation_hue(planes, s_factor, delta)
        before = planes.copy()
        np.testing.assert_array_equal(adjust_saturation_hue(planes, s_factor, delta), want)
        np.testing.assert_array_equal(planes, before)  # out=None leaves the input alone
        np.testing.assert_array_equal(adjust_saturation_hue(planes, s_factor, delta, out=planes), want)


@pytest.mark.parametrize("torch_threads", [1, 2])  # the histogram takes torch's path on 1 thread, numpy's otherwise
def test_augment_equals_the_reference_pipeline(torch_threads):
    rng = np.random.default_rng(2)
    config = AugmentationConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        results = [augment_image(image, np.random.default_rng([7, i, 1]), config)
                   for i, image in enumerate(_images(rng, 60))]
    finally:
        torch.set_num_threads(threads)
    for i, (image, got) in enumerate(zip(_images(np.random.default_rng(2), 60), results, strict=True)):
        want = reference_augment(image, np.random.default_rng([7, i, 1]), config)
        assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        assert got.transpose(2, 0, 1).flags.c_contiguous  # channel-planar storage, the collator's layout


@pytest.mark.parametrize("normalization", [None, {"mean": ((0.484375, 0.455078, 0.40625), (0.5, 0.5, 0.5)),
                                                    "std": ((0.229492, 0.224609, 0.225586), (0.5, 0.5, 0.5))}])
def test_pixel_values_equal_the_stacked_reference(normalization):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 224, 200, 3), dtype=np.uint8)
    images[0, 0, :256 - 200] = np.arange(200, 256)[:, None]
    images[0, 1, :] = np.arange(200)[:, None]  # every uint8 value in every channel
    planar = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    want = reference_pixel_values(images, normalization)
    assert torch.equal(images_to_pixel_values(images, normalization), want)
    assert torch.equal(images_to_pixel_values(planar, normalization), want)
    assert torch.equal(images_to_pixel_values(list(images), normalization), want)
    # the training batch's path: uint8 planar (B, N, 3, H, W) normalised at once on the device
    batch = np.stack([images, images[::-1], 255 - images])
    got = planar_images_to_pixel_values(torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 1, 4, 2, 3))),
                                        normalization)
    assert torch.equal(got, torch.stack([reference_pixel_values(b, normalization) for b in batch]))
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, W\)"):
        planar_images_to_pixel_values(torch.zeros(2, 6, 4, 4, dtype=torch.uint8))


def test_dataset_pixels_follow_seed_position_camera(libero_root, tokenizer):
    """A training sample's pixels = reference augmentation of TensorFlow's decode + lanczos3 resize of the same stored
    JPEG bytes (upstream's RLDS pipeline) with the generator of (seed, position, camera); the batch's pixel values =
    the reference conversion of those images."""
    root, _ = libero_root
    ds = RLDSFrameDataset(root, NAME, tokenizer, num_images_in_input=2, image_aug=True, seed=5)
    source = ds.sources[0]
    samples = [ds[p] for p in (0, 3, 17)]
    for position, sample in zip((0, 3, 17), samples, strict=True):
        _, e, t = sample["sample_id"].split("/")
        step = int(source.table.episode_starts[int(e)]) + int(t)
        for camera_index, camera in enumerate(("image", "wrist_image")):
            resized = tf_decode_resize(source.reader.jpeg_bytes(camera, step))
            want = reference_augment(resized, np.random.default_rng([5, position, camera_index]), ds.augmentation)
            np.testing.assert_array_equal(sample["images"][camera_index], want)
    batch = VLACollator(ds.pad_token_id)(samples)
    assert batch["images"].dtype == torch.uint8 and "pixel_values" not in batch
    assert torch.equal(to_device(batch, torch.device("cpu"))["pixel_values"],
                       torch.stack([reference_pixel_values(s["images"]) for s in samples]))
    frame = ds.get_frame(4)  # evaluation view: the center crop
    _, e, t = frame["sample_id"].split("/")
    step = int(source.table.episode_starts[int(e)]) + int(t)
    resized = tf_decode_resize(source.reader.jpeg_bytes("image", step))
    np.testing.assert_array_equal(source.reader.image("image", step), resized)
    np.testing.assert_array_equal(frame["images"][0], center_crop(resized))


def test_collator_allocates_shared_memory_in_workers(monkeypatch):
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    samples = [{"images": images, "input_ids": np.arange(3), "actions": np.zeros((8, 7)), "proprio": np.zeros(8),
                "sample_id": "a", "content_hash": "h", "dataset_name": "d"}] * 2
    assert not VLACollator(0)(samples)["images"].is_shared()
    monkeypatch.setattr(collator_module, "get_worker_info", lambda: object())
    batch = VLACollator(0)(samples)
    assert batch["images"].is_shared() and batch["images"].shape == (2, 2, 3, 8, 8)
    assert batch["images"].dtype == torch.uint8
    assert torch.equal(batch["images"][1], torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    images[1, 2, 3] = (7, 8, 9)  # the planar copy puts each channel in its plane
    batch = VLACollator(0)(samples)
    assert batch["images"][0, 1, :, 2, 3].tolist() == [7, 8, 9] and int(batch["images"].sum()) == 2 * 24
    assert torch.equal(to_device(batch, torch.device("cpu"))["pixel_values"][1], reference_pixel_values(images))
