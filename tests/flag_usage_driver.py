"""
Run a script with its parsed flags tracked, then write which of them it read:

python tests/flag_usage_driver.py SCRIPT REPORT.json [the script's arguments...]

REPORT.json holds "parsed" (every flag the script's parsers returned) and "read" (those
whose attribute the script or the library read from the parsed namespace). Reading
the whole namespace (vars(args), to record the flags in a checkpoint) does not count.
"""

import argparse
import atexit
import json
import runpy
import sys
from pathlib import Path

script, report = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
parsed, read = set(), set()


class TrackedNamespace(argparse.Namespace):
    def __getattribute__(self, name):
        read.add(name)
        return super().__getattribute__(name)


parse_known_args = argparse.ArgumentParser.parse_known_args


def tracked_parse_known_args(parser, args=None, namespace=None):
    result, extras = parse_known_args(parser, args, namespace)
    parsed.update(vars(result))
    return TrackedNamespace(**vars(result)), extras


def write_report():
    Path(report).write_text(json.dumps({"parsed": sorted(parsed), "read": sorted(read & parsed)}))


argparse.ArgumentParser.parse_known_args = tracked_parse_known_args
atexit.register(write_report)
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
