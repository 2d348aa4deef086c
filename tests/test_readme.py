"""The README's commands run as written from a new shell: every `make` target exists, every other command's
program is in the venv (which the README activates before its first such command), every script and module it
names exists, and every option it gives a project script is one that script accepts."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import BIN, ROOT, stage_env

README = ROOT / "README.md"
ACTIVATE = "source .venv/bin/activate"
# Programs a README command may start with that are not in the venv: the shell's own, or the user's cluster's.
SYSTEM = {"make", "source", "curl", "srun", "torchrun", "export", "cd", "deactivate"}


def bash_commands() -> list[tuple[int, str]]:
    """(line number, command) of every command in the README's ```bash blocks; continuation lines joined."""
    commands: list[tuple[int, str]] = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_block = line.strip() == "```bash" and not in_block
            continue
        if not in_block:
            continue
        text = re.sub(r"(^|\s)#.*$", "", line).rstrip()  # comments, whole-line or trailing
        if not text and not pending:
            continue
        if not pending:
            start = number
        pending += text.rstrip("\\") + " "
        if not text.endswith("\\"):
            commands.append((start, pending.strip()))
            pending = ""
    return commands


def words(command: str) -> list[str]:
    """The command's words after leading `VAR=value` assignments (`PATH=... mlflow models serve`)."""
    parts = shlex.split(command)
    while parts and re.match(r"^[A-Z_]+=", parts[0]):
        parts = parts[1:]
    return parts


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_the_readme_has_commands_to_check() -> None:
    firsts = {words(c)[0] for _, c in bash_commands()}
    assert {"make", "dvc", "python", ACTIVATE.split()[0]} <= firsts  # the parser reads the blocks


def test_every_make_target_in_the_readme_exists() -> None:
    targets = make_targets()
    used = set(re.findall(r"`make ([a-z][\w-]*)", README.read_text()))
    used |= {words(c)[1] for _, c in bash_commands() if words(c)[0] == "make" and len(words(c)) > 1}
    assert used and used <= targets, f"README names make targets the Makefile lacks: {sorted(used - targets)}"


def test_venv_programs_come_after_the_activation_line() -> None:
    """`dvc: command not found` in a new shell: the README activates the venv before any venv program."""
    commands = bash_commands()
    activation = next((n for n, c in commands if c.startswith(ACTIVATE)), None)
    assert activation is not None, f"README lacks `{ACTIVATE}`"
    for number, command in commands:
        program = words(command)[0]
        if program in SYSTEM:
            continue
        assert (BIN / program).exists(), f"README line {number}: {program!r} is neither in the venv nor a shell command"
        assert number > activation, f"README line {number}: `{command}` comes before `{ACTIVATE}`"


def script_calls() -> list[tuple[int, list[str]]]:
    return [(n, words(c)[1:]) for n, c in bash_commands() if words(c)[0] == "python"]


def test_every_script_and_module_named_exists() -> None:
    for number, args in script_calls():
        if args[0] == "-m":
            found = subprocess.run([sys.executable, "-c", f"import {args[1]}"], capture_output=True, cwd=ROOT)
            assert found.returncode == 0, f"README line {number}: no module {args[1]}"
        else:
            assert (ROOT / args[0]).is_file(), f"README line {number}: no script {args[0]}"


@pytest.mark.parametrize("script", sorted({a[0] for _, a in script_calls() if a[0].endswith(".py")}))
def test_every_option_given_to_a_script_is_one_it_accepts(script: str) -> None:
    """Options (`--model`, `--out`, ...) against the script's own `--help`; stage scripts take overrides only."""
    options = {o for _, a in script_calls() if a[0] == script for o in a[1:] if o.startswith("--")}
    options = {o.split("=")[0] for o in options}
    if not options:
        return
    shown = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for option in options:
        assert option in shown.stdout, f"{script} --help does not list {option}"
