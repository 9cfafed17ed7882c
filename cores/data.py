"""Image-folder dataset with DAPS semantics: sorted files, resize short side + centre crop, [-1, 1]."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """DAPS' transform: ToTensor → Resize(resolution) (short side) → CenterCrop(resolution) → ·2−1."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    x = TF.to_tensor(img)
    x = TF.center_crop(TF.resize(x, resolution), resolution)
    return x * 2 - 1


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
        self.files: List[Path] = files[self.start_id:end]
        self.indices = list(range(self.start_id, self.start_id + len(self.files)))
        self.resolution = int(resolution)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.files[i], self.resolution)
