"""The package's layers (README, "Layout"): a module imports only from its own layer or lower ones,
and every import sits at the top of its module except those of optional extras."""

import ast
from pathlib import Path

import ctrlnet

ROOT = Path(ctrlnet.__file__).parent
# longest matching prefix wins; the README's table
LAYERS = {
    "ctrlnet.version": 0, "ctrlnet.images": 0, "ctrlnet.allocator": 0, "ctrlnet.prepack": 0, "ctrlnet.names": 0,
    "ctrlnet.testbed": 0, "ctrlnet.testbed.shapes": 0, "ctrlnet.testbed.figure": 0,
    "ctrlnet.models": 1,
    "ctrlnet.configs": 2, "ctrlnet.formats": 2,
    "ctrlnet.base": 3, "ctrlnet.testbed.tiny": 3, "ctrlnet.testbed.nano": 3, "ctrlnet.testbed.bundle": 3,
    "ctrlnet.annotators": 4,
    "ctrlnet.eval": 5, "ctrlnet.eval.control": 5, "ctrlnet.eval.shapes": 5,
    "ctrlnet.pipeline": 6,
    "ctrlnet.training": 7,
    "ctrlnet.eval.report": 8, "ctrlnet.serve": 8, "ctrlnet.demo": 8, "ctrlnet.cli": 8, "ctrlnet": 8,
}
# imported inside functions on purpose: optional extras (and the stdlib's tomllib, absent on 3.10)
OPTIONAL = {"fastapi", "uvicorn", "mediapipe", "datasets", "tomllib", "torch.utils.tensorboard", "onnx", "onnxruntime",
            "openvino",  # the openvino extra (ctrlnet.pipeline.openvino imports it on first use)
            # ctrlnet.serve's HTTP side and schemas need the serve extra (fastapi, pydantic)
            "ctrlnet.serve.app", "ctrlnet.serve.server"}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module}: not in the layer table (tests/test_layout.py, README 'Layout')")


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path, path.name == "__init__.py"


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        return [node.module]
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    target = ".".join(base + ([node.module] if node.module else []))
    # `from . import x` may name submodules
    return [target] if node.module else [f"{target}.{a.name}" for a in node.names]


def test_imports_follow_the_layers():
    wrong = []
    for name, path, is_package in modules():
        own = layer(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, name, is_package):
                    if target.startswith("ctrlnet") and not target.startswith(name + ".") and layer(target) > own:
                        wrong.append(f"{name} (layer {own}) imports {target} (layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_imports_inside_functions_are_optional_extras_only():
    wrong = []
    for name, path, is_package in modules():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for target in imported(node, name, is_package):
                        if not any(target == o or target.startswith(o + ".") for o in OPTIONAL):
                            wrong.append(f"{name}.{fn.name}: imports {target} inside the function")
    assert not wrong, "\n".join(wrong)
