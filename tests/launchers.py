"""
Where the multi-process launchers are, for the subprocess tests.
"""

import os
import shutil
import sys


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
