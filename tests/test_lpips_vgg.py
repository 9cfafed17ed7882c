"""LPIPS as DAPS computes it: piq's VGG16 LPIPS with average pooling on [0,1] images, read from weight files in
their published format (random values here; no network)."""
from __future__ import annotations

import urllib.error

import pytest
import torch

LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
CHANNELS = (64, 128, 256, 512, 512)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path; any download attempt fails as it would offline."""
    import torch.hub

    from cores import console, evaluation

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(evaluation, "_LPIPS_STATE", {})
    monkeypatch.setattr(console, "_WARNED", set())
    ckpt = tmp_path / "torch_home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    return ckpt


def write_random_weights(ckpt, seed: int = 0):
    """torchvision's `vgg16-397923af.pth` (a state dict) and piq's `lpips_weights.pt` (five (1, C, 1, 1) layer
    weights, the list piq hands to ContentLoss), with random values, under the names the loaders look for."""
    import torchvision

    torch.manual_seed(seed)
    vgg = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(vgg, ckpt / "vgg16-397923af.pth")
    lin = [torch.rand(1, c, 1, 1) for c in CHANNELS]
    torch.save(lin, ckpt / "lpips_weights.pt")
    return vgg, lin


def reference_lpips(x01: torch.Tensor, y01: torch.Tensor, vgg_state, lin) -> torch.Tensor:
    """LPIPS written out: VGG16 features with 2x2 average pooling instead of max pooling, ImageNet
    normalisation of [0,1] inputs, channel-normalised features, weighted squared differences averaged
    over space and summed over channels and layers (Zhang et al. 2018; DAPS uses piq's)."""
    import torchvision

    net = torchvision.models.vgg16(weights=None)
    net.load_state_dict(vgg_state)
    feats = torch.nn.Sequential(*[torch.nn.AvgPool2d(2, 2) if isinstance(m, torch.nn.MaxPool2d) else m
                                  for m in net.features]).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def layers(z):
        z, out = (z - mean) / std, []
        for k, m in enumerate(feats):
            z = m(z)
            if k in LAYERS:
                out.append(z / (z.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    with torch.no_grad():
        total = torch.zeros(x01.shape[0])
        for fx, fy, w in zip(layers(x01), layers(y01), lin):
            total += ((fx - fy) ** 2 * w).mean(dim=(2, 3)).sum(1)
    return total


def test_vgg_lpips_reads_the_published_format_on_01_images(offline_hub):
    from cores import evaluation

    vgg, lin = write_random_weights(offline_hub)
    torch.manual_seed(1)
    ref = torch.rand(1, 3, 64, 64) * 2 - 1
    x = (ref + 0.3 * torch.randn(3, 3, 64, 64)).clamp(-1, 1)
    got = evaluation.lpips_distance(x, ref[0])
    assert got is not None and got.shape == (3,)
    want = reference_lpips((x + 1) / 2, ((ref + 1) / 2).expand_as(x), vgg, lin)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got, want)
    # not the [-1,1] input, not max pooling: both give other values
    assert not torch.allclose(got, reference_lpips(x, ref.expand_as(x), vgg, lin), rtol=1e-2)
    assert evaluation.lpips_distance(ref, ref[0]).abs().max() < 1e-6  # identical images: 0
    rec = evaluation.image_record(0, x, ref[0], torch.zeros(3), [0, 1, 2], 20.0)
    assert rec["lpips"] == pytest.approx(want.tolist(), rel=1e-4) and rec["lpips_net"] == "vgg"


def test_other_layer_weights_change_the_value(offline_hub):
    """The layer weights come from the file: other values in the file, another LPIPS."""
    from cores import evaluation

    vgg, _ = write_random_weights(offline_hub)
    torch.manual_seed(2)
    ref, x = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    first = evaluation.lpips_distance(x, ref[0])
    lin2 = [torch.rand(1, c, 1, 1) for c in CHANNELS]
    torch.save(lin2, offline_hub / "lpips_weights.pt")
    evaluation._LPIPS_STATE.clear()
    second = evaluation.lpips_distance(x, ref[0])
    assert not torch.allclose(first, second)
    assert torch.allclose(second, reference_lpips((x + 1) / 2, ((ref + 1) / 2).expand_as(x), vgg, lin2), rtol=1e-4)


def test_missing_weights_give_null_and_one_warning(offline_hub, capfd):
    from cores import evaluation

    torch.save(torch.nn.Module().state_dict(), offline_hub / "unrelated.pth")
    x = torch.zeros(1, 3, 32, 32)
    for _ in range(3):
        assert evaluation.lpips_distance(x, x[0]) is None
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "download.sh lpips" in err


def test_lpips_net_is_checked():
    from cores.config import EvalConfig
    from cores.errors import ConfigError

    assert EvalConfig().lpips_net == "vgg"
    with pytest.raises(ConfigError, match="eval.lpips_net=squeeze"):
        EvalConfig(lpips_net="squeeze")
