r"""Command-line interface: ``captum-normgrad``.

Subcommands are self-contained: each has a ``register_<name>(subparsers)`` function that adds its
parser and sets ``func`` to a handler ``(args) -> exit code``. To add one, write such a function
(import heavy modules inside the handler, so ``--help`` stays fast) and append it to
:data:`SUBCOMMANDS`. Handlers report user errors by raising ``ValueError`` (or
:class:`captum_normgrad.io.CLIInputError`), ``FileNotFoundError``, ``TypeError`` or ``OSError``
with a message naming the problem and the fix: :func:`main` prints it as one line on stderr and
returns a non-zero exit code, never a traceback (set ``CAPTUM_NORMGRAD_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, NoReturn, Optional

PROG = "captum-normgrad"

#: Exit codes: 0 success, 1 a run-time problem with the inputs, 2 bad command-line usage.
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one line (plus a pointer to ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks; shows defaults that are not None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def _comma_list(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=required,
        help="a torchvision classification model name (resnet50, vgg16, vit_b_16, ...) or your own "
        "builder as package.module:callable or path/to/file.py:callable",
    )
    g.add_argument(
        "--weights",
        default=None,
        help="DEFAULT or a torchvision weights name of the model (e.g. IMAGENET1K_V2; downloaded once "
        "into the torch hub cache), or a state-dict file (.pt, .pth, .safetensors). Random init when omitted",
    )
    g.add_argument("--num-classes", type=_positive_int, default=None,
                   help="outputs of the classifier, for a retrained head (default: the model's own)")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize the shorter side to N and centre-crop N x N instead of the weights' "
                   "preprocessing sizes (default: the weights' transforms(), e.g. 256 -> 224)")
    g.add_argument("--no-normalize", action="store_true",
                   help="do not apply the mean/std normalisation (models trained on [0, 1] inputs)")


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.out), progress=not args.quiet, num_images=args.images, model_name=args.model)
    print(summary)
    return EXIT_OK


def register_demo(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``captum-normgrad demo``: the Figure-1-style grid on the built-in benchmark."""
    p = sub.add_parser(
        "demo",
        help="Figure-1-style grid on a built-in model and a generated two-object image",
        description=(
            "Explain a built-in benchmark model on generated images with two objects of different\n"
            "classes, with Grad-CAM, NormGrad order 0, order 1 and the adversarial order-1 map at the\n"
            "end of each block (the NormGrad paper's Figure 1). Writes into --out: figure1.png (the\n"
            "grid for the first image), maps.pt (the raw maps), summary.txt and summary.json (mean\n"
            "share of each map's positive energy on the explained and on the other object).\n"
            "No download; runs in seconds on a CPU."
        ),
        epilog="example:\n  captum-normgrad demo --out out/demo",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--model", choices=["vgg", "resnet"], default="vgg",
                   help="benchmark model: VGG-style (the paper's Figure 1 uses VGG-16) or ResNet-style")
    p.add_argument("--images", type=_positive_int, default=8,
                   help="two-object images averaged in the summary (the figure shows the first)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)


# --------------------------------------------------------------------------- explain


def _note(text: str) -> None:
    """A one-line note on stderr (not an error)."""
    print(f"{PROG}: note: {text}", file=sys.stderr)


def _input_size(loaded: "object", image_size: Optional[int]) -> int:
    """The side of the images the model gets: --image-size, else the preprocessing's crop."""
    if image_size:
        return int(image_size)
    crop = getattr(getattr(loaded, "preprocess", None), "crop_size", None)
    return int(crop[0]) if crop else 224


def _cmd_explain(args: argparse.Namespace) -> int:
    # Cheap checks first (no torch import): missing files fail in a blink.
    from .io import find_images

    items = find_images(args.images, recursive=not args.no_recursive)

    from .explain import explain_method_names, explain_files, resolve_device
    from .io import CLIInputError, get_layer, load_model

    methods = explain_method_names([m for v in (args.method or ["normgrad"]) for m in _comma_list(v)],
                                   note=None if args.quiet else _note)
    layer_names = [n for v in args.layer for n in _comma_list(v)]
    formats = _comma_list(args.save)
    if getattr(args, "grid", False) or getattr(args, "report", False):
        from .viz import check_style

        check_style(args.cmap, args.alpha)  # before any work
        if not {"npy", "pt"} & set(formats):
            formats.append("npy")  # the grid is drawn from the raw maps
    device = resolve_device(args.device)
    loaded = load_model(
        args.model, weights=args.weights, num_classes=args.num_classes, image_size=args.image_size,
        normalize=not args.no_normalize,
    )
    if layer_names == ["auto"]:
        from ._layers import suggest_layers

        layer_names = suggest_layers(loaded.model, _input_size(loaded, args.image_size))
        if not args.quiet:
            _note(f"--layer auto: {', '.join(layer_names)} (suggested layers: the end of each stage)")
    elif "auto" in layer_names:
        raise CLIInputError("--layer auto picks every layer itself: give it alone, or name the layers")
    layers = {name: get_layer(loaded.model, name) for name in layer_names}
    if not loaded.pretrained and not args.quiet:
        _note(f"{loaded.description}: maps of an untrained model carry little meaning (pass --weights)")
    options = {"epsilon": args.epsilon, "hessian": args.hessian,
               "virtual_layer": args.virtual_layer, "aggregation": args.aggregation}
    layouts = [v for v in _comma_list(args.layout)]
    report = explain_files(
        items, loaded, layers, methods, args.out, target=args.target, batch_size=args.batch_size,
        device=device, formats=formats, options=options, progress=not args.quiet,
        skip_unreadable=args.skip_unreadable, layout=layouts[0] if len(layouts) == 1 else layouts,
        note=None if args.quiet else _note,
    )
    per_img = report.seconds / max(report.n_images, 1)
    print(
        f"explained {report.n_images} image(s) x {len(methods)} method(s) x {len(layers)} layer(s) "
        f"with {loaded.description} on {device} in {report.seconds:.1f} s ({per_img:.2f} s/image); "
        f"{len(report.files)} files in {args.out} (index: {Path(args.out) / 'index.json'})"
    )
    for path, reason in report.skipped:
        print(f"{PROG}: warning: skipped {reason}", file=sys.stderr)
    from .report import record_preprocessing

    record_preprocessing(args.out, loaded)  # lets `report` and --grid place the maps on the original photos
    if getattr(args, "grid", False):
        from .report import load_explain_run, write_grids

        grids = write_grids(load_explain_run(args.out), cmap=args.cmap, alpha=args.alpha, progress=not args.quiet)
        print(f"{len(grids)} comparison grid(s) (methods x layers over each original image): "
              f"{Path(args.out) / 'grid__*.png'}")
    if getattr(args, "report", False):
        from .report import build_report

        page = build_report(args.out, cmap=args.cmap, alpha=args.alpha, progress=not args.quiet)
        print(f"report: {page} (open it in a browser; no network needed)")
    return EXIT_OK


def register_explain(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``captum-normgrad explain``: saliency maps for image files with any classification model."""
    from .registry import ALIASES, METHODS

    method_help = "".join(f"  {m.name:<28} {m.summary}\n" for m in METHODS.values() if not m.per_channel)
    method_help += "  (deprecated names: " + ", ".join(f"{a} -> {n}" for a, n in ALIASES.items()) + ")\n"
    p = sub.add_parser(
        "explain",
        help="saliency maps for image files or folders with any torchvision (or your own) model",
        description=(
            "Explain images with a classification model: for every image, method and layer, write\n"
            "IMAGE__METHOD__LAYER.png (the map over the preprocessed image), the raw map at the\n"
            "layer's resolution as .npy and/or .pt, and index.json (targets, predictions, files).\n"
            "Images are read with PIL and preprocessed with the weights' own transforms().\n\n"
            "methods:\n" + method_help
        ),
        epilog=(
            "examples:\n"
            "  captum-normgrad explain photos/ --model resnet50 --weights DEFAULT --layer layer3 --out maps\n"
            "  captum-normgrad explain a.jpg b.jpg --model vgg16 --weights vgg16.pth --layer features.22 \\\n"
            "      --method normgrad,normgrad1,gradcam --target 281 --save png,pt --out maps\n"
            "  captum-normgrad explain imgs/ --model mypkg.nets:build_net --weights net.pt --layer block2 --out maps\n"
            "  captum-normgrad explain photos/ --model swin_t --weights DEFAULT --layer auto --out maps\n"
            "  captum-normgrad layers --model resnet50      # the layer names to choose from"
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files and/or folders of images")
    _add_model_args(p)
    g = p.add_argument_group("explanation")
    g.add_argument("--layer", action="append", required=True, metavar="NAME[,NAME...]",
                   help="layer(s) to explain, as named by model.named_modules() (repeat or comma-separate), "
                   "or auto: the end of each stage (see `captum-normgrad layers --suggest MODEL`)")
    g.add_argument("--layout", default="auto", metavar="LAYOUT[,LAYOUT...]",
                   help="layout of the layers' outputs: auto (guessed from the shape), channels_first "
                   "(N, C, H, W), channels_last (N, H, W, C: Swin) or tokens (N, T, C: ViT; the class token "
                   "is dropped and the patch grid restored); one for all layers or one per layer")
    g.add_argument("--method", action="append", default=None, metavar="METHOD[,METHOD...]",
                   help="method(s) among those listed above (repeat or comma-separate); default: normgrad")
    g.add_argument("--target", default="pred",
                   help="class to explain: pred (each image's predicted class), a class index, or a class "
                   "name of the weights (e.g. 'tabby cat')")
    g.add_argument("--epsilon", type=float, default=None,
                   help="inner SGD step of the order-1 methods (default: the method's, 5e-4)")
    g.add_argument("--hessian", choices=["finite_difference", "exact", "none"], default=None,
                   help="Hessian term of normgrad1/normgrad1-adv (default: finite_difference)")
    g.add_argument("--virtual-layer", choices=["conv1x1", "scaling", "bias", "conv3x3"], default=None,
                   help="virtual layer of the NormGrad methods (default: the method's)")
    g.add_argument("--aggregation", choices=["norm", "filter_norm", "sum", "max"], default=None,
                   help="aggregation of the NormGrad methods (default: the method's)")
    o = p.add_argument_group("output and running")
    o.add_argument("--out", required=True, help="output folder (created)")
    o.add_argument("--save", default="png,npy", metavar="FORMATS",
                   help="comma-separated among png (overlay), npy, pt (raw maps)")
    o.add_argument("--grid", action="store_true",
                   help="also write grid__IMAGE.png per image: methods x layers over the original, uncropped "
                   "image, with class name, probability and colour bars (publication figure)")
    o.add_argument("--cmap", default="viridis",
                   help="colour map of the --grid figures and the --report (any matplotlib name)")
    o.add_argument("--alpha", type=float, default=0.55,
                   help="opacity of the maps in the --grid figures and the --report")
    o.add_argument("--report", action="store_true",
                   help="also write the browsable HTML report OUT/report/index.html (see `captum-normgrad report`)")
    o.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    o.add_argument("--batch-size", type=_positive_int, default=8, help="images per pass")
    o.add_argument("--no-recursive", action="store_true", help="do not look into sub-folders")
    o.add_argument("--skip-unreadable", action="store_true",
                   help="skip images that do not decode (listed as warnings and in index.json) instead of stopping")
    o.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    p.set_defaults(func=_cmd_explain)


# --------------------------------------------------------------------------- layers


def _cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from .io import CLIInputError, layer_names, load_model

    spec = args.suggest if isinstance(args.suggest, str) else args.model
    if spec is None:
        raise CLIInputError("give the model: --model NAME (or --suggest NAME)")
    if isinstance(args.suggest, str) and args.model is not None and args.model != args.suggest:
        raise CLIInputError(f"two models given (--model {args.model}, --suggest {args.suggest}): give one")
    loaded = load_model(spec, weights=args.weights, num_classes=args.num_classes,
                        image_size=args.image_size, normalize=not args.no_normalize)
    model = loaded.model
    size = _input_size(loaded, args.image_size)
    names = layer_names(model)
    if args.suggest:
        from ._layers import suggest_layers

        names = suggest_layers(model, size)
    shapes = {}
    if not args.no_shapes:
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, o))
                 for n, m in model.named_modules() if n]
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
        finally:
            for h in hooks:
                h.remove()
    modules = dict(model.named_modules())
    for name in names:
        mod = modules[name]
        out = shapes.get(name)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ("-" if out is None else type(out).__name__)
        print(f"{name}\t{type(mod).__name__}\t{shape}" if not args.no_shapes else f"{name}\t{type(mod).__name__}")
    if args.suggest and sys.stdout.isatty():
        print(f"# explain with: --layer {','.join(names)}   (or --layer auto)")
    return EXIT_OK


def register_layers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``captum-normgrad layers``: the layer names of a model, with output shapes."""
    p = sub.add_parser(
        "layers",
        help="list a model's layer names (for --layer) with their output shapes, or suggest some",
        description="Print every submodule of the model as NAME<tab>TYPE<tab>OUTPUT SHAPE (one forward pass "
        "on a blank image of the preprocessing size). With --suggest, print only the layers worth explaining: "
        "the end of each stage (where the feature grid shrinks; evenly spaced encoder blocks for a vision "
        "transformer), the ones `explain --layer auto` uses.",
        epilog="examples:\n  captum-normgrad layers --model resnet50 | grep -v '\\.'\n"
        "  captum-normgrad layers --suggest resnet50",
        formatter_class=_HelpFormatter,
    )
    _add_model_args(p, required=False)
    p.add_argument("--suggest", nargs="?", const=True, default=None, metavar="MODEL",
                   help="print only the suggested layers (the end of each stage) of MODEL (or of --model)")
    p.add_argument("--no-shapes", action="store_true", help="skip the forward pass; names and types only")
    p.set_defaults(func=_cmd_layers)


# --------------------------------------------------------------------------- report


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    page = build_report(args.run_folder, out=args.out, masks=args.masks, tolerance=args.tolerance,
                        image_root=args.images, cmap=args.cmap, alpha=args.alpha, progress=not args.quiet,
                        max_images=args.max_images)
    print(f"report: {page} (open it in a browser; the folder {page.parent} is self-contained, no network needed)")
    return EXIT_OK


def register_report(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``captum-normgrad report RUN_FOLDER``: a browsable HTML report of an explain run."""
    p = sub.add_parser(
        "report",
        help="browsable, self-contained HTML report of an explain or runner run (sort, filter, compare methods)",
        description=(
            "Write a static HTML report of the --out folder of `captum-normgrad explain` (or the output\n"
            "folder of `captum-normgrad run`): every image x method x layer overlaid on the original\n"
            "image, sortable and filterable, with a side-by-side comparison of two methods. With object\n"
            "masks (--masks DIR, named like the images; a runner dataset's own masks) every map gets its\n"
            "pointing hit and energy on the mask, and the summary the rates per method, layer and class.\n"
            "The report folder needs no network: open index.html in a browser."
        ),
        epilog=(
            "examples:\n"
            "  captum-normgrad report maps\n"
            "  captum-normgrad report maps --masks masks/ --out maps_report"
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("run_folder", metavar="RUN_FOLDER",
                   help="the --out folder of captum-normgrad explain, or the output folder of captum-normgrad run")
    p.add_argument("--out", default=None, help="report folder (default: RUN_FOLDER/report)")
    p.add_argument("--masks", default=None, metavar="DIR",
                   help="folder of object masks named like the images (any image format, non-zero = object)")
    p.add_argument("--tolerance", type=float, default=15, help="pointing-game tolerance in model-input pixels")
    p.add_argument("--images", default=None, metavar="DIR", help="folder of the original images, if moved")
    p.add_argument("--cmap", default="viridis", help="colour map of the overlays (any matplotlib name)")
    p.add_argument("--alpha", type=float, default=0.55, help="opacity of the maps over the images")
    p.add_argument("--max-images", type=_positive_int, default=100,
                   help="runner runs: report the first N samples (explain runs are reported whole)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_report)


# --------------------------------------------------------------------------- run (captum_normgrad.runner)


def register_run(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``captum-normgrad run CONFIG``: dataset-scale runs, defined in :mod:`captum_normgrad.runner.cli`."""
    from .runner.cli import register_run as _register

    _register(sub)


#: Subcommands, in ``--help`` order. Add yours here (see the module docstring).
SUBCOMMANDS: List[Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]] = [
    register_demo,
    register_explain,
    register_layers,
    register_run,
    register_report,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-normgrad`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="NormGrad saliency maps (and relatives) for PyTorch models, built on Captum.",
        epilog=(
            "run `captum-normgrad COMMAND --help` for a command's options.\n"
            "examples:\n"
            "  captum-normgrad demo --out out/demo\n"
            "  captum-normgrad explain photos/ --model resnet50 --weights DEFAULT --layer layer3 --out maps"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and not str(exc).startswith("no such"):
        msg = f"no such file or folder: {exc.filename!r}"
    return msg


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``captum-normgrad`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = bool(os.environ.get("CAPTUM_NORMGRAD_DEBUG"))
    import warnings

    formatwarning = warnings.formatwarning
    if not debug:  # warnings as one line each, like the errors
        warnings.formatwarning = lambda message, category, *a, **k: (  # type: ignore[assignment]
            f"{PROG} {args.command}: warning: {' '.join(str(message).split())}\n"
        )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, LookupError) as e:
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # an unexpected failure: still one line, the traceback on demand
        if debug:
            raise
        print(
            f"{PROG} {args.command}: error: {type(e).__name__}: {_one_line(e)} "
            "(set CAPTUM_NORMGRAD_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
