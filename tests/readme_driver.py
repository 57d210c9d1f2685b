"""Runs README examples in one process, for tests/test_readme.py.

    python tests/readme_driver.py TASKS.json RESULTS.json

Run from the sandbox directory (the README's working directory) with the repository on
PYTHONPATH. Each task is one README example; the results say, per task, whether it ran, its
stdout and the tail of its error. Tasks run one after another in this process, so JAX and
jcaffe are imported once; each Python example gets a fresh namespace, and jcaffe's log
handlers are reset between tasks (a task's ``2> FILE`` gets its own log stream).
"""

import contextlib
import importlib
import io
import json
import logging
import runpy
import sys
import time
import traceback


def _reset_logging():
    logger = logging.getLogger("jcaffe")
    for h in list(logger.handlers):
        logger.removeHandler(h)


def _exec_python(code: str, line: int):
    # Blank lines first, so that tracebacks name README.md's own line numbers.
    exec(compile("\n" * line + code, "README.md", "exec"), {"__name__": "__readme__"})
    return 0


def _eval_inline(code: str, modules):
    import jcaffe  # noqa: F401

    for m in modules:
        importlib.import_module(m)
    eval(compile(code, "README.md", "eval"), {"jcaffe": sys.modules["jcaffe"]})
    return 0


def _run_cli(argv):
    from jcaffe.cli import main

    return main(list(argv))


def _run_module(name, argv):
    mod = importlib.import_module(name)
    if hasattr(mod, "main"):
        try:
            return mod.main(list(argv))
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    old = sys.argv
    sys.argv = [name, *argv]
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0


def run_task(task: dict) -> dict:
    out, err = io.StringIO(), io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    result = {"id": task["id"], "ok": False, "error": "", "stdout": ""}
    try:
        with contextlib.ExitStack() as stack:
            stdout = err_stream = None
            if task.get("stdout"):
                stdout = stack.enter_context(open(task["stdout"], "w"))
            if task.get("stderr"):
                err_stream = stack.enter_context(open(task["stderr"], "w"))
            stack.enter_context(contextlib.redirect_stdout(stdout or out))
            stack.enter_context(contextlib.redirect_stderr(err_stream or err))
            _reset_logging()
            kind = task["kind"]
            if kind == "python":
                rc = _exec_python(task["code"], task["line"])
            elif kind == "eval":
                rc = _eval_inline(task["code"], task.get("modules", []))
            elif kind == "cli":
                rc = _run_cli(task["argv"])
            elif kind == "module":
                rc = _run_module(task["module"], task["argv"])
            else:
                raise ValueError(f"unknown task kind {kind!r}")
            _reset_logging()
        result["ok"] = rc in (0, None)
        if not result["ok"]:
            result["error"] = f"exit status {rc}"
    except BaseException as e:  # noqa: BLE001 - reported to the test
        _reset_logging()
        result["error"] = "".join(traceback.format_exception(e))[-3000:]
    result["stdout"] = out.getvalue()
    text = err.getvalue()
    if task.get("stderr"):
        with open(task["stderr"]) as f:
            text = f.read()
    if not result["ok"]:
        result["error"] = (result["error"] + "\nstderr (last lines):\n"
                           + "\n".join(text.splitlines()[-15:]))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["cpu_seconds"] = round(time.process_time() - c0, 2)
    return result


def main(argv):
    tasks_path, results_path = argv
    with open(tasks_path) as f:
        tasks = json.load(f)
    results = [run_task(t) for t in tasks]
    with open(results_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
