"""README.md runs as written: every code block is run here or is marked as a fragment.

The convention, for whoever adds to README.md:

* Every fenced block names its language; a block without one fails this test.
* ```python blocks are run, each standalone: a fresh namespace (so a block imports what it
  uses), in order, from a sandbox directory that looks like the repository root after the
  README's "Two commands" (PREREQUISITES below). A ``print(...)  # (64, 10)`` line whose
  comment starts with a bracketed value must print a line starting with that value.
* ```sh blocks are shell commands. Every command that starts with ``jcaffe `` or
  ``python -m jcaffe`` (also after ``&&`` and after ``VAR=value`` assignments, with ``\\``
  continuation lines joined) is run, in README order, in the sandbox, with the small counts of
  :func:`tiny` (``--iterations 2`` for training, 2 batches for extract_features); ``2> FILE``
  and ``> FILE`` are honoured. Other commands (pip, venv, pytest, benchmarks) are install
  steps and are not run. A ``jcaffe`` command whose comment says ``not run by the tests:
  needs a GPU`` (or ``GPUs``, or ``several hosts``) is not run; nothing else may be left out,
  except draw_net's images when Graphviz's ``dot`` is not installed (the test says so).
* ```text blocks are fragments: synopses, outputs, code that needs context. Their ``jcaffe
  <command>`` lines must still name real commands and flags their ``--help`` lists.
  ```prototxt blocks must parse as NetParameter text and ```toml blocks as TOML.
* Inline code: ``jcaffe.NAME...`` (and a name ``jcaffe`` exports, e.g. ``Config(...)``) must
  resolve, a call must use keyword arguments its callee accepts, and a ``jcaffe.`` call that
  names nothing but literals is evaluated (``jcaffe.Net("prototxt/lenet.prototxt", ...)``).
  ``python -m jcaffe...`` / ``python -c`` spans without placeholders are run as shell blocks'
  lines are; ``jcaffe <command>`` spans must name a real command and known flags. Other inline
  code is a fragment.
* ``jcaffe <command> --help`` runs for every command.

The examples run in a few processes (one per distinct environment, e.g. the
``JAX_NUM_CPU_DEVICES=4`` line), at the same time, each running its examples one after another
(tests/readme_driver.py). A failure names the README line of the block or span.
"""

import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DRIVER = REPO / "tests" / "readme_driver.py"

RUN_LANGS = {"python", "sh"}
FRAGMENT_LANGS = {"text", "prototxt", "toml"}
NOT_RUN = re.compile(r"not run by the tests: needs (a GPU|GPUs|several hosts)\b")
# Written by the README's "Two commands" (the snapshot; here an initialised LeNet stands in for
# the trained one) or the reader (a folder of digit images for `jcaffe classify`).
PREREQUISITES = ("datasets/mnist/mnist_train", "datasets/mnist/mnist_test",
                 "snapshots/lenet_iter_10000.caffemodel", "digits/")
TIMEOUT_S = 400


# ---------------------------------------------------------------------------------------------
# Reading the README
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    line: int                 # the opening fence's line (1-based)
    lang: str
    lines: list               # [(line number, text)] of the body, indentation removed

    @property
    def text(self) -> str:
        return "".join(t + "\n" for _, t in self.lines)


def readme_blocks(text: str) -> list[Block]:
    blocks, open_block, indent = [], None, ""
    for n, raw in enumerate(text.splitlines(), 1):
        m = re.match(r"^(\s*)```(.*)$", raw)
        if open_block is None:
            if m:
                indent = m.group(1)
                open_block = Block(n, m.group(2).strip(), [])
        elif m and m.group(2).strip() == "":
            blocks.append(open_block)
            open_block = None
        else:
            open_block.lines.append((n, raw[len(indent):] if raw.startswith(indent) else raw))
    assert open_block is None, f"README.md:{open_block.line}: the block is never closed"
    return blocks


