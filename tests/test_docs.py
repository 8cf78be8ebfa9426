"""The documentation: it builds strictly, its generated tables match the result JSONs, and every command it shows
runs as written (each `draftalign VERB` and bench script once with --help, every flag a command uses checked
against that help; no undefined shell variable, no `<placeholder>` that a shell would read as a redirect)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_readme_is_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "make run    # " in text and "make test   # " in text


def test_mkdocs_builds_strictly(tmp_path):
    r = run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").exists()


def test_generated_tables_match_the_result_jsons():
    r = run([sys.executable, "-m", "bench.summary", "--check"])
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"


def test_every_table_marker_is_filled():
    for path in DOCS:
        text = path.read_text()
        for name in re.findall(r"<!-- summary:([\w-]+) -->", text):
            body = text.split(f"<!-- summary:{name} -->", 1)[1].split(f"<!-- /summary:{name} -->", 1)[0]
            assert "|---" in body, f"{path.relative_to(ROOT)}: table {name} is empty"


# ------------------------------------------------------------------ documented commands


def bash_blocks() -> list[tuple[str, str]]:
    """(where, block text) for every ```bash block of the README and docs."""
    return [(str(p.relative_to(ROOT)), m[1]) for p in DOCS for m in FENCE.finditer(p.read_text())]


def logical_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def expand(block: list[str]) -> list[str]:
    """Substitute the block's own VAR="…" / VAR=(…) assignments into the lines after them (text only)."""
    env: dict[str, str] = {}
    out = []
    for line in block:
        m = (re.match(r"^(\w+)=\((.*)\)$", line) or re.match(r"^(\w+)=\"(.*)\"$", line)
             or re.match(r"^(\w+)=(\S+)$", line))
        for name, value in env.items():
            line = line.replace('"${' + name + '[@]}"', value).replace("${" + name + "}", value)
            line = re.sub(r"\$" + name + r"\b", lambda _m, v=value: v, line)
        if m:
            env[m[1]] = m[2]
        out.append(line)
    return out


def commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, line, program, flags): every documented draftalign / bench command."""
    found = []
    for where, block in bash_blocks():
        for line in expand(logical_lines(block)):
            for part in re.split(r"\s(?:&&|;|\|\|)\s", line):
                words = shlex.split(part, comments=True)
                if not words:
                    continue
                if words[0].endswith("draftalign"):
                    rest = [w for w in words[1:] if w != "--verbose"]
                    program = f"draftalign {rest[0]}"
                elif words[0].endswith("python") and len(words) > 1 and words[1].startswith("bench/"):
                    program, rest = words[1], words[2:]
                elif words[0].endswith("python") and words[1:3] == ["-m", "bench.summary"]:
                    program, rest = "bench/summary.py", words[3:]
                else:
                    continue
                flags = sorted({w.split("=", 1)[0] for w in rest if w.startswith("--")})
                found.append((where, part, program, flags))
    return found


def test_documented_blocks_define_their_variables_and_have_no_placeholders():
    for where, block in bash_blocks():
        lines = logical_lines(block)
        defined = {m[1] for line in lines for m in [re.match(r"^(\w+)=", line)] if m}
        for line in lines:
            code = re.sub(r"'[^']*'", "''", line)
            code = code.split(" #", 1)[0] if not code.startswith("#") else ""
            for var in re.findall(r"\$\{?(\w+)", code):
                assert var in defined, f"{where}: ${var} is not defined in its block: {line}"
            unquoted = re.sub(r'"[^"]*"', '""', code)
            assert not re.search(r"(?<![<\d])<(?![<(])", unquoted), \
                f"{where}: a '<' the shell reads as a redirect: {line}"


HELP_DRIVER = r"""
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    buf = io.StringIO()
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:  # an import error: report it as the script's failure
        code, buf = 1, io.StringIO(f"{type(e).__name__}: {e}")
    out[script] = {"code": code, "help": buf.getvalue()}
print("HELP-JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def documented():
    found = commands()
    programs = {p for _, _, p, _ in found}
    assert any(p.startswith("draftalign ") for p in programs) and any(p.startswith("bench/") for p in programs)
    return found


def test_documented_draftalign_commands_parse(documented):
    import typer
    from typer.testing import CliRunner

    from draftalign.cli import app

    group = typer.main.get_command(app)
    runner = CliRunner()
    for verb in sorted({p.split()[1] for _, _, p, _ in documented if p.startswith("draftalign ")}):
        assert verb in group.commands, f"documented verb {verb!r} does not exist"
        r = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        cmd = group.commands[verb]
        known = {o for p in cmd.params for o in p.opts + p.secondary_opts if o.startswith("--")} | {"--help"}
        for where, line, program, flags in documented:
            if program == f"draftalign {verb}":
                for flag in flags:
                    assert flag in known, f"{where}: `{program}` has no option {flag}: {line}"


def test_documented_bench_commands_parse(documented):
    scripts = sorted({p for _, _, p, _ in documented if p.startswith("bench/")})
    for s in scripts:
        assert (ROOT / s).exists(), f"documented script {s} does not exist"
    r = run([sys.executable, "-c", HELP_DRIVER, *scripts], env={**os.environ, "COLUMNS": "200"})
    assert "HELP-JSON" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    helps = json.loads(r.stdout.split("HELP-JSON", 1)[1])
    for script, h in helps.items():
        assert h["code"] == 0, f"{script} --help failed: {h['help'][-2000:]}"
    for where, line, program, flags in documented:
        if program in helps:
            for flag in flags:
                assert re.search(re.escape(flag) + r"\b", helps[program]["help"]), \
                    f"{where}: `{program}` has no option {flag}: {line}"
