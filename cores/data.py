"""Image-folder dataset with DAPS semantics: sorted files, resize short side + centre crop, [-1, 1].

Every image becomes the 8-bit RGB array that the 8-bit RGB version of the same picture would give,
whatever its bit depth or colour type, or is refused in one line naming the file:

- 8-bit RGB: as it is.  Gray (1, 2, 4, 8 bit) and palette images are expanded to RGB.
- 16 bit per channel: the high byte (v >> 8), the same reduction Pillow applies to 16-bit RGB(A)
  PNGs, so a 16-bit file made from an 8-bit one (v·257 or v·256) gives the 8-bit values back.
- Transparency (an alpha channel, a palette's or a tRNS colour): fully opaque images are used as
  they are; otherwise the image is composited on ALPHA_BACKGROUND (white) and one warning names the
  file, since the phase-retrieval ground truth is then partly the background.
- CMYK, Lab, HSV, 32-bit integer and float images have no single faithful 8-bit RGB version: refused.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

from cores.errors import ConfigError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
_EXACT_MODES = {"RGB", "L", "1", "P", "YCbCr", "RGBX"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_GRAY = {"I;16", "I;16B", "I;16L", "I;16N"}


def _composite(rgba: np.ndarray, path: Path) -> np.ndarray:
    """RGB of an RGBA uint8 array: opaque images as they are, others on ALPHA_BACKGROUND (warned)."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    if (rgba[..., 3] == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    from cores.console import warn

    warn(f"{path} has transparent pixels; they are composited on white {ALPHA_BACKGROUND} "
         "(the ground truth includes that background)", key=("alpha", str(path)))
    bg = np.asarray(ALPHA_BACKGROUND, np.float64)
    out = rgba[..., :3].astype(np.float64) * alpha + bg * (1.0 - alpha)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def read_rgb8(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 of an image file at any supported bit depth and colour type (module doc);
    ConfigError naming the file when it cannot be read or converted faithfully."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode, info = im.mode, dict(im.info)
            if mode in _SIXTEEN_BIT_GRAY:
                v = np.asarray(im).astype(np.uint16)
                gray = (v >> 8).astype(np.uint8)
                t = info.get("transparency")
                alpha = np.where(v == t, 0, 255).astype(np.uint8) if isinstance(t, int) else np.full_like(gray, 255)
                rgba = np.stack([gray, gray, gray, alpha], axis=-1)
                return _composite(rgba, path)
            if mode in _ALPHA_MODES or (mode in _EXACT_MODES and "transparency" in info):
                return _composite(np.asarray(im.convert("RGBA")), path)
            if mode in _EXACT_MODES:
                return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # PIL raises these for broken files
        raise ConfigError(f"data.root: cannot read image {path} ({type(err).__name__}: {str(err)[:80]})") from None
    raise ConfigError(f"data.root: image {path} has mode {mode}, which has no faithful 8-bit RGB version; "
                      "save it as 8- or 16-bit RGB or gray")


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """DAPS' transform: ToTensor → Resize(resolution) (short side) → CenterCrop(resolution) → ·2−1."""
    x = TF.to_tensor(Image.fromarray(read_rgb8(path), "RGB"))
    x = TF.center_crop(TF.resize(x, resolution), resolution)
    return x * 2 - 1


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_hint(root: Path) -> str:
    """The download.sh step that fetches a test set (`datasets/test-ffhq` → `bash download.sh test-ffhq`)."""
    if root.parent.name == "datasets" and root.name in ("test-ffhq", "test-imagenet"):
        return f"; fetch it with `bash download.sh {root.name}` on a machine with network access"
    return ""


class ImageFolder(torch.utils.data.Dataset):
    """Sorted image files of `root`, restricted to [start_id, end_id)."""

    def __init__(self, root: str | Path, resolution: int, start_id: int = 0, end_id: Optional[int] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root: image folder {self.root} does not exist{download_hint(self.root)}")
        files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"data.root: no images in {self.root}{download_hint(self.root)}")
        end = len(files) if end_id is None else min(int(end_id), len(files))
        self.start_id = int(start_id)
        self.all_files: List[Path] = files   # the whole folder: image index i is all_files[i]
        self.files: List[Path] = files[self.start_id:end]
        self.indices = list(range(self.start_id, self.start_id + len(self.files)))
        self.resolution = int(resolution)
        self._hashes: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.files[i], self.resolution)

    def source(self, image_idx: int) -> Optional[Dict[str, str]]:
        """{"source_file", "source_sha256"} of image index `image_idx` (None past the folder's end):
        what a record stores so that resume can tell when the folder changed."""
        if not 0 <= image_idx < len(self.all_files):
            return None
        if image_idx not in self._hashes:
            self._hashes[image_idx] = file_sha256(self.all_files[image_idx])
        return {"source_file": self.all_files[image_idx].name, "source_sha256": self._hashes[image_idx]}