def inline_spans(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every inline code span outside fenced blocks (a span may continue on
    the next line of its paragraph)."""
    lines = text.splitlines()
    fenced, inside = set(), False
    for n, raw in enumerate(lines, 1):
        if re.match(r"^\s*```", raw):
            inside = not inside
            fenced.add(n)
        elif inside:
            fenced.add(n)
    out = []
    para, start = [], None
    for n, raw in enumerate(lines + [""], 1):
        if n in fenced or not raw.strip():
            if para:
                joined = "\n".join(para)
                for m in re.finditer(r"`([^`]+)`", joined):
                    out.append((start + joined[:m.start()].count("\n"),
                                " ".join(m.group(1).split())))
            para, start = [], None
            continue
        if start is None:
            start = n
        para.append(raw)
    return out


@dataclasses.dataclass
class Command:
    line: int
    kind: str                # "cli" (jcaffe ...) or "module" (python -m ...)
    argv: list
    module: str = ""
    env: dict = dataclasses.field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""
    not_run: str = ""        # the reason, from the README's comment


def _logical_lines(block: Block):
    """(first line, text) of each command line, ``\\`` continuations joined (and, in ```text
    synopses, indented lines joined to the line above)."""
    pending, first = "", None
    lines = list(block.lines)
    if block.lang == "text":
        joined = []
        for n, raw in lines:
            if joined and raw[:1].isspace() and raw.strip():
                joined[-1] = (joined[-1][0], joined[-1][1].rstrip(" \\") + " " + raw.strip())
            else:
                joined.append((n, raw))
        lines = joined
    for n, raw in lines:
        if first is None:
            first = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield first, pending + raw
        pending, first = "", None


def parse_commands(line: int, text: str) -> list[Command]:
    """The jcaffe commands of one shell line (others, e.g. pip, are skipped)."""
    comment = text.split(" #", 1)[1] if " #" in text else ""
    reason = NOT_RUN.search(comment)
    tokens = shlex.split(text, comments=True)
    parts, cur = [], []
    for tok in tokens:
        if tok in ("&&", ";", "||"):
            parts.append(cur)
            cur = []
        else:
            cur.append(tok)
    parts.append(cur)
    commands = []
    for part in parts:
        env = {}
        while part and re.match(r"^[A-Z_][A-Z0-9_]*=", part[0]):
            k, v = part.pop(0).split("=", 1)
            env[k] = v
        stdout = stderr = ""
        args = []
        it = iter(part)
        for tok in it:
            if tok in (">", "1>"):
                stdout = next(it)
            elif tok == "2>":
                stderr = next(it)
            elif re.match(r"^2>\S", tok):
                stderr = tok[2:]
            elif re.match(r"^1?>\S", tok):
                stdout = tok.split(">", 1)[1]
            else:
                args.append(tok)
        if args[:1] == ["jcaffe"]:
            cmd = Command(line, "cli", args[1:], env=env, stdout=stdout, stderr=stderr)
        elif args[:2] in (["python", "-m"], ["python3", "-m"]) and len(args) > 2 \
                and args[2].split(".")[0] == "jcaffe":
            cmd = Command(line, "module", args[3:], module=args[2], env=env, stdout=stdout,
                          stderr=stderr)
        else:
            continue
        cmd.not_run = reason.group(0) if reason else ""
        commands.append(cmd)
    return commands


def tiny(cmd: Command) -> list:
    """The command's arguments with small counts: 2 training iterations (``--iterations``), 2
    batches for ``extract_features``."""
    argv = list(cmd.argv)
    name = cmd.argv[0] if cmd.kind == "cli" else cmd.module
    # `python -m jcaffe.<module> ...solver.prototxt`: a training run, whatever the module
    trains = cmd.kind == "module" and any(re.search(r"solver[^/]*\.prototxt$", a) for a in argv)
    if name in ("train", "test", "time") or trains:
        argv = [a for i, a in enumerate(argv)
                if not a.startswith(("--iterations", "-iterations"))
                and not (i and argv[i - 1] in ("--iterations", "-iterations"))]
        argv += ["--iterations", "1" if name == "time" else "2"]
    if name == "extract_features":
        positional = [i for i, a in enumerate(argv) if not a.startswith("-")]
        argv[positional[5]] = "2"      # extract_features W NET BLOBS DBS NUM_BATCHES
    return argv


def _has_placeholder(text: str) -> bool:
    return bool(re.search(r"<\w|\.\.\.|\[|\b[A-Z]{2,}[A-Z_]*\b", text))


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------

TEXT = README.read_text()
BLOCKS = readme_blocks(TEXT)
SPANS = inline_spans(TEXT)


def shell_commands() -> list[Command]:
    cmds = []
    for b in BLOCKS:
        if b.lang == "sh":
            for n, line in _logical_lines(b):
                cmds += parse_commands(n, line)
    for n, code in SPANS:
        if re.match(r"^python3? -m jcaffe", code) and not _has_placeholder(code):
            cmds += parse_commands(n, code)
    return cmds


def _dotted_names(node) -> list[tuple[ast.AST, str]]:
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Attribute, ast.Name)):
            parts, cur = [], sub
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                out.append((sub, ".".join([cur.id] + parts[::-1])))
    return out


def _jcaffe_exports() -> set:
    import jcaffe

    return set(jcaffe._LAZY)


def _resolve(dotted: str):
    """The object ``jcaffe.a.b.c`` names, importing modules on the way."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, p in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, p)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i + 1]))
    return obj


def inline_python():
    """``(line, code, tree)`` of the inline spans that are Python naming jcaffe."""
    exports = _jcaffe_exports()
    out = []
    for n, code in SPANS:
        head = re.match(r"^([A-Za-z_]\w*)", code)
        if not head or not (head.group(1) == "jcaffe" and code.startswith("jcaffe.")
                            or head.group(1) in exports and code[len(head.group(1)):][:1] == "("):
            continue
        try:
            tree = ast.parse(code, mode="eval")
        except SyntaxError:
            continue
        out.append((n, code, tree))
    return out


# ---------------------------------------------------------------------------------------------
# The sandbox and the runs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory like the repository root after the README's "Two commands": the
    repository's prototxt/, datasets/ (MNIST prepared) and tests/data/, a LeNet snapshot and
    digit images."""
    import jax
    from PIL import Image

    import jcaffe
    from jcaffe.data import mnist

    root = REPO / "datasets" / "mnist"
    if not (root / "mnist_train").exists() or not (root / "mnist_test").exists():
        mnist.create(str(root), log=lambda *a: None)
    d = tmp_path_factory.mktemp("readme")
    for name in ("prototxt", "datasets"):
        (d / name).symlink_to(REPO / name)
    (d / "tests").mkdir()
    (d / "tests" / "data").symlink_to(REPO / "tests" / "data")
    (d / "snapshots").mkdir()
    net = jcaffe.Net(str(REPO / "prototxt" / "lenet.prototxt"), phase="TEST")
    jcaffe.save_caffemodel(str(d / "snapshots" / "lenet_iter_10000.caffemodel"), net,
                           net.init(jax.random.key(0)))
    images, _ = mnist.read_split(str(root / "t10k-images-idx3-ubyte.gz"),
                                 str(root / "t10k-labels-idx1-ubyte.gz"), limit=3)
    (d / "digits").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[0]).save(d / "digits" / f"{i}.png")
    for p in PREREQUISITES:
        assert (d / p).exists(), p
    return d


def _task_of(cmd: Command, i: int) -> dict:
    task = {"id": i, "line": cmd.line, "kind": cmd.kind, "argv": tiny(cmd), "also": []}
    if cmd.kind == "module":
        task["module"] = cmd.module
    if cmd.stdout:
        task["stdout"] = cmd.stdout
    if cmd.stderr:
        task["stderr"] = cmd.stderr
    return task


@pytest.fixture(scope="module")
def runs(sandbox, tmp_path_factory):
    """Runs every example; ``{(kind, line): result}`` and the README lines left out."""
    work = tmp_path_factory.mktemp("readme_driver")
    groups: dict = {}            # environment -> tasks
    skipped = []
    i = 0
    for b in BLOCKS:
        if b.lang == "python":
            groups.setdefault(("python",), []).append(
                {"id": i, "line": b.line, "kind": "python", "code": b.text})
            i += 1
    for n, code, tree in inline_python():
        names = {name.split(".")[0] for _, name in _dotted_names(tree)}
        if code.startswith("jcaffe.") and isinstance(tree.body, ast.Call) and names == {"jcaffe"}:
            modules = sorted({name.rsplit(".", 1)[0] for _, name in _dotted_names(tree)
                              if name.count(".") > 1 and _is_module(name.rsplit(".", 1)[0])})
            groups.setdefault(("python",), []).append(
                {"id": i, "line": n, "kind": "eval", "code": code, "modules": modules})
            i += 1
    for n, code in SPANS:
        m = re.match(r'^python3? -c (.*)$', code)
        if m:
            groups.setdefault(("python",), []).append(
                {"id": i, "line": n, "kind": "python", "code": shlex.split(m.group(1))[0]})
            i += 1
    dot = shutil.which("dot")
    # A command the README gives twice (e.g. the LeNet run, once more with `2> lenet.log`) runs
    # once, where it first appears, with the redirections of every occurrence.
    sh_tasks = {}
    for cmd in shell_commands():
        if cmd.not_run:
            continue
        key = (cmd.kind, cmd.module, tuple(tiny(cmd)), tuple(sorted(cmd.env.items())))
        if key in sh_tasks:
            first = sh_tasks[key]
            first["also"].append(cmd.line)
            for stream in ("stdout", "stderr"):
                if getattr(cmd, stream):
                    first[stream] = getattr(cmd, stream)
            continue
        if cmd.kind == "cli" and cmd.argv[:1] == ["draw_net"] and not dot and \
                not cmd.argv[2].endswith(".dot"):
            skipped.append(f"README.md:{cmd.line}: jcaffe draw_net to an image needs "
                           f"Graphviz's dot, not installed here")
            continue
        # The shell runs: commands with an environment of their own get a process each.
        sh_tasks[key] = _task_of(cmd, i)
        groups.setdefault(("sh",) + tuple(sorted(cmd.env.items())), []).append(sh_tasks[key])
        i += 1
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS=os.environ.get(
        "JAX_PLATFORMS", "cpu"))
    # The README's examples see the machine as a user's shell does: no test-suite XLA flags.
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()
    # One XLA compilation cache for the examples: the README trains the same LeNet several
    # times (as written, from the v1 prototxt, on four devices). The test run's own cache
    # (tests/conftest.py) when there is one: other tests compiled the same programs.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "xla_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    procs = []
    for k, (group, tasks) in enumerate(groups.items()):
        extra = group[1:]
        spec, result = work / f"tasks{k}.json", work / f"results{k}.json"
        spec.write_text(json.dumps(tasks))
        p = subprocess.Popen([sys.executable, str(DRIVER), str(spec), str(result)],
                             cwd=sandbox, env=dict(env, **dict(extra)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append((p, tasks, result, extra))
    results = {}
    for p, tasks, result, extra in procs:
        try:
            out, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            pytest.fail(f"README examples {[t['line'] for t in tasks]} ({dict(extra)}) ran "
                        f"past {TIMEOUT_S} s:\n{out[-3000:]}")
        assert p.returncode == 0 and result.exists(), \
            f"the README driver failed ({dict(extra)}):\n{out[-3000:]}"
        by_id = {t["id"]: t for t in tasks}
        for r in json.loads(result.read_text()):
            t = by_id[r["id"]]
            results[(t["kind"], t["line"], r["id"])] = dict(r, task=t)
    return {"results": results, "skipped": skipped, "sandbox": sandbox}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _failures(results, kinds) -> list[str]:
    out = []
    for (kind, line, _), r in sorted(results.items(), key=lambda kv: kv[0][1]):
        if kind in kinds and not r["ok"]:
            what = {"python": "```python block", "eval": "inline code",
                    "cli": "command", "module": "command"}[kind]
            argv = r["task"].get("argv")
            also = "".join(f", README.md:{n}" for n in r["task"].get("also", []))
            out.append(f"README.md:{line}{also}: the {what} failed"
                       + (f" ({' '.join(argv)})" if argv else "") + f":\n{r['error']}")
    return out


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

def test_every_block_is_run_or_a_fragment():
    bad = [f"README.md:{b.line}: a code block in ```{b.lang or '(no language)'}: use "
           f"```python (run), ```sh (its jcaffe lines run) or ```text / ```prototxt / ```toml "
           f"(fragments); see tests/test_readme.py"
           for b in BLOCKS if b.lang not in RUN_LANGS | FRAGMENT_LANGS]
    assert not bad, "\n".join(bad)
    assert sum(b.lang == "python" for b in BLOCKS) >= 4
    cmds = shell_commands()
    assert len([c for c in cmds if not c.not_run]) >= 8
    # The lines left out are GPU and multi-host lines, and they say so.
    for c in cmds:
        if c.not_run:
            assert "--gpu" in c.argv or any(a.startswith("--gpu") for a in c.argv) or \
                "--coordinator_address" in c.argv, \
                f"README.md:{c.line}: marked as not run but needs no GPU and no other host"
        else:
            assert not any(a.startswith("--gpu") for a in c.argv) and \
                "--coordinator_address" not in c.argv, \
                f"README.md:{c.line}: needs a GPU or other hosts: add `# not run by the tests: " \
                f"needs a GPU` (or `needs several hosts`) to its comment"


def test_python_blocks_run(runs):
    failures = _failures(runs["results"], {"python"})
    assert not failures, "\n\n".join(failures)
    # A print whose comment starts with a bracketed value prints that value (checked when the
    # block prints one line per print call).
    checked = 0
    for (kind, line, _), r in runs["results"].items():
        block = next((b for b in BLOCKS if b.line == line and b.lang == "python"), None)
        if kind != "python" or block is None:
            continue
        prints = [t for _, t in block.lines if t.startswith("print(")]
        printed = r["stdout"].splitlines()
        if len(printed) != len(prints):
            continue
        for t, out in zip(prints, printed):
            m = re.match(r"^(\(.*?\)|\[.*?\])", t.split("#", 1)[1].strip()) if "#" in t else None
            if m:
                assert out.startswith(m.group(1)), \
                    f"README.md:{line}: `{t.strip()}` printed {out!r}, not {m.group(1)}"
                checked += 1
    assert checked >= 2


def test_shell_commands_run(runs):
    failures = _failures(runs["results"], {"cli", "module"})
    assert not failures, "\n\n".join(failures)
    ran = [r["task"] for (k, _, _), r in runs["results"].items() if k in ("cli", "module")]
    assert any(t.get("module") == "jcaffe.train" for t in ran)
    for line in runs["skipped"]:
        print(line)   # shown with -s / -rA: what this machine could not run


def test_inline_code(runs):
    failures = _failures(runs["results"], {"eval"})
    exports = _jcaffe_exports()
    for n, code, tree in inline_python():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            names = [name for sub, name in _dotted_names(node.func) if sub is node.func]
            if not names:
                continue
            name = names[0]
            if name.split(".")[0] != "jcaffe":
                if name not in exports:
                    continue
                name = "jcaffe." + name
            try:
                fn = _resolve(name)
            except (AttributeError, ImportError) as e:
                failures.append(f"README.md:{n}: `{code}`: {name} does not exist ({e})")
                continue
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                continue
            takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
            for kw in node.keywords:
                if kw.arg and not takes_any and kw.arg not in sig.parameters:
                    failures.append(f"README.md:{n}: `{code}`: {name}() has no keyword "
                                    f"argument {kw.arg!r}")
        for sub, name in _dotted_names(tree):
            if name.startswith("jcaffe.") and not any(
                    isinstance(p, ast.Attribute) and p.value is sub for p in ast.walk(tree)):
                try:
                    _resolve(name)
                except (AttributeError, ImportError) as e:
                    failures.append(f"README.md:{n}: `{code}`: {name} does not exist ({e})")
    assert not failures, "\n\n".join(failures)
    assert any(r["task"]["code"].startswith("jcaffe.Net(") for (k, _, _), r in
               runs["results"].items() if k == "eval"), "the Config example is not evaluated"


def _help(kind: str, name: str) -> str:
    from jcaffe import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        if kind == "cli":
            rc = cli.main([name, "--help"])
        else:
            try:
                rc = importlib.import_module(name).main(["--help"])
            except SystemExit as e:
                rc = e.code or 0
    assert rc == 0, f"{name} --help exited with {rc}"
    return out.getvalue()


def test_command_help_and_documented_flags():
    from jcaffe import cli

    cli._load_commands()
    helps = {}
    for name in sorted(cli.COMMANDS):
        helps[("cli", name)] = _help("cli", name)
        assert helps[("cli", name)].strip(), f"jcaffe {name} --help printed nothing"
    failures = []
    # Every jcaffe line of a block (run or fragment) and every `jcaffe <command>` span names a
    # command that exists, with flags its --help lists.
    lines = [(n, t) for b in BLOCKS if b.lang in ("sh", "text") for n, t in _logical_lines(b)]
    lines += [(n, c) for n, c in SPANS if re.match(r"^(jcaffe [a-z]|python3? -m jcaffe)", c)]
    for n, text in lines:
        m = re.match(r"^(?:[A-Z_]+=\S+ )*(jcaffe ([\w*]+)|python3? -m (jcaffe[\w.]*))(.*)$",
                     text.strip())
        if not m:
            continue
        if m.group(2):
            name, key = m.group(2), ("cli", m.group(2))
            if name == "help" or "*" in name:      # `jcaffe upgrade_*`: a family of commands
                continue
            if name not in cli.COMMANDS:
                failures.append(f"README.md:{n}: `jcaffe {name}` is not a jcaffe command")
                continue
        else:
            key = ("module", m.group(3))
            if key not in helps:
                helps[key] = _help("module", m.group(3))
        rest = m.group(4).split(" #")[0]
        for flag in re.findall(r"(?<![\w-])--?([a-z][\w]*)", rest):
            if f"--{flag}" not in helps[key]:
                failures.append(f"README.md:{n}: {' '.join(key[1:])} has no flag --{flag} "
                                f"(its --help does not list it)")
    assert not failures, "\n".join(failures)


def test_fragments_parse():
    from google.protobuf import text_format

    from jcaffe.proto import caffe_pb2

    failures = []
    for b in BLOCKS:
        try:
            if b.lang == "prototxt":
                text_format.Parse(b.text, caffe_pb2.NetParameter())
            elif b.lang == "toml":
                tomllib.loads(b.text)
        except Exception as e:  # noqa: BLE001 - reported with the block's line
            failures.append(f"README.md:{b.line}: the ```{b.lang} block does not parse: {e}")
    assert not failures, "\n".join(failures)
