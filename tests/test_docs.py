"""Every code block in README.md and docs/*.md is run or checked, so the documentation cannot drift from the code.

* ```python blocks run, each file's blocks in order in one namespace, with the placeholder names the docs use
  for "your model" (``repo_or_dir``, ``a``, ``b``) bound to tiny local models from ``tests/tiny.py``. Anything
  else a block uses (a tokenizer...) it must define, as a reader who copies it would have to.
* A ```text output block right after a python block must be exactly what that block printed.
* ```bash / ```sh blocks (and ``$ `` lines of ```console blocks): every ``hf-weightstream ...`` command must parse
  with the real command-line parser, and every ``make TARGET`` must name a Makefile target.
* docs/api.md's tables marked ``<!-- checked: ... -->`` must list exactly the StreamConfig fields (with their
  defaults), the ``stats()`` and ``WeightPool.stats()`` keys, and the CLI commands the code has.
* Every ```text block of docs/troubleshooting.md is an error message the package can raise (``{...}`` marks the
  variable parts), under the exception class that raises it.
* README.md links nothing by a relative path (a package index page would break it; files are named by their path
  in backticks instead, and those paths must exist); relative links in docs/ must lead to existing files.

Blocks in any other fence language fail the test, so a snippet cannot be skipped by a typo such as ```py.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import gc
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import hf_weightstream

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ["quickstart.md", "how-it-works.md", "tuning.md", "troubleshooting.md", "api.md"]
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
PACKAGE = ROOT / "hf_weightstream"
RUN = {"python"}
SHELL = {"bash", "sh", "console"}
NOT_RUN = {"text", "json", "toml", "mermaid"}
# README blocks that cannot run as they are: (file, first line of the block) -> reason. Keep this empty.
SKIP: dict[tuple[str, int], str] = {}


@dataclass
class Block:
    path: str
    line: int  # 1-based line of the first line of code
    lang: str
    flags: tuple[str, ...]
    code: str
    follows: Block | None  # the block right before this one, when only blank lines separate them


def blocks(path: str) -> list[Block]:
    lines = (ROOT / path).read_text().splitlines()
    found: list[Block] = []
    i = 0
    last_end = -10
    while i < len(lines):
        match = re.match(r"^ {0,3}(`{3,})\s*(.*)$", lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.group(1), match.group(2).split()
        start = i + 1
        i = start
        while i < len(lines) and not re.match(rf"^ {{0,3}}{fence}\s*$", lines[i]):
            i += 1
        assert i < len(lines), f"{path}:{start}: unclosed code fence"
        gap = lines[last_end + 1 : start - 1]
        follows = found[-1] if found and last_end >= 0 and all(not g.strip() for g in gap) else None
        lang = info[0] if info else ""
        found.append(Block(path, start + 1, lang, tuple(info[1:]), "\n".join(lines[start:i]) + "\n", follows))
        last_end = i
        i += 1
    return found


# ---------------------------------------------------------------------------------------------------- python
@pytest.fixture
def placeholders(checkpoints):
    repo_or_dir = str(checkpoints("llama"))
    return {"__name__": "__docs__", "repo_or_dir": repo_or_dir, "a": repo_or_dir, "b": str(checkpoints("qwen2_tied"))}


def test_the_docs_exist():
    assert {f"docs/{name}" for name in REQUIRED} <= set(DOCS)


@pytest.mark.parametrize("path", DOCS)
def test_fence_languages_are_known(path):
    for block in blocks(path):
        assert block.lang in RUN | SHELL | NOT_RUN, (
            f"{path}:{block.line}: fence language {block.lang!r}: use python (run by tests/test_docs.py), "
            f"bash (checked) or text"
        )


@pytest.mark.parametrize("path", DOCS)
def test_python_blocks_run(path, placeholders):
    namespace = dict(placeholders)
    printed: dict[int, str] = {}
    try:
        for block in blocks(path):
            if block.lang != "python" or (path, block.line) in SKIP:
                continue
            # Padding with newlines makes tracebacks point at the line of the markdown file itself.
            code = compile("\n" * (block.line - 1) + block.code, str(ROOT / path), "exec")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
            printed[block.line] = out.getvalue()
        for block in blocks(path):
            if block.lang == "text" and "output" in block.flags:
                assert block.follows is not None and block.follows.lang == "python", (
                    f"{path}:{block.line}: a 'text output' block must follow a python block"
                )
                assert printed[block.follows.line].rstrip() == block.code.rstrip(), (
                    f"{path}:{block.line}: the output shown is not what the block above prints"
                )
    finally:
        hf_weightstream.set_default_pool(None)
        namespace.clear()
        gc.collect()


# ----------------------------------------------------------------------------------------------------- shell
def shell_commands(block: Block) -> list[list[str]]:
    """The simple commands of a shell block, split at pipes, ``&&`` and ``;``, without env assignments."""
    text = block.code.replace("\\\n", " ")
    lines = text.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    commands = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in {"|", "||", "&&", ";", "&"}:
                while current and re.match(r"^\w+=", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def cli_parse(argv: list[str]) -> None:
    from hf_weightstream.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 0, err.getvalue()


@pytest.mark.parametrize("path", DOCS)
def test_shell_blocks_use_real_commands(path):
    targets = set(re.findall(r"^([\w.-]+)\s*:", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    for block in blocks(path):
        if block.lang not in SHELL:
            continue
        for command in shell_commands(block):
            where = f"{path}:{block.line}: {shlex.join(command)}"
            if command[0] == "hf-weightstream":
                cli_parse(command[1:])
            elif command[:3] == ["python", "-m", "hf_weightstream"]:
                cli_parse(command[3:])
            elif command[0] == "make":
                missing = [t for t in command[1:] if "=" not in t and not t.startswith("-") and t not in targets]
                assert not missing, f"{where}: no Makefile target {missing}"


# ----------------------------------------------------------------------------------------------- api tables
def checked_table(path: str, name: str) -> dict[str, list[str]]:
    """Rows of the table after ``<!-- checked: name -->``: first column (in backticks) -> the other cells."""
    lines = (ROOT / path).read_text().splitlines()
    start = lines.index(f"<!-- checked: {name} -->")
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([^`]+)`", cells[0])
        if match:
            rows[match.group(1)] = cells[1:]
    assert rows, f"{path}: the table after <!-- checked: {name} --> is empty"
    return rows


def test_api_lists_every_stream_config_field_with_its_default():
    rows = checked_table("docs/api.md", "StreamConfig fields")
    fields = {f.name: f.default for f in dataclasses.fields(hf_weightstream.StreamConfig) if f.init}
    assert list(rows) == list(fields)
    for name, cells in rows.items():
        default = re.fullmatch(r"`([^`]+)`", cells[0])
        assert default, f"StreamConfig.{name}: the default column must be a Python expression in backticks"
        assert eval(default.group(1), {"__builtins__": {}}) == fields[name], f"StreamConfig.{name} default"


def test_api_lists_every_stats_key(checkpoints):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream")
    assert list(checked_table("docs/api.md", "stats keys")) == list(hf_weightstream.stats(model))
    moe = AutoModelForCausalLM.from_pretrained(checkpoints("qwen3_moe"), device_map="stream")
    moe_keys = [key for key in hf_weightstream.stats(moe) if key not in hf_weightstream.stats(model)]
    assert list(checked_table("docs/api.md", "MoE stats keys")) == moe_keys
    pool_keys = list(model._hf_weightstream.pool.stats())
    assert list(checked_table("docs/api.md", "WeightPool.stats keys")) == pool_keys


def test_api_lists_every_cli_command():
    from hf_weightstream.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert set(checked_table("docs/api.md", "CLI commands")) == set(subparsers.choices)


# --------------------------------------------------------------------------------------------- error messages
def _normalize(text: str) -> str:
    return " ".join(re.sub(r"\{[^{}]*\}", "{}", text).split())


def _string_template(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def package_modules() -> list[str]:
    """Dotted names of every module of the package, subpackages included."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] != "__main__":
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def message_templates() -> list[tuple[str, str | None]]:
    """(normalized string literal of the package, exception class raising it when it is a ``raise X(...)``)."""
    out: list[tuple[str, str | None]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        raised: dict[int, str] = {}
        for node in ast.walk(tree):
            exc = node.exc if isinstance(node, ast.Raise) else None
            if isinstance(exc, ast.Call) and exc.args and isinstance(exc.func, ast.Name):
                raised[id(exc.args[0])] = exc.func.id
        for node in ast.walk(tree):
            template = _string_template(node)
            if template is not None:
                out.append((_normalize(template), raised.get(id(node))))
    return out


def test_troubleshooting_quotes_real_error_messages():
    templates = message_templates()
    modules = [builtins] + [importlib.import_module(name) for name in package_modules()]
    quoted = [b for b in blocks("docs/troubleshooting.md") if b.lang == "text"]
    assert len(quoted) > 20
    for block in quoted:
        message = " ".join(block.code.split())
        match = re.match(r"^(\w+): ", message)
        cls = None
        if match and match.group(1)[0].isupper():
            cls, message = match.group(1), message[match.end() :]
            known = next((getattr(m, cls) for m in modules if hasattr(m, cls)), None)
            assert isinstance(known, type) and issubclass(known, Exception), f"{block.line}: no exception {cls}"
        wanted = _normalize(message)
        sources = [raiser for template, raiser in templates if wanted in template]
        assert sources, f"docs/troubleshooting.md:{block.line}: no such message in hf_weightstream: {message!r}"
        raisers = {r for r in sources if r is not None}
        if cls is not None and raisers:
            assert cls in raisers, f"docs/troubleshooting.md:{block.line}: raised as {raisers}, not {cls}"


# ---------------------------------------------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)|<img[^>]+src=[\"']([^\"']+)")


def link_targets(path: str) -> list[str]:
    return [a or b for a, b in LINK.findall((ROOT / path).read_text())]


def test_readme_links_nothing_by_a_relative_path():
    relative = [t for t in link_targets("README.md") if not re.match(r"^(https?://|#)", t)]
    assert not relative, f"README.md: relative links break on a package index page: {relative}"


def test_paths_the_readme_names_exist():
    top = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
    named = set(re.findall(r"`([\w.-]+(?:/[\w.*-]+)+/?)`", (ROOT / "README.md").read_text()))
    checked = [n for n in named if n.split("/")[0] in top]
    assert len(checked) >= 8
    missing = [n for n in checked if not list(ROOT.glob(n.rstrip("/")))]
    assert not missing, f"README.md names paths that do not exist: {missing}"


@pytest.mark.parametrize("path", [d for d in DOCS if d.startswith("docs/")])
def test_relative_links_in_docs_lead_to_files(path):
    for target in link_targets(path):
        if re.match(r"^(https?://|#|mailto:)", target):
            continue
        assert ((ROOT / path).parent / target.split("#")[0]).exists(), f"{path}: broken link {target}"


# ---------------------------------------------------------------------------------------------------- names
def test_model_and_pool_stats_use_one_name_for_one_quantity(checkpoints):
    """With one model on a pool, every key the two dicts share has the same value."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream")
    model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False)
    mine, pool = hf_weightstream.stats(model), model._hf_weightstream.pool.stats()
    shared = set(mine) & set(pool)
    assert {"budget_bytes", "resident_bytes", "peak_resident_bytes", "hits", "misses", "evictions"} <= shared
    assert {key: mine[key] for key in shared} == {key: pool[key] for key in shared}
    assert not {key for key in pool if "held" in key}, "the pool's keys use the model stats' words"
