"""The commands and repository paths that README.md and docs/ show work against this checkout.

What is checked, and the conventions the docs follow so that it can be:

- **Commands** come from fenced code blocks marked ``bash``, ``sh``, ``shell``, ``console`` or unmarked. A line
  ending in ``\\`` continues on the next; ``# ...`` starts a comment; a leading ``$ `` prompt is dropped. A
  command is the part of a line from its ``python``/``python3``/``torchrun`` word on (so ``srun ... python
  train.py`` counts).
- ``python train.py ...``, ``python evaluate.py ...`` and ``torchrun ... train.py|evaluate.py ...``: the
  overrides compose with Hydra's compose API (``configs/``, config ``train`` or ``eval``), which checks group
  options, key names and the types the config schema declares. Hydra's own flags (``-m``, ``--multirun``, any
  argument starting with ``-``) and ``hydra.*`` overrides are dropped; with ``-m`` a sweep (``key=a,b,c``) is
  composed once per choice.
- **Placeholders**: ``<name>`` (one word, no spaces, inside any argument) is a value the reader fills in and is
  replaced by the string ``placeholder``; a value that is exactly ``...`` (``lora=...``) likewise. A bare ``...``
  argument means "and your other overrides": it is dropped, and it waives the last check, that the composed
  config leaves no value unset (``???``), which every other command must pass.
- ``python -m X``: module ``X`` is importable (``importlib.util.find_spec``).
- ``python <script>.py``: the script exists and every ``--flag`` given appears in its source.
- **Paths** in inline code (``alignment/dpo.py``, ``configs/objective/dpo.yaml``): a span without spaces or
  placeholders whose first segment is a top-level file or folder of the repository must exist. A dotted name
  under a project package (``metrics.detectors.ToyOracleDetector``) must be a module, or a class, function or
  assignment at the top level of one.
- **Links**: relative Markdown links point at files that exist, and ``#anchors`` at headings of the target (the
  anchors GitHub derives from heading text).
- README.md keeps the install and test commands that ``.ci/run`` runs, within 250 lines.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import train  # noqa: F401 - registers the config schema and the ${repo:...} resolver that composing needs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
ENTRY_CONFIGS = {"train.py": "train", "evaluate.py": "eval"}
PLACEHOLDER = "placeholder"
PACKAGES = ("common", "alignment", "data", "models", "metrics", "workflows")
TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"} - {
    ".venv", "outputs", "multirun", "t2i_safety_align.egg-info"}
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_markdown(path: Path) -> tuple[list[tuple[int, str, str]], str]:
    """``(line number, fence language, [(line number, line)])`` of every fenced block, and the prose with the
    blocks blanked (so that line numbers still match)."""
    blocks, prose, current = [], [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if current is None and match:
            current = (number, match.group(2).lower(), [])
            prose.append("")
        elif current is not None and line.strip().startswith("```"):
            blocks.append(current)
            current = None
            prose.append("")
        elif current is not None:
            current[2].append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


def shell_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every python/torchrun command in the docs' shell blocks."""
    out = []
    for path in DOCS:
        blocks, _ = split_markdown(path)
        for _, lang, lines in blocks:
            if lang not in SHELL_FENCES:
                continue
            pending, start = "", None
            for number, line in lines:
                text = line.strip()
                if not pending and text.startswith("$ "):
                    text = text[2:]
                if start is None:
                    start = number
                if text.endswith("\\"):
                    pending += text[:-1] + " "
                    continue
                full, pending = pending + text, ""
                where, start = f"{relative(path)}:{start}", None
                words = re.sub(r"<[\w.\-/]+>", PLACEHOLDER, full)
                try:
                    argv = shlex.split(words, comments=True)
                except ValueError as err:  # an unclosed quote: the command would not run either
                    out.append((where, ["<unparsable>", str(err), full]))
                    continue
                for i, word in enumerate(argv):
                    if word in ("python", "python3", "torchrun") or word.endswith("/python"):
                        out.append((where, argv[i:]))
                        break
    return out


COMMANDS = shell_commands()


