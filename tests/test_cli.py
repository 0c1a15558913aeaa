"""The ``captum-normgrad`` command: end to end through the installed console script, and in-process.

End-to-end tests run the INSTALLED ``captum-normgrad`` executable (the one next to this Python
interpreter) in a subprocess on generated PNG files, with a small torchvision model at 64 px whose
weights the test writes to a file, and check the written maps against an independent
computation (hooks + ``torch.autograd.grad`` written here, not the package's code). Error paths
and help texts are checked in-process through ``main(argv)`` (the same code, minus the process
start-up, which costs seconds per call on a busy CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from captum_normgrad import cli
from captum_normgrad.io import (
    CLIInputError,
    find_images,
    get_layer,
    load_image,
    load_state_dict_file,
    overlay,
    save_map,
)

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)  # the machine is shared: one thread is much faster than two contending ones


NUM_CLASSES = 5
SIZE = 64


def _exe() -> str:
    cand = Path(sys.executable).parent / "captum-normgrad"
    if cand.exists():
        return str(cand)
    found = shutil.which("captum-normgrad")
    if not found:
        pytest.fail("the captum-normgrad console script is not installed: pip install -e .")
    return found


def _run(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("CAPTUM_NORMGRAD_DEBUG", None)
    return subprocess.run([_exe(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=280)


def _write_images(folder: Path, n: int, seed: int, sizes=((80, 100), (70, 70), (96, 64))) -> List[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        arr[h // 4: h // 2, w // 4: w // 2] = (255, 30, 30)  # a red block: some structure
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """A folder of generated images (one nested, one JPEG) and a resnet18 state dict (5 classes)."""
    root = tmp_path_factory.mktemp("cli")
    imgs = root / "imgs"
    _write_images(imgs, 2, seed=1)
    nested = _write_images(imgs / "nested", 1, seed=2)[0]
    Image.open(nested).convert("RGB").save(imgs / "nested" / "photo.jpg", quality=90)
    nested.unlink()
    import torchvision

    torch.manual_seed(123)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    # non-trivial BatchNorm statistics so that eval mode differs from identity
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    weights = root / "resnet18_5.pt"
    torch.save(model.state_dict(), weights)
    return imgs, weights


# --------------------------------------------------------------------------- independent reference


def _reference_maps(image_path: Path, weights: Path, layer: str) -> Tuple[np.ndarray, np.ndarray, int]:
    """NormGrad and Grad-CAM at ``layer`` for the predicted class, computed from scratch."""
    import torchvision
    from torchvision.transforms import functional as TF

    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    img = Image.open(image_path).convert("RGB")
    img = TF.center_crop(TF.resize(img, [SIZE], antialias=True), [SIZE])  # torchvision's preset order
    x = TF.normalize(TF.to_tensor(img), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[None]
    store = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    out = model(x)
    h.remove()
    target = int(out.argmax(1))
    (g,) = torch.autograd.grad(out[0, target], store["a"])
    a = store["a"].detach()
    normgrad = (a.pow(2).sum(1).sqrt() * g.pow(2).sum(1).sqrt())[0]
    gradcam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))[0]
    return normgrad.numpy(), gradcam.numpy(), target


# --------------------------------------------------------------------------- end to end, installed command


def test_installed_explain_end_to_end(workspace: Tuple[Path, Path], tmp_path: Path) -> None:
    imgs, weights = workspace
    out = tmp_path / "maps"
    r = _run(
        ["explain", str(imgs), "--model", "resnet18", "--weights", str(weights), "--num-classes", str(NUM_CLASSES),
         "--image-size", str(SIZE), "--layer", "layer2,layer3", "--method", "normgrad", "--method", "gradcam_relu",
         "--save", "png,npy,pt", "--batch-size", "2", "--device", "cpu", "--out", str(out)],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "explained 3 image(s) x 2 method(s) x 2 layer(s)" in r.stdout
    assert "explain" in r.stderr and "3/3" in r.stderr  # the tqdm progress bar reached the end
    index = json.loads((out / "index.json").read_text())
    assert [row["name"] for row in index["images"]] == ["img0", "img1", "nested__photo"]
    for row in index["images"]:
        ref_ng, ref_gc, target = _reference_maps(Path(row["image"]), weights, "layer3")
        assert row["target"] == row["pred"] == target
        ng = np.load(out / f"{row['name']}__normgrad__layer3.npy")
        gc = np.load(out / f"{row['name']}__gradcam_relu__layer3.npy")
        assert ng.shape == (SIZE // 16, SIZE // 16)
        np.testing.assert_allclose(ng, ref_ng, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gc, ref_gc, rtol=1e-4, atol=1e-6)
        pt = torch.load(out / f"{row['name']}__normgrad__layer3.pt", weights_only=True)
        np.testing.assert_array_equal(pt.numpy(), ng)
        assert np.load(out / f"{row['name']}__normgrad__layer2.npy").shape == (SIZE // 8, SIZE // 8)
        with Image.open(out / f"{row['name']}__gradcam_relu__layer2.png") as png:
            assert png.size == (SIZE, SIZE) and png.mode == "RGB"
        assert len(row["files"]) == 2 * 2 * 3


def test_installed_demo_writes_figure_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = _run(["demo", "--out", str(out), "--quiet", "--images", "4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    with Image.open(out / "figure1.png") as fig:
        w, h = fig.size
        assert w > 400 and h > 300
        # not blank: the heat maps give many distinct colours
        assert len(np.unique(np.asarray(fig.convert("RGB")).reshape(-1, 3), axis=0)) > 1000
    summary = (out / "summary.txt").read_text()
    for label in ("Grad-CAM", "NormGrad order 0", "NormGrad order 1", "order 1, adversarial"):
        assert label in summary and label in r.stdout
    data = json.loads((out / "summary.json").read_text())
    shares = data["energy_share_target_other"]
    assert set(shares) == {"gradcam_relu", "normgrad", "normgrad_order1", "normgrad_order1_adversarial"}
    for per_layer in shares.values():
        assert len(per_layer) == 4
        for t, o in per_layer.values():
            assert 0.0 <= t <= 1.0 and 0.0 <= o <= 1.0 and t + o <= 1.0 + 1e-6
    saved = torch.load(out / "maps.pt", weights_only=True)
    assert data["num_images"] == 4 and saved["maps"]["normgrad"]["block1"].shape[:2] == (4, 1)
    # the summary's shares are those of the saved maps and masks (recomputed here independently)
    for method, per_layer in shares.items():
        for layer, (t, o) in per_layer.items():
            m = saved["maps"][method][layer]
            up = F.interpolate(m, size=saved["masks"].shape[-2:], mode="bilinear", align_corners=False).clamp(min=0)
            tot = up.sum((1, 2, 3))
            safe = torch.where(tot > 0, tot, torch.ones_like(tot))  # an all-zero map counts as share 0
            share_t = (up[:, 0] * saved["masks"][:, 0]).sum((1, 2)) / safe
            share_o = (up[:, 0] * saved["masks"][:, 1]).sum((1, 2)) / safe
            assert abs(float(share_t.mean()) - t) < 1e-5 and abs(float(share_o.mean()) - o) < 1e-5


def test_installed_error_is_one_line(tmp_path: Path) -> None:
    r = _run(["explain", "missing.png", "--model", "resnet18", "--layer", "layer3", "--out", "o"], cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["captum-normgrad explain: error: no such file or folder: 'missing.png'"]
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- in-process: errors are one line


def _err(capsys: pytest.CaptureFixture, argv: List[str], code: int = 1) -> str:
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_unknown_model(capsys, workspace) -> None:
    imgs, _ = workspace
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet19", "--layer", "layer3", "--out", "x"])
    assert "unknown model 'resnet19'" in line and "resnet18" in line


def test_unknown_layer_lists_valid_names(capsys, workspace, tmp_path) -> None:
    imgs, _ = workspace
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet18", "--image-size", "64", "--layer", "layer5",
                         "--out", str(tmp_path)])
    assert "unknown layer 'layer5'" in line
    import torchvision

    top = [n for n, _ in torchvision.models.resnet18().named_children()]
    valid = line.split("valid names: ")[1]
    for name in top + ["layer3.1"]:
        assert name in valid.split(" (and")[0].split(", ")


def test_image_that_does_not_decode(capsys, workspace, tmp_path) -> None:
    imgs, _ = workspace
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    line = _err(capsys, ["explain", str(imgs / "img0.png"), str(bad), "--model", "resnet18", "--image-size", "64",
                         "--layer", "layer3", "--out", str(tmp_path / "o"), "--quiet"])
    assert "cannot decode image" in line and "broken.png" in line


def test_skip_unreadable_reports_and_continues(capsys, workspace, tmp_path) -> None:
    imgs, _ = workspace
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "o"
    assert cli.main(["explain", str(imgs / "img0.png"), str(bad), "--model", "resnet18", "--image-size", "64",
                     "--layer", "layer3", "--out", str(out), "--quiet", "--skip-unreadable", "--save", "npy"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err
    index = json.loads((out / "index.json").read_text())
    assert [r["name"] for r in index["images"]] == ["img0"]
    assert index["skipped"][0]["image"].endswith("broken.jpg")


def test_weights_that_do_not_match_the_model(capsys, workspace, tmp_path) -> None:
    imgs, weights = workspace
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet18", "--weights", str(weights),
                         "--layer", "layer3", "--out", str(tmp_path)])
    assert "do not match model resnet18" in line and "fc.weight" in line and "--num-classes 5" in line
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet34", "--weights", str(weights),
                         "--num-classes", "5", "--layer", "layer3", "--out", str(tmp_path)])
    assert "do not match model resnet34" in line and "missing key" in line


def test_weights_file_that_is_not_a_state_dict(capsys, workspace, tmp_path) -> None:
    imgs, _ = workspace
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a torch file")
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet18", "--weights", str(junk), "--layer", "layer3",
                         "--out", str(tmp_path)])
    assert "cannot read weights file" in line
    torch.save([1, 2, 3], tmp_path / "list.pt")
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet18", "--weights", str(tmp_path / "list.pt"),
                         "--layer", "layer3", "--out", str(tmp_path)])
    assert "does not hold a state dict" in line


def test_unknown_weights_name_and_bad_target(capsys, workspace, tmp_path) -> None:
    imgs, weights = workspace
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet18", "--weights", "IMAGENET9K", "--layer", "layer3",
                         "--out", str(tmp_path)])
    assert "IMAGENET1K_V1" in line and "DEFAULT" in line
    line = _err(capsys, ["explain", str(imgs / "img0.png"), "--model", "resnet18", "--weights", str(weights),
                         "--num-classes", "5", "--image-size", "64", "--layer", "layer3", "--target", "7",
                         "--out", str(tmp_path / "t"), "--quiet"])
    assert "--target 7 is out of range" in line and "5 outputs" in line
    line = _err(capsys, ["explain", str(imgs / "img0.png"), "--model", "resnet18", "--image-size", "64",
                         "--layer", "layer3", "--target", "tabby", "--out", str(tmp_path / "t"), "--quiet"])
    assert "class names need named weights" in line


def test_layer_without_locations_and_unknown_method(capsys, workspace, tmp_path) -> None:
    imgs, _ = workspace
    line = _err(capsys, ["explain", str(imgs / "img0.png"), "--model", "resnet18", "--image-size", "64",
                         "--layer", "fc", "--out", str(tmp_path), "--quiet"])
    assert "(N, C, H, W)" in line
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet18", "--layer", "layer3", "--method", "nope",
                         "--out", str(tmp_path)])
    assert "unknown method 'nope'" in line and "normgrad_order1_adversarial" in line


def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", "x.png", "--layer", "layer3", "--out", "o"])  # no --model
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0] and "--help" in err[0]
    with pytest.raises(SystemExit):
        cli.main(["explain", "x.png", "--model", "m", "--layer", "l", "--out", "o", "--batch-size", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_cuda_unavailable_is_a_clear_error(capsys, workspace, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    imgs, _ = workspace
    line = _err(capsys, ["explain", str(imgs), "--model", "resnet18", "--layer", "layer3", "--device", "cuda",
                         "--out", str(tmp_path)])
    assert "CUDA is not available" in line


def test_unexpected_exception_is_one_line(capsys, monkeypatch) -> None:
    def boom(args):
        raise ZeroDivisionError("division by zero somewhere deep")

    def register(sub):
        sub.add_parser("boom").set_defaults(func=boom)

    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + [register])
    line = _err(capsys, ["boom"])
    assert "ZeroDivisionError" in line and "CAPTUM_NORMGRAD_DEBUG" in line
    monkeypatch.setenv("CAPTUM_NORMGRAD_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["boom"])


# --------------------------------------------------------------------------- in-process: features


def test_user_model_from_file_callable(capsys, workspace, tmp_path) -> None:
    imgs, _ = workspace
    (tmp_path / "mynet.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build(num_classes=3):\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),\n"
        "                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))\n"
    )
    out = tmp_path / "o"
    assert cli.main(["explain", str(imgs / "img1.png"), "--model", f"{tmp_path / 'mynet.py'}:build",
                     "--image-size", "32", "--no-normalize", "--layer", "2", "--method", "normgrad,gradxact_sum",
                     "--target", "1", "--out", str(out), "--quiet", "--save", "npy"]) == 0
    m = np.load(out / "img1__normgrad__2.npy")
    assert m.shape == (32, 32)
    # independent check on the [0, 1] (not normalised) 32 px input
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynet_ref", tmp_path / "mynet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.build().eval()
    from torchvision.transforms import functional as TF

    img = Image.open(imgs / "img1.png").convert("RGB")
    x = TF.to_tensor(TF.center_crop(TF.resize(img, [32], antialias=True), [32]))[None]
    acts = net[:3](x)
    out_ = net[3:](acts)
    (g,) = torch.autograd.grad(out_[0, 1], acts)
    np.testing.assert_allclose(m, (acts.norm(dim=1) * g.norm(dim=1))[0].detach().numpy(), rtol=1e-4, atol=1e-7)
    gxa = np.load(out / "img1__gradxact_sum__2.npy")
    np.testing.assert_allclose(gxa, (acts * g).sum(1)[0].detach().numpy(), rtol=1e-4, atol=1e-6)


def test_module_callable_errors(capsys, workspace, tmp_path, monkeypatch) -> None:
    imgs, _ = workspace
    monkeypatch.chdir(tmp_path)
    (tmp_path / "netmod_cli_test.py").write_text("X = 3\ndef notmodel():\n    return 42\n")
    for spec, expected in [
        ("no_such_module_xyz:build", "cannot import module"),
        ("netmod_cli_test:missing", "has no attribute"),
        ("netmod_cli_test:X", "is not callable"),
        ("netmod_cli_test:notmodel", "not a torch.nn.Module"),
    ]:
        line = _err(capsys, ["explain", str(imgs), "--model", spec, "--layer", "0", "--out", "o"])
        assert expected in line, (spec, line)


def test_layers_subcommand(capsys) -> None:
    assert cli.main(["layers", "--model", "resnet18", "--image-size", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = {ln.split("\t")[0]: ln.split("\t")[1:] for ln in lines}
    assert table["layer3"] == ["Sequential", "(1, 256, 4, 4)"]
    assert table["layer1.0.conv1"][0] == "Conv2d"
    assert table["fc"] == ["Linear", "(1, 1000)"]


def test_every_help_is_complete(capsys) -> None:
    from captum_normgrad.explain import METHODS

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"demo", "explain", "layers", "run"} <= set(sub.choices)
    for name, p in sub.choices.items():
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert p.description, f"{name} has no description"
        if name in ("demo", "explain", "layers"):
            assert "example" in (p.epilog or "")
        for action in p._actions:
            assert action.help, f"{name}: {action.dest} has no help"
            for opt in action.option_strings:
                assert opt in text
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    text = capsys.readouterr().out
    listed = {ln.split()[0] for ln in text.splitlines() if ln.startswith("  ") and ln.split()}
    for m, entry in METHODS.items():
        assert (m in listed) == (not entry.per_channel), m  # explain offers the one-channel methods


def test_adding_a_subcommand_is_one_function(capsys, monkeypatch) -> None:
    def register(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world", help="who")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + [register])
    assert cli.main(["hello", "--name", "you"]) == 0
    assert capsys.readouterr().out.strip() == "hello you"
    assert cli.main([]) == 2  # no subcommand: the top-level help, on stderr
    err = capsys.readouterr().err
    for name in ("demo", "explain", "layers", "run", "hello"):
        assert name in err


# --------------------------------------------------------------------------- io helpers


def test_find_images_names_are_unique_and_filtered(tmp_path) -> None:
    _write_images(tmp_path / "a", 2, seed=0)
    _write_images(tmp_path / "a" / "deep", 1, seed=0)
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"")
    single = _write_images(tmp_path / "b", 1, seed=0)[0]
    items = find_images([single, tmp_path / "a"])
    # files in the order given; a folder's images sorted by path (a/deep/img0 < a/img0)
    assert [i.name for i in items] == ["img0", "deep__img0", "img0-2", "img1"]
    assert [i.name for i in find_images([tmp_path / "a"], recursive=False)] == ["img0", "img1"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_images([tmp_path / "zzz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLIInputError, match="holds no image"):
        find_images([tmp_path / "empty"])
    with pytest.raises(CLIInputError, match="no image given"):
        find_images([])


def test_load_image_converts_to_rgb(tmp_path) -> None:
    Image.fromarray(np.full((5, 7), 200, np.uint8), mode="L").save(tmp_path / "g.png")
    im = load_image(tmp_path / "g.png")
    assert im.mode == "RGB" and im.size == (7, 5) and im.getpixel((0, 0)) == (200, 200, 200)


def test_state_dict_files_are_unwrapped(tmp_path) -> None:
    from safetensors.torch import save_file

    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("ckpt.pth", "w.safetensors"):
        got = load_state_dict_file(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_overlay_and_save_map(tmp_path) -> None:
    image = torch.zeros(3, 8, 8)
    heat = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    ov = overlay(image, heat, alpha=1.0, cmap="gray")
    assert ov.shape == (3, 8, 8)
    assert ov[:, 7, 7].min() > 0.99 and ov[:, 0, 0].max() < 0.01  # max of the map -> white in gray
    const = overlay(torch.full((3, 4, 4), 0.5), torch.ones(2, 2), alpha=0.5, cmap="gray")
    assert torch.allclose(const, torch.full_like(const, 0.25))  # a constant map shows as uniform 0
    files = save_map(tmp_path / "m", heat, ("npy", "pt"))
    assert [f.name for f in files] == ["m.npy", "m.pt"]
    np.testing.assert_array_equal(np.load(files[0]), heat.numpy())
    assert torch.equal(torch.load(files[1], weights_only=True), heat)


def test_get_layer_dotted_names() -> None:
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU()))
    assert get_layer(net, "0.1") is net[0][1]
    with pytest.raises(CLIInputError, match=r"valid names: 0, 0\.0, 0\.1"):
        get_layer(net, "0.2")


def test_deprecated_method_names_still_work_with_a_note(capsys, workspace, tmp_path) -> None:
    imgs, weights = workspace
    out = tmp_path / "o"
    args = ["explain", str(imgs / "img0.png"), "--model", "resnet18", "--weights", str(weights), "--num-classes",
            str(NUM_CLASSES), "--image-size", "32", "--layer", "layer4", "--target", "0", "--save", "npy", "--out", str(out)]
    assert cli.main(args + ["--method", "normgrad-selective"]) == 0
    err = capsys.readouterr().err
    assert "method name 'normgrad-selective' is deprecated: use 'normgrad_selective'" in err
    old = np.load(out / "img0__normgrad_selective__layer4.npy")  # outputs carry the registry name
    assert cli.main(args + ["--method", "normgrad_selective", "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(out / "img0__normgrad_selective__layer4.npy"), old)
    line = _err(capsys, args + ["--method", "gradxact"])
    assert "one map per channel" in line and "use 'gradxact_sum'" in line
    line = _err(capsys, args[:-6] + ["--layer", "auto,layer3", "--out", str(out)])
    assert "--layer auto picks every layer itself" in line


def test_warnings_are_one_line() -> None:
    """In a plain process (pytest records warnings instead of printing them)."""
    code = (
        "import warnings\n"
        "from captum_normgrad import cli\n"
        "def register(sub):\n"
        "    p = sub.add_parser('warner', help='warns')\n"
        "    p.set_defaults(func=lambda args: warnings.warn('first line\\nsecond line', UserWarning) or 0)\n"
        "cli.SUBCOMMANDS.append(register)\n"
        "before = warnings.formatwarning\n"
        "assert cli.main(['warner']) == 0\n"
        "assert warnings.formatwarning is before\n"  # restored for the rest of the process
    )
    env = dict(os.environ)
    env.pop("CAPTUM_NORMGRAD_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "captum-normgrad warner: warning: first line second line\n"
