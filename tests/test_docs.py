"""The documentation cannot drift: the site builds with ``mkdocs build --strict`` (warnings are
errors, API reference from the docstrings included), every Python code block of ``docs/*.md`` runs,
and every ``captum-normgrad ...`` command line shown in the docs parses with the real parser.

A Python block is skipped only when the line right above its fence is
``<!-- docs-test: skip (reason) -->`` and the reason says it needs internet or weights that cannot
be downloaded here (the test checks that reason), or "the optional X extra": such a block still
runs wherever package X is importable (as in CI, where every extra is installed).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

torch.set_num_threads(1)  # the machine is shared: one thread is much faster than two contending ones

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^\n]*$")
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")

pytestmark = pytest.mark.timeout(300)


def code_blocks(text: str) -> List[Tuple[int, str, str, str]]:
    """``(line, language, code, skip_reason)`` of every fenced block of a Markdown page."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group("indent"), m.group("fence"), m.group("lang").lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        above = lines[start - 1] if start > 0 else ""
        skip = _SKIP.search(above)
        blocks.append((start + 1, lang, "\n".join(body), skip.group("reason") if skip else ""))
    return blocks


def test_code_block_parser_finds_indented_and_skipped_blocks() -> None:
    text = "a\n```python\nx = 1\n```\n<!-- docs-test: skip (needs internet) -->\n```py\ny\n```\n" \
           "- item\n\n    ```bash\n    ls\n    ```\n"
    assert code_blocks(text) == [(2, "python", "x = 1", ""), (6, "py", "y", "needs internet"), (11, "bash", "ls", "")]


def test_pages_are_found() -> None:
    for page in ("index.md", "getting-started.md", "cli.md", "api.md", "methods/normgrad.md",
                 "methods/normgrad-order1.md", "methods/variants.md"):
        assert page in PAGES


def _docs_extra_or_skip() -> None:
    """The site build needs the docs extra; where it is absent, skip and say how to get it."""
    missing = []
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)} missing): pip install -e '.[docs]'")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with ``mkdocs build --strict`` (warnings are errors)."""
    _docs_extra_or_skip()
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", MPLBACKEND="Agg")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "WARNING" not in r.stderr, r.stderr[-3000:]
    return out


def test_site_builds_strict(site: Path) -> None:
    api = (site / "api" / "index.html").read_text()
    for name in ("LayerNormGrad", "LayerNormGradOrder1", "fuse_maps", "load_model", "explain_files"):
        assert name in api
    # the Captum-style docstrings were parsed into parameter tables, not left as raw text
    assert "doc-section-parameters" in api or "Parameters:" in api
    for page in ("methods/normgrad", "methods/normgrad-order1", "methods/variants", "cli", "getting-started",
                 "gallery"):
        assert (site / page / "index.html").is_file()


def _public_modules() -> List[str]:
    import pkgutil

    import captum_normgrad

    import importlib.util

    def deprecated_alias(name: str) -> bool:
        """Moved modules' shims (their docstring opens with "Deprecated location"): not API."""
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        return bool(origin) and Path(origin).read_text().lstrip('r"\n').startswith("Deprecated location")

    return ["captum_normgrad"] + sorted(
        m.name for m in pkgutil.walk_packages(captum_normgrad.__path__, "captum_normgrad.",
                                              onerror=lambda name: None)
        if not any(part.startswith("_") for part in m.name.split(".")[1:]) and not deprecated_alias(m.name)
    )


def test_api_reference_lists_every_public_name(site: Path) -> None:
    """Every name in the ``__all__`` of every public module has its entry (an anchor) in the API page:
    under the module itself, or, for a re-export, under the module that defines it."""
    import importlib
    import pkgutil

    ids = set(re.findall(r'id="([^"]+)"', (site / "api" / "index.html").read_text()))
    exported = []  # (module, name, object) of every public name
    for name in _public_modules():
        mod = importlib.import_module(name)
        exported += [(name, public, getattr(mod, public)) for public in getattr(mod, "__all__", [])
                     if not public.startswith("__")]  # dunders (__version__) are not API entries
    missing = []
    for name, public, obj in exported:
        # documented where it is defined, or where any public module re-exports the same object
        where = {f"{m}.{n}" for m, n, o in exported if n == public and o is obj}
        where.add(f"{getattr(obj, '__module__', name)}.{public}")
        mod = importlib.import_module(name)
        where |= {f"{name}.{s.name}.{public}" for s in pkgutil.iter_modules(getattr(mod, "__path__", []))}
        if not where & ids:
            missing.append(f"{name}.{public}")
    total = len(exported)
    assert total > 150
    assert missing == [], f"{len(missing)} public names missing from docs/api.md: {missing}"


def _runs_anyway(reason: str) -> bool:
    """A block skipped for "the optional X extra" still runs where X is installed (as in CI)."""
    m = re.search(r"optional (\w+) extra", reason)
    if not m or re.search(r"internet|download|weights", reason):
        return False
    try:
        __import__(m.group(1))
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python block of a page runs, in order, in one namespace (as a reader would run them)."""
    blocks = [b for b in code_blocks((DOCS / page).read_text()) if b[1] in ("python", "py", "python3")]
    runnable = [b for b in blocks if not b[3] or _runs_anyway(b[3])]
    for line, _, _, reason in blocks:
        if reason:
            assert re.search(r"internet|download|weights|optional \w+ extra", reason), (
                f"{page}:{line}: a skipped block must say it needs internet, weights or an optional extra, "
                f"got {reason!r}"
            )
    if not runnable:
        pytest.skip(f"{page} has no runnable Python block")
    monkeypatch.chdir(tmp_path)  # blocks that write files write here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    namespace = {"__name__": f"docs:{page}"}
    for line, _, code, _ in runnable:
        exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code


def _command_lines(text: str) -> List[Tuple[int, str]]:
    out = []
    for line, lang, code, _ in code_blocks(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        joined = code.replace("\\\n", " ")
        for cmd in joined.splitlines():
            cmd = cmd.strip()
            if cmd.startswith("captum-normgrad"):
                out.append((line, cmd))
    return out


def test_command_lines_in_docs_parse() -> None:
    """Every ``captum-normgrad ...`` line shown in a shell block of any page uses options that exist."""
    from captum_normgrad import cli

    parser = cli.build_parser()
    commands = [(page, line, cmd) for page in PAGES for line, cmd in _command_lines((DOCS / page).read_text())]
    assert len(commands) >= 8  # the CLI page alone shows more
    for page, line, cmd in commands:
        argv = shlex.split(cmd, comments=True)[1:]
        if argv[-1:] in (["--help"], ["-h"]):
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse reports on stderr and exits
            pytest.fail(f"docs/{page}:{line}: `{cmd}` does not parse (exit {e.code})")
        assert callable(args.func)


def test_readme_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Documentation" in readme and "mkdocs build --strict" in readme
    assert "## The two commands" in readme and "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme


def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The README's swap-Grad-CAM-for-NormGrad example runs and gives the shapes it states."""
    blocks = [b for b in code_blocks((ROOT / "README.md").read_text()) if b[1] == "python"]
    assert blocks, "the README must show a Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs:README"}
    for line, _, code, _ in blocks:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
    assert tuple(namespace["gradcam"].shape) == (2, 1, 7, 7)
    assert tuple(namespace["normgrad"].shape) == (2, 1, 28, 28)
    assert tuple(namespace["heat"].shape) == (2, 1, 224, 224)
