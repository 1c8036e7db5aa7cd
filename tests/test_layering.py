"""
The layering of guided_diffusion (docs/code_map.md): imports point one way,
command line -> jobs -> runtime and I/O -> core, with no cycles; argparse only in the
command-line layer; the package imports neither evaluations/ nor the examples; no
module imports another's private name; no source file over 700 lines.
"""

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "guided_diffusion"
MAX_LINES = 700

LAYERS = {
    "core": ["nn", "losses", "attention", "unet", "diffusion_types", "gaussian_diffusion", "diffusion_sampling",
             "solver_schedule", "denoiser", "solvers", "consistency", "editing",
             "respace", "resample", "guidance", "clustering"],
    "runtime": ["dist_util", "download", "logger", "fp16_util", "acceleration", "file_writing", "image_grid",
                "image_datasets", "checkpoint", "training_state", "work_split", "sampling_state",
                "tracking", "diffusers_export", "run_lock", "labels_file"],
    "jobs": ["train_util", "classifier_train_util", "consistency_train_util", "sampling", "sampling_labels", "bpd",
             "edit_sampling"],
    "command_line": ["script_util", "flag_checks", "presets", "command_line", "adm"],
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def package_imports(path):
    """The top-level names a module imports: package modules as their name, others as
    their first dotted part ("torch", "evaluations")."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = node.module.split(".")
                if parts[0] == "guided_diffusion" and len(parts) > 1:
                    names.add(parts[1])
                elif parts[0] == "guided_diffusion":
                    names.update(alias.name for alias in node.names)
                else:
                    names.add(parts[0])
            elif node.module:
                names.add(node.module.split(".")[0])
            else:  # from . import a, b
                names.update(alias.name for alias in node.names)
    return names


def modules():
    return sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


@functools.cache  # parsed once, not once per parametrized test
def internal_graph():
    own = set(modules())
    return {name: package_imports(PACKAGE / f"{name}.py") & own for name in own}


def test_every_module_has_a_layer():
    assert sorted(RANK) == modules()


@pytest.mark.parametrize("module", modules())
def test_imports_point_down_the_layers(module):
    upward = [name for name in internal_graph()[module] if RANK[name] > RANK[module]]
    assert not upward, f"{module} ({_layer(module)}) imports {upward} from a layer above"


def _layer(module):
    return next(layer for layer, names in LAYERS.items() if module in names)


def test_no_import_cycle_inside_the_package():
    graph = internal_graph()
    state = {}

    def visit(module, path):
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                pytest.fail("import cycle: " + " -> ".join(path + [module, name]))
            if name not in state:
                visit(name, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_argparse_only_in_the_command_line_layer():
    users = [name for name in modules() if "argparse" in package_imports(PACKAGE / f"{name}.py")]
    assert sorted(users) and set(users) <= set(LAYERS["command_line"])


def test_presets_read_json_and_import_nothing_from_the_package():
    assert not package_imports(PACKAGE / "presets.py") & set(modules())


def test_the_package_imports_neither_evaluations_nor_the_examples():
    for name in modules():
        imported = package_imports(PACKAGE / f"{name}.py")
        assert not imported & {"evaluations", "examples"}, name
    assert not list(PACKAGE.glob("quickstart*.py"))


def test_no_source_file_is_too_long():
    sources = [*PACKAGE.glob("*.py"), *(REPO / "evaluations").glob("*.py"),
               *(REPO / "scripts").glob("*.py"), *(REPO / "examples").rglob("*.py")]
    long = {str(path.relative_to(REPO)): n for path in sources
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def private_names_imported(path):
    """The `_names` a file imports from this project's modules (from .x / guided_diffusion.x
    / examples.x import _name)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            own = node.level > 0 or (node.module or "").split(".")[0] in ("guided_diffusion", "examples")
            found += [f"{node.module}.{alias.name}" for alias in node.names
                      if own and alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_name():
    files = [*PACKAGE.glob("*.py"), *(REPO / "scripts").glob("*.py"), *(REPO / "examples").rglob("*.py")]
    offenders = {str(path.relative_to(REPO)): names for path in files
                 if (names := private_names_imported(path))}
    assert not offenders
