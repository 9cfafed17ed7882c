"""Every accepted image becomes the 8-bit RGB tensor its 8-bit RGB version gives (any bit depth,
gray, palette, alpha), unconvertible ones are refused in one line naming the file, and an image
that would be upscaled is named in one warning."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type → samples per pixel
RNG = np.random.default_rng(0)


def write_png(path: Path, samples: np.ndarray, depth: int, ctype: int, palette=None, trns: bytes = None) -> Path:
    """A PNG written byte by byte (PIL cannot write 16-bit RGB or 2-bit gray): `samples` (H, W, C) as
    stored, at `depth` bits, PNG colour type `ctype` (0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA)."""
    h, w = samples.shape[:2]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    flat = samples.reshape(h, w * CHANNELS[ctype])
    rows = []
    for r in flat:
        if depth == 16:
            b = r.astype(">u2").tobytes()
        elif depth == 8:
            b = r.astype(np.uint8).tobytes()
        else:
            bits = np.unpackbits(r.astype(np.uint8)[:, None], axis=1)[:, 8 - depth:].reshape(-1)
            b = np.packbits(bits).tobytes()
        rows.append(b"\0" + b)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
    if palette is not None:
        data += chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    if trns is not None:
        data += chunk(b"tRNS", trns)
    data += chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def rgb8_file(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)
    return path


def same_as_8bit(tmp_path: Path, f: Path, want_rgb: np.ndarray) -> None:
    """The file reads as `want_rgb` and loads to the same tensor as its 8-bit RGB version."""
    from cores.data import load_image, read_rgb8

    ref = rgb8_file(tmp_path / "ref8.png", want_rgb)
    np.testing.assert_array_equal(read_rgb8(f), want_rgb)
    for res in (16, 32):
        assert torch.equal(load_image(f, res), load_image(ref, res))


H, W = 20, 24


@pytest.mark.parametrize("depth", [1, 2, 4, 8, 16])
def test_gray_at_every_bit_depth(tmp_path, depth):
    levels = 2 ** min(depth, 8) - 1
    v8 = RNG.integers(0, levels + 1, (H, W)) * (255 // levels)   # 8-bit values this depth can hold
    stored = v8 * 257 if depth == 16 else v8 // (255 // levels)
    f = write_png(tmp_path / "g.png", stored[..., None], depth, 0)
    same_as_8bit(tmp_path, f, np.repeat(v8[..., None], 3, -1))


@pytest.mark.parametrize("scale", [256, 257])
def test_sixteen_bit_made_from_eight_bit_gives_the_eight_bit_values(tmp_path, scale):
    v8 = RNG.integers(0, 256, (H, W, 3))
    same_as_8bit(tmp_path, write_png(tmp_path / "rgb16.png", v8 * scale, 16, 2), v8)
    g8 = RNG.integers(0, 256, (H, W))
    same_as_8bit(tmp_path, write_png(tmp_path / "g16.png", (g8 * scale)[..., None], 16, 0),
                 np.repeat(g8[..., None], 3, -1))


def test_sixteen_bit_gray_is_not_white(tmp_path):
    """The reported failure: a mid-gray 16-bit image read as all 255."""
    from cores.data import read_rgb8

    f = write_png(tmp_path / "g16.png", np.full((H, W, 1), 128 * 257), 16, 0)
    assert read_rgb8(f).mean() == 128


@pytest.mark.parametrize("depth", [8, 16])
def test_rgb_at_8_and_16_bit(tmp_path, depth):
    v8 = RNG.integers(0, 256, (H, W, 3))
    same_as_8bit(tmp_path, write_png(tmp_path / "c.png", v8 * (257 if depth == 16 else 1), depth, 2), v8)


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_palette_at_every_bit_depth(tmp_path, depth):
    palette = RNG.integers(0, 256, (2 ** depth, 3))
    idx = RNG.integers(0, 2 ** depth, (H, W))
    same_as_8bit(tmp_path, write_png(tmp_path / "p.png", idx[..., None], depth, 3, palette=palette), palette[idx])


@pytest.mark.parametrize("depth,ctype", [(8, 4), (16, 4), (8, 6), (16, 6)])
def test_opaque_alpha_is_dropped_without_a_word(tmp_path, capfd, depth, ctype):
    v8 = RNG.integers(0, 256, (H, W, 3 if ctype == 6 else 1))
    a = np.full((H, W, 1), 255)
    k = 257 if depth == 16 else 1
    f = write_png(tmp_path / "a.png", np.concatenate([v8, a], -1) * k, depth, ctype)
    same_as_8bit(tmp_path, f, np.repeat(v8, 3 // v8.shape[-1], -1))
    assert "warning" not in capfd.readouterr().err


@pytest.mark.parametrize("depth,ctype", [(8, 4), (16, 4), (8, 6), (16, 6)])
def test_transparency_is_composited_on_white_and_named(tmp_path, capfd, depth, ctype):
    from cores.data import ALPHA_BACKGROUND

    assert ALPHA_BACKGROUND == (255, 255, 255)
    v8 = RNG.integers(0, 256, (H, W, 3 if ctype == 6 else 1))
    a = RNG.integers(0, 256, (H, W, 1))
    k = 257 if depth == 16 else 1
    f = write_png(tmp_path / f"t{depth}{ctype}.png", np.concatenate([v8, a], -1) * k, depth, ctype)
    want = np.round(np.repeat(v8, 3 // v8.shape[-1], -1) * (a / 255) + 255 * (1 - a / 255)).astype(np.uint8)
    same_as_8bit(tmp_path, f, want)
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and str(f) in err[0] and "white" in err[0]


def test_trns_colour_and_palette_alpha(tmp_path):
    g = RNG.integers(0, 256, (H, W))
    g[0, 0] = 7
    want = np.repeat(np.where(g == 7, 255, g)[..., None], 3, -1)
    same_as_8bit(tmp_path, write_png(tmp_path / "g8t.png", g[..., None], 8, 0, trns=struct.pack(">H", 7)), want)
    same_as_8bit(tmp_path, write_png(tmp_path / "g16t.png", g[..., None] * 257, 16, 0,
                                     trns=struct.pack(">H", 7 * 257)), want)
    palette = RNG.integers(0, 256, (4, 3))
    idx = RNG.integers(0, 4, (H, W))
    idx[0, 0] = 0
    want = palette[idx].copy()
    want[idx == 0] = 255  # entry 0 fully transparent
    same_as_8bit(tmp_path, write_png(tmp_path / "pt.png", idx[..., None], 2, 3, palette=palette, trns=b"\x00"),
                 want)


@pytest.mark.parametrize("mode", ["CMYK", "F", "I"])
def test_unconvertible_modes_are_refused_naming_the_file(tmp_path, mode):
    from cores.data import read_rgb8
    from cores.errors import ConfigError

    f = tmp_path / "odd.tif"
    if mode == "CMYK":
        Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(f)
    else:
        Image.fromarray(np.full((8, 8), 70000, np.int32 if mode == "I" else np.float32), mode).save(f)
    with pytest.raises(ConfigError) as err:
        read_rgb8(f)
    msg = str(err.value)
    assert str(f) in msg and mode in msg and "\n" not in msg


def test_broken_file_is_refused_naming_the_file(tmp_path):
    from cores.data import read_rgb8
    from cores.errors import ConfigError

    f = tmp_path / "half.png"
    good = (ROOT / "dataset" / "demo-ffhq" / "00000.png").read_bytes()
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match="half.png"):
        read_rgb8(f)


def test_small_image_is_named_in_one_warning(tmp_path, capfd):
    from cores.validation import check_image_files

    small = rgb8_file(tmp_path / "tiny.png", RNG.integers(0, 256, (8, 8, 3)))
    big = rgb8_file(tmp_path / "big.png", RNG.integers(0, 256, (64, 80, 3)))
    check_image_files([small, big], 64)
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "tiny.png" in err[0] and "8x8" in err[0] and "upscaled" in err[0]


@pytest.mark.usefixtures("one_thread")
def test_run_on_sixteen_bit_copies_matches_the_eight_bit_run(tmp_path):
    """End to end: the demo images re-saved as 16-bit gray+alpha and 16-bit RGB give the same
    ground truth and samples as their 8-bit versions."""
    from conftest import compose
    from cores.pipeline import run

    d8, d16 = tmp_path / "d8", tmp_path / "d16"
    d8.mkdir(), d16.mkdir()
    for i, src in enumerate(sorted((ROOT / "dataset" / "demo-ffhq").iterdir())[:2]):
        rgb = np.asarray(Image.open(src).convert("RGB")).astype(np.int64)
        if i == 0:  # gray: the 8-bit version is its gray value in every channel
            gray = rgb[..., 0]
            rgb = np.repeat(gray[..., None], 3, -1)
            write_png(d16 / src.name, np.stack([gray, np.full_like(gray, 255)], -1) * 257, 16, 4)
        else:
            write_png(d16 / src.name, rgb * 257, 16, 2)
        rgb8_file(d8 / src.name, rgb)
    common = ["data.end_id=2", "num_samples=2", "sampler.annealing.num_steps=2", "sampler.mcmc.num_steps=1",
              "eval.lpips=false", f"save_dir={tmp_path}"]
    a = run(compose(common + [f"data.root={d8}", "name=a"]))
    b = run(compose(common + [f"data.root={d16}", "name=b"]))
    assert [r["psnr"] for r in a["images"]] == [r["psnr"] for r in b["images"]]
    for i in range(2):
        ga = np.asarray(Image.open(tmp_path / "a" / "gt" / f"{i:05d}.png"))
        gb = np.asarray(Image.open(tmp_path / "b" / "gt" / f"{i:05d}.png"))
        assert np.array_equal(ga, gb) and 30 < gb.mean() < 225
