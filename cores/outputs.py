"""Run-folder writing: every file is replaced atomically, JSONL lines are appended whole.

A kill at any moment leaves either the old or the new version of a file,
never half of one, so an interrupted run can always be resumed.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image


def _create_temp(directory: Path, name: str) -> Tuple[int, str]:
    """A new file beside the target, created like `open(path, "xb")` would (mode 0666 minus the umask).

    `tempfile.mkstemp` creates 0600 files, which would leave results unreadable to anyone else
    sharing a results folder.
    """
    while True:
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_jsonl(path: Path, obj: Any) -> None:
    """One whole line per call (a single write of a complete line, then fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> List[Dict]:
    """Complete lines only (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3,H,W) in [-1,1] → (H,W,3) uint8 (non-finite values shown as black)."""
    x = torch.nan_to_num(x.detach().float().cpu(), nan=-1.0, posinf=1.0, neginf=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_png(path: Path, img: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def measurement_view(y: torch.Tensor) -> np.ndarray:
    """Log-amplitude view of a (3,H,W) Fourier amplitude, grey levels spread over [0,255].

    The DC term is ~1000× the typical amplitude, so a linear (or log1p) view is almost black;
    log|y| stretched between its 5th and 99.9th percentiles shows the speckle structure.  Noisy
    amplitudes can be negative; their magnitude is shown.
    """
    a = y.detach().float().cpu().abs().mean(0)
    top = float(a.max())
    v = torch.log(a + max(top, 1e-12) * 1e-6)
    lo, hi = torch.quantile(v.flatten(), torch.tensor([0.05, 0.999])).tolist()
    v = ((v - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    g = (v * 255).round().byte().numpy()
    return np.stack([g, g, g], axis=-1)


# --- grid_results.png -----------------------------------------------------------------------------
GRID_BACKGROUND = 255
GRID_MARGIN = 7          # space around a tile; the best/selected/pruned frames are drawn inside it
MARK_COLOURS = {"best": (0, 160, 0), "selected": (0, 90, 230), "pruned": (210, 0, 0)}
GRID_LEGEND = ("PSNR in dB vs ground truth (twin: vs its 180-degree rotation, shown when higher); "
               "green frame = best PSNR (oracle), blue = selected (lowest measurement loss)")
GRID_LEGEND_PRUNED = ("red frame = pruned (masking: sampled to the end but not kept); "
                      "'pruned' under the ground truth lists particles removed by slicing")


@dataclass
class GridCell:
    """One tile of the grid with the text under it and its frames (`best`, `selected`)."""
    image: np.ndarray
    caption: List[str] = field(default_factory=list)
    marks: List[str] = field(default_factory=list)


def upscale_nearest(img: np.ndarray, factor: int) -> np.ndarray:
    """Integer nearest-neighbour enlargement: every pixel becomes a factor×factor block, no blur."""
    return img if factor <= 1 else np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _text_size(draw, text: str, font) -> Tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def render_grid(header: List[List[str]], rows: List[List[GridCell]], scale: int = 1,
                legend: Union[str, List[str]] = GRID_LEGEND) -> Optional[np.ndarray]:
    """Header row (one list of lines per column), then one row per image with captions under the
    tiles; tiles are enlarged by the integer `scale` with nearest-neighbour only; the legend (one or
    more lines) at the bottom."""
    from PIL import ImageDraw

    rows = [r for r in rows if r]
    if not rows:
        return None
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(_text_size(probe, "Ag|(0", font)[1], 8) + 3
    ncol = max(len(r) for r in rows)
    cells = [[upscale_nearest(c.image, scale) for c in r] for r in rows]
    col_w = []
    for j in range(ncol):
        widths = [t.shape[1] for r in cells for t in r[j:j + 1]]
        widths += [_text_size(probe, line, font)[0] for r in rows for c in r[j:j + 1] for line in c.caption]
        col_w.append(max(widths) + 2 * GRID_MARGIN)
    header_lines = max((len(h) for h in header), default=0)
    header_h = header_lines * line_h + 2 * GRID_MARGIN
    cap_lines = max(len(c.caption) for r in rows for c in r)
    row_h = [max(t.shape[0] for t in r) + 2 * GRID_MARGIN + cap_lines * line_h for r in cells]
    legend_lines = [legend] if isinstance(legend, str) else list(legend)
    legend_lines = [line for line in legend_lines if line]
    legend_h = len(legend_lines) * line_h + 2 * GRID_MARGIN if legend_lines else 0
    width = max([sum(col_w)] + [_text_size(probe, line, font)[0] + 2 * GRID_MARGIN for line in legend_lines])
    canvas = Image.new("RGB", (width, header_h + sum(row_h) + legend_h), (GRID_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(canvas)
    x0 = np.cumsum([0] + col_w)
    for j, lines in enumerate(header[:ncol]):
        for k, line in enumerate(lines):
            draw.text((int(x0[j]) + GRID_MARGIN, GRID_MARGIN + k * line_h), line, fill=(0, 0, 0), font=font)
    y = header_h
    for r, (row, tiles) in enumerate(zip(rows, cells)):
        for j, (cell, tile) in enumerate(zip(row, tiles)):
            tx, ty = int(x0[j]) + GRID_MARGIN, y + GRID_MARGIN
            canvas.paste(Image.fromarray(tile), (tx, ty))
            for k, mark in enumerate(cell.marks):  # frames nest outwards: best outermost
                inset = GRID_MARGIN - 1 - 2 * k
                if inset >= 1:
                    draw.rectangle((tx - inset, ty - inset, tx + tile.shape[1] - 1 + inset,
                                    ty + tile.shape[0] - 1 + inset), outline=MARK_COLOURS.get(mark, (200, 0, 0)),
                                   width=2)
            for k, line in enumerate(cell.caption):
                draw.text((tx, ty + tile.shape[0] + GRID_MARGIN - 2 + k * line_h), line, fill=(0, 0, 0), font=font)
        y += row_h[r]
    for k, line in enumerate(legend_lines):
        draw.text((GRID_MARGIN, y + GRID_MARGIN + k * line_h), line, fill=(90, 90, 90), font=font)
    return np.asarray(canvas)


# --- trajectory strips -----------------------------------------------------------------------------
def frame_with_label(img: np.ndarray, lines: List[str]) -> np.ndarray:
    """The frame with a white band under it holding `lines` (e.g. step and σ), so a strip of such
    frames says where along the annealing each one was taken."""
    from PIL import ImageDraw

    font = _greek_font()
    if font is None:  # no font with Greek letters: spell σ out rather than draw a missing-glyph box
        font, lines = _font(), [line.replace("σ", "sigma") for line in lines]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(_text_size(probe, "Ag|(0", font)[1], 8) + 3
    band = Image.new("RGB", (img.shape[1], len(lines) * line_h + 4), (GRID_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((2, 1 + k * line_h), line, fill=(0, 0, 0), font=font)
    return np.concatenate([img, np.asarray(band)], axis=0)


def _greek_font(size: int = 10):
    """DejaVu Sans (shipped with matplotlib), which has σ; Pillow's built-in font does not. None if absent."""
    try:
        import matplotlib
        from PIL import ImageFont

        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return None


def trajectory_label(step: int, sigma: float) -> List[str]:
    """Text under a trajectory frame: the annealing step and its noise level σ."""
    return [f"step {step}", f"σ {sigma:.3g}"]
