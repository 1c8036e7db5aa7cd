"""
A process that has imported torch and the package once, then runs each script the
tests ask for in a child forked from it, as `python SCRIPT ARGS...` would: its own
process, argv, environment, working directory, standard streams and exit status, the
interpreter's handling of sys.exit and uncaught exceptions, and the exit handlers run.
Only the ~3 s of importing torch (and the ~2.5 s of torch._dynamo that building an
optimizer costs) are saved (tests/launchers.py, run_python_script).

Protocol, one JSON object a line on stdin: {"script", "args", "env", "cwd", "stdout",
"stderr"} (the last two are files for the child's streams); answered on stdout with
{"pid"} at the fork, then {"returncode"} when the child ends (a signal as -N).
"""

import atexit
import json
import os
import runpy
import sys
import traceback

import numpy  # noqa: F401 (imported once, for every child)
import torch  # noqa: F401
import torch._dynamo  # noqa: F401 (building a torch.optim optimizer imports it: ~2.5 s a training run)

import guided_diffusion.command_line  # noqa: F401


def run_child(request):
    """Become the script's process: never returns."""
    code = 1
    try:
        os.setsid()  # its own group: a timeout kills it with its launcher's children
        os.chdir(request["cwd"])
        for stream, path in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
            descriptor = os.open(path, os.O_RDONLY if stream == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(descriptor, stream)
            os.close(descriptor)
        os.environ.clear()
        os.environ.update(request["env"])
        script = os.path.abspath(request["script"])
        sys.argv = [request["script"], *request["args"]]
        sys.path[0] = os.path.dirname(script)
        code = _run(script)
        atexit._run_exitfuncs()
    except BaseException:  # the child must never return into the server's loop
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _run(script):
    """:return: the exit status `python script` would have."""
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main():
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
