"""The OpenVINO backend is optional: importing ctrlnet never imports openvino, and without the
package the backend fails with the command that installs it (these run with or without it)."""

import subprocess
import sys

import pytest

from ctrlnet.cli import build_parser
from ctrlnet.pipeline import Pipeline
from ctrlnet.pipeline.openvino import MissingExtra


def test_importing_ctrlnet_does_not_import_openvino():
    code = ("import sys, ctrlnet, ctrlnet.cli, ctrlnet.pipeline, ctrlnet.serve.server; "
            "assert 'openvino' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_the_package_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the extra were not installed
    with pytest.raises(MissingExtra, match=r"needs the openvino package: pip install 'ctrlnet\[openvino\]'"):
        Pipeline.from_pretrained("nano", backend="openvino")
    with pytest.raises(ValueError):  # the CLI prints it as one line, as every other bad-input error
        Pipeline.from_pretrained("nano", backend="openvino")


def test_every_command_takes_the_backend():
    for command in (["serve"], ["eval", "--control", "model=m", "--data", "d", "--out", "o"],
                    ["generate", "--prompt", "x"]):
        assert build_parser().parse_args([*command, "--backend", "openvino"]).backend == "openvino"
        assert build_parser().parse_args(command).backend == "torch"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--backend", "onnx"])
