"""
For the subprocess tests: where the multi-process launchers are, and a quick way to
run a script as its own process (run_python_script).
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile


def find_mpiexec():
    """
    The mpiexec of this Python's environment (the mpich wheel installs it next to the
    interpreter, which need not be on PATH, e.g. under pyenv), else the one on PATH,
    else None.
    """
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside_python, os.X_OK):
        return beside_python
    return shutil.which("mpiexec")


class _Zygote:
    """This test process's tests/script_zygote.py server, started on first use."""

    process = None

    @classmethod
    def get(cls):
        if cls.process is None or cls.process.poll() is not None:
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
            cls.process = subprocess.Popen(
                [sys.executable, os.path.join(repo, "tests", "script_zygote.py")], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
        return cls.process


def run_python_script(script, args, env, cwd, timeout):
    """
    Run `python SCRIPT ARGS...` in a child of the script zygote (torch imported once; the
    rest as a fresh interpreter: see tests/script_zygote.py).

    :return: a subprocess.CompletedProcess with text stdout and stderr.
    :raises subprocess.TimeoutExpired: after timeout seconds (the child's group killed).
    """
    zygote = _Zygote.get()
    with tempfile.TemporaryDirectory() as folder:
        streams = {name: os.path.join(folder, name) for name in ("stdout", "stderr")}
        request = dict(script=str(script), args=[str(arg) for arg in args], env=dict(env),
                       cwd=str(cwd), **streams)
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        pid = json.loads(zygote.stdout.readline())["pid"]
        ready, _, _ = select.select([zygote.stdout], [], [], timeout)
        if not ready:
            os.killpg(pid, signal.SIGKILL)
        returncode = json.loads(zygote.stdout.readline())["returncode"]
        output = {name: open(path, errors="replace").read() for name, path in streams.items()}
    command = [sys.executable, str(script), *map(str, args)]
    if not ready:
        raise subprocess.TimeoutExpired(command, timeout, output["stdout"], output["stderr"])
    return subprocess.CompletedProcess(command, returncode, output["stdout"], output["stderr"])


def run_command(command, env, cwd, timeout):
    """
    subprocess.run(command, capture_output=True, text=True), through run_python_script
    when the command is `python SCRIPT.py ARGS...`.
    """
    command = [str(part) for part in command]
    if len(command) > 1 and command[0] == sys.executable and command[1].endswith(".py"):
        return run_python_script(command[1], command[2:], env, cwd, timeout)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