def entry_script(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(config name, arguments)`` of a train.py / evaluate.py command, or None."""
    if argv[0] == "torchrun":
        for i, word in enumerate(argv):
            if Path(word).name in ENTRY_CONFIGS:
                return ENTRY_CONFIGS[Path(word).name], argv[i + 1:]
        return None
    if len(argv) > 1 and Path(argv[1]).name in ENTRY_CONFIGS and not argv[1].startswith("-"):
        return ENTRY_CONFIGS[Path(argv[1]).name], argv[2:]
    return None


def unset_keys(cfg) -> list[str]:
    """Keys whose value is ``???``, found without resolving interpolations (``${hydra:...}`` needs a run)."""
    found = []

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}.")
        elif node == "???":
            found.append(prefix[:-1])

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def override_sets(arguments: list[str]) -> tuple[list[list[str]], bool]:
    """The override lists to compose (one per sweep choice under ``-m``) and whether a bare ``...`` was given."""
    multirun = any(a in ("-m", "--multirun") for a in arguments)
    etc = "..." in arguments
    overrides = []
    for arg in arguments:
        if arg == "..." or arg.startswith("-"):
            continue
        key, sep, value = arg.partition("=")
        if key.lstrip("+~").startswith("hydra."):
            continue
        overrides.append(f"{key}={PLACEHOLDER}" if sep and value == "..." else arg)
    if not multirun:
        return [overrides], etc
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
             for o in parsed]
    sets = [first]
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            sets += [first[:i] + [f"{override.get_key_element()}={choice}"] + first[i + 1:]
                     for choice in override.sweep_string_iterator()]
    return sets, etc


@functools.lru_cache(maxsize=None)
def composition_problem(config_name: str, overrides: tuple[str, ...], etc: bool) -> str | None:
    """Why ``overrides`` do not compose into a config that can run, or None; cached, as README and docs pages
    show some commands twice."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        try:
            cfg = compose(config_name=config_name, overrides=list(overrides))
        except Exception as err:  # noqa: BLE001 - the message is the finding
            return f"does not compose: {type(err).__name__}: {err}"
    missing = [] if etc else unset_keys(cfg)
    return f"leaves unset: {', '.join(missing)}" if missing else None


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{w} {' '.join(a[:3])}" for w, a in COMMANDS])
def test_documented_command_works(where, argv):
    assert argv[0] != "<unparsable>", f"{where}: not valid shell: {argv[1]}: {argv[2]}"
    entry = entry_script(argv)
    if entry is not None:
        config_name, arguments = entry
        sets, etc = override_sets(arguments)
        for overrides in sets:
            problem = composition_problem(config_name, tuple(overrides), etc)
            assert problem is None, f"{where}: {' '.join(argv)}\n  {problem}"
        return
    if argv[0] == "torchrun":
        pytest.fail(f"{where}: torchrun runs neither train.py nor evaluate.py: {' '.join(argv)}")
    if len(argv) > 2 and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, f"{where}: no module {argv[2]} ({' '.join(argv)})"
        return
    if len(argv) > 1 and argv[1].endswith(".py"):
        script = ROOT / argv[1]
        assert script.is_file(), f"{where}: no script {argv[1]}"
        source = script.read_text(encoding="utf-8")
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{where}: {argv[1]} has no option {flag}"
        return
    pytest.fail(f"{where}: a python command the docs test does not know how to check: {' '.join(argv)}")


def test_the_docs_show_commands():
    assert sum(entry_script(a) is not None for _, a in COMMANDS) >= 30
    assert any(a[:3] == ["python", "-m", "workflows.toy_build"] for _, a in COMMANDS)


INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def inline_spans() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        _, prose = split_markdown(path)
        for number, line in enumerate(prose.splitlines(), 1):
            out.extend((f"{relative(path)}:{number}", span.strip()) for span in INLINE.findall(line))
    return out


SPANS = inline_spans()


def looks_like_path(span: str) -> bool:
    if any(c in span for c in " <>*{}$=,|()[]") or "..." in span or span.startswith(("/", "~", ".venv")):
        return False
    first = span.split("/")[0]
    return first in TOP_LEVEL and ("/" in span or (ROOT / first).is_file() or "." in first)


PATHS = sorted({(w, s) for w, s in SPANS if looks_like_path(s)})
DOTTED = sorted({(w, s) for w, s in SPANS if re.fullmatch(rf"(?:{'|'.join(PACKAGES)})(?:\.\w+)+", s)})


@pytest.mark.parametrize("where, span", PATHS, ids=[f"{w} {s}" for w, s in PATHS])
def test_documented_path_exists(where, span):
    assert (ROOT / span.rstrip("/")).exists(), f"{where}: `{span}` does not exist in the repository"


def top_level_names(file: Path) -> set[str]:
    names = set()
    for node in ast.parse(file.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):  # re-exports, e.g. data.readers's reader classes
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def python_module(name: str) -> str | None:
    """The longest prefix of ``name`` that is an importable module, or None."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            if importlib.util.find_spec(".".join(parts[:cut])) is not None:
                return ".".join(parts[:cut])
        except (ImportError, ValueError):  # a prefix that is a module, not a package
            continue
    return None


@pytest.mark.parametrize("where, name", DOTTED, ids=[f"{w} {s}" for w, s in DOTTED])
def test_documented_dotted_name_exists(where, name):
    """Spans such as ``data.path`` or ``metrics.json`` are config keys and files: only names whose first two
    parts are a project module (``metrics.detectors...``) are Python names."""
    module = python_module(name)
    if module is None or "." not in module:
        parent = ".".join(name.split(".")[:2])
        if (ROOT / parent.replace(".", "/")).with_suffix(".py").exists():
            pytest.fail(f"{where}: `{name}`: {parent} is a module but does not import")
        return
    rest = name[len(module) + 1:].split(".") if name != module else []
    if not rest:
        return
    origin = importlib.util.find_spec(module).origin
    assert origin and len(rest) == 1, f"{where}: `{name}`: {module} has no {'.'.join(rest)}"
    assert rest[0] in top_level_names(Path(origin)), f"{where}: `{name}`: {module} defines no {rest[0]}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_markdown(path)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", prose, re.M)}


LINKS = sorted({(f"{relative(p)}", target) for p in DOCS for target in LINK.findall(split_markdown(p)[1])
                if not re.match(r"[a-z]+:", target)})


@pytest.mark.parametrize("source, target", LINKS, ids=[f"{s} -> {t}" for s, t in LINKS])
def test_documented_link_resolves(source, target):
    file, _, anchor = target.partition("#")
    path = (ROOT / source).parent / file if file else ROOT / source
    assert path.exists(), f"{source}: link to {target}: {path.relative_to(ROOT)} does not exist"
    if anchor:
        assert path.suffix == ".md", f"{source}: link to {target}: an anchor into a non-Markdown file"
        assert anchor in anchors(path), f"{source}: link to {target}: no heading with that anchor in {file or source}"


def test_readme_keeps_the_ci_commands_and_stays_short():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    blocks, _ = split_markdown(ROOT / "README.md")
    shown = "\n".join(line for _, lang, lines in blocks if lang in SHELL_FENCES for _, line in lines)
    assert 'pip install torch==2.13.0 -e ".[dev]"' in shown
    assert re.search(r"^python -m pytest -q(\s|$)", shown, re.M)
