"""``explain`` and its file helpers: nothing lost, nothing silently wrong (issue 15).

Each test fails without its fix: colliding output names, 16-bit and other PIL modes, writes
through symbolic links, the working folder shadowing a dependency, cut ``torch.load`` refusals,
decompression bombs under ``--skip-unreadable``, a full disk while writing ``index.json``, the
caller's model left in eval mode; plus per-image progress and the order-1 cost notes.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captum_normgrad import cli
from captum_normgrad.explain import explain_files
from captum_normgrad.io import CLIInputError, LoadedModel, find_images, import_callable, load_image, load_state_dict_file

torch.set_num_threads(1)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )


def _loaded(model: nn.Module, size: int = 16) -> LoadedModel:
    from torchvision.transforms import Compose, Resize, ToTensor

    return LoadedModel(model, Compose([Resize((size, size)), ToTensor()]), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None, "net")


def _img(path: Path, seed: int, size=(16, 16)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _explain(items, out: Path, model: nn.Module = None, **kw: Any):
    model = _net().eval() if model is None else model
    return explain_files(items, _loaded(model), {"3": model[3]}, ["normgrad"], out, target=0,
                         formats=kw.pop("formats", ("npy",)), progress=kw.pop("progress", False), **kw)


# --------------------------------------------------------------------------- names


def test_colliding_names_each_get_their_own_outputs(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    for k, name in enumerate(["a.png", "a.jpg", "a-2.png", "sub/b.png", "sub__b.png", "A.bmp"]):
        _img(d / name, k)
    items = find_images([d])
    names = [i.name for i in items]
    assert len({n.casefold() for n in names}) == len(items) == 6, names
    report = _explain(items, tmp_path / "out", formats=("npy", "png"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    files = [f for row in index["images"] for f in row["files"]]
    assert len(files) == len(set(files)) == 6 * 2  # every image its own npy and png
    model = _net().eval()
    from captum_normgrad import LayerNormGrad

    for row in index["images"]:
        x = _loaded(model).preprocess(load_image(row["image"]))[None]
        ref = LayerNormGrad(model, model[3]).attribute(x, target=0)[0, 0]
        npy = next(f for f in row["files"] if f.endswith(".npy"))
        np.testing.assert_allclose(np.load(npy), ref.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert report.n_images == 6


# --------------------------------------------------------------------------- image modes


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode in ("I;16", "I")  # PIL's 16-bit modes
    got = np.asarray(load_image(tmp_path / "deep.png"))
    assert got.shape == (64, 64, 3) and (got[..., 0] == got[..., 1]).all()
    np.testing.assert_allclose(got[..., 0], np.round(ramp / 65535 * 255), atol=1)
    assert (got == 255).mean() < 0.01  # was 99.6 % white
    # the runner reads folders through the same loader
    from captum_normgrad.runner import ImageFolderDataset

    x, _ = ImageFolderDataset(tmp_path)[0]
    np.testing.assert_allclose(x[0].numpy() * 255, got[..., 0], atol=1e-3)


def test_other_modes_are_read_as_a_viewer_shows_them(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent (over white)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = np.asarray(load_image(tmp_path / "rgba.png"))
    assert (got[:2] == (200, 0, 0)).all() and (got[2:] == 255).all()
    la = np.stack([np.full((4, 4), 50, np.uint8), np.full((4, 4), 0, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (np.asarray(load_image(tmp_path / "la.png")) == 255).all()
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert (np.asarray(load_image(tmp_path / "p.png")) == (10, 20, 30)).all()
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert (np.asarray(load_image(tmp_path / "c.tif")) == (255, 0, 0)).all()
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    assert (np.asarray(load_image(tmp_path / "f.tif")) == 128).all()
    Image.fromarray(np.full((4, 4), -5, np.int32), "I").save(tmp_path / "neg.tif")
    with pytest.raises(CLIInputError, match="32-bit integer image with values in"):
        load_image(tmp_path / "neg.tif")


def test_decompression_bomb_is_skipped_under_skip_unreadable(tmp_path: Path, monkeypatch) -> None:
    good = _img(tmp_path / "imgs" / "good.png", 0)
    _img(tmp_path / "imgs" / "huge.png", 1, size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL refuses to decode
    with pytest.raises(CLIInputError, match="too large to decode safely.*MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "imgs" / "huge.png")
    report = _explain(find_images([tmp_path / "imgs"]), tmp_path / "out", skip_unreadable=True)
    assert report.n_images == 1 and report.rows[0]["image"] == str(good)
    assert len(report.skipped) == 1 and "huge.png" in report.skipped[0][0]


# --------------------------------------------------------------------------- writing


def test_symlinks_in_the_output_folder_are_replaced_not_written_through(tmp_path: Path) -> None:
    _img(tmp_path / "imgs" / "a.png", 0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "index.txt").write_text("precious")
    (elsewhere / "map.txt").write_text("precious too")
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").symlink_to(elsewhere / "index.txt")
    (out / "a__normgrad__3.npy").symlink_to(elsewhere / "map.txt")
    _explain(find_images([tmp_path / "imgs"]), out)
    assert (elsewhere / "index.txt").read_text() == "precious"
    assert (elsewhere / "map.txt").read_text() == "precious too"
    assert not (out / "index.json").is_symlink() and json.loads((out / "index.json").read_text())["images"]
    assert not (out / "a__normgrad__3.npy").is_symlink() and np.load(out / "a__normgrad__3.npy").shape == (16, 16)
    assert sorted(p.name for p in out.iterdir()) == ["a__normgrad__3.npy", "index.json"]  # no temp file left


def test_full_disk_while_writing_the_index_is_one_clear_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from captum_normgrad.runner import storage

    real = storage.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "index.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", full)
    _img(tmp_path / "imgs" / "a.png", 0)
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(4, 3))\n"
    )
    code = cli.main(["explain", str(tmp_path / "imgs"), "--model", f"{tmp_path / 'net.py'}:build", "--image-size", "16",
                     "--layer", "0", "--out", str(tmp_path / "out"), "--quiet", "--save", "npy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "index.json" in err[0] and "no space left on the device" in err[0] and "free some space" in err[0]


def test_explain_files_leaves_the_model_in_its_mode(tmp_path: Path) -> None:
    _img(tmp_path / "imgs" / "a.png", 0)
    model = _net().train()
    model[1].eval()  # a mixed state is kept too
    before = {n: m.training for n, m in model.named_modules()}
    stats = model[1].running_mean.clone()
    _explain(find_images([tmp_path / "imgs"]), tmp_path / "out", model=model)
    assert {n: m.training for n, m in model.named_modules()} == before
    assert torch.equal(model[1].running_mean, stats)  # explained in eval mode: statistics untouched
    with pytest.raises(CLIInputError, match="out of range"):  # a failing call restores the mode too
        explain_files(find_images([tmp_path / "imgs"]), _loaded(model), {"3": model[3]}, ["normgrad"],
                      tmp_path / "o2", target=7, formats=("npy",), progress=False)
    assert {n: m.training for n, m in model.named_modules()} == before


# --------------------------------------------------------------------------- code and weights


def test_working_folder_does_not_shadow_a_dependency(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    (tmp_path / "colorsys.py").write_text("raise ImportError('the local colorsys.py shadowed the standard one')\n")
    (tmp_path / "shadow_user_mod.py").write_text("import colorsys\ndef build():\n    return colorsys.rgb_to_hsv\n")
    first = sys.path[0]
    fn = import_callable("shadow_user_mod:build")
    assert fn()(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)  # the real colorsys
    assert sys.path[0] == first and sys.path[-1] == str(tmp_path)
    sys.modules.pop("shadow_user_mod", None)


class Opaque:
    """A class ``torch.load(weights_only=True)`` refuses to unpickle."""


def test_torch_load_refusal_keeps_the_whole_reason(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "extra": Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(Exception) as theirs_info:  # what torch says, independently
        torch.load(tmp_path / "pickled.pt", weights_only=True)
    theirs = " ".join(str(theirs_info.value).split())
    with pytest.raises(CLIInputError) as info:
        load_state_dict_file(tmp_path / "pickled.pt")
    msg = str(info.value)
    assert len(theirs) > 200 and "\x1b" not in msg and "\n" not in msg
    tail = theirs[-80:].replace("\x1b[0m", "").replace("\x1b[1m", "")
    assert tail in msg  # the end of torch's reason is kept (it was cut at 200 characters)


# --------------------------------------------------------------------------- feedback


def test_progress_is_per_image_and_order1_cost_is_announced(tmp_path: Path, monkeypatch) -> None:
    import tqdm.auto

    updates: List[int] = []

    class Recorder(tqdm.auto.tqdm):  # type: ignore[misc, valid-type]
        def update(self, n: int = 1) -> Any:
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    for k in range(5):
        _img(tmp_path / "imgs" / f"i{k}.png", k)
    notes: List[str] = []
    model = _net().eval()
    explain_files(find_images([tmp_path / "imgs"]), _loaded(model), {"3": model[3]}, ["normgrad", "normgrad_order1"],
                  tmp_path / "out", target=0, batch_size=4, formats=("npy",), progress=True, note=notes.append)
    assert updates == [1] * 5  # one step per image, not one per batch of 4
    assert len(notes) == 2
    assert "normgrad_order1 on 5 images" in notes[0] and "15-40x" in notes[0]
    assert "s per image: 1 images left" in notes[1]


def test_runner_warns_when_a_folder_goes_unnormalised_into_a_torchvision_model(tmp_path: Path) -> None:
    from captum_normgrad.runner import RunConfig
    from captum_normgrad.runner.resolve import resolve_dataset

    _img(tmp_path / "imgs" / "a.png", 0)
    base = {"output": str(tmp_path / "o"), "layers": ["layer4"], "model": {"source": "torchvision", "name": "resnet18"}}
    cfg = RunConfig.from_dict({**base, "dataset": {"kind": "folder", "root": str(tmp_path / "imgs")}})
    with pytest.warns(UserWarning, match=r"applies no normalisation.*dataset.mean = \[0.485, 0.456, 0.406\].*"
                      r"image_size = \[224, 224\]"):
        resolve_dataset(cfg)
    ok = RunConfig.from_dict({**base, "dataset": {"kind": "folder", "root": str(tmp_path / "imgs"),
                                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(resolve_dataset(ok)) == 1
