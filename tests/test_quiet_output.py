"""Quiet output: using tinker prints nothing the user did not ask for. Without torch, loading a
tokenizer must not print transformers' "PyTorch was not found" notice; in a Jupyter kernel without
ipywidgets, it must not print tqdm's "IProgress not found" warning. Each runs in a fresh
interpreter (the notices come once, at transformers' first import), beside a control run that
shows the notice does appear there without tinker's care."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tinker._models import DEFAULT_MODEL

# torch made unimportable: importlib.util.find_spec("torch") (what transformers asks) is None
NO_TORCH = "import sys\nsys.modules['torch'] = None\n"

# a Jupyter kernel as tqdm detects one (ipykernel's shell module loaded), with ipywidgets missing
JUPYTER_WITHOUT_WIDGETS = """\
import sys, types
sys.modules['ipywidgets'] = None
sys.modules['ipykernel.zmqshell'] = types.ModuleType('ipykernel.zmqshell')
from IPython.core.interactiveshell import InteractiveShell
InteractiveShell.instance()
"""

USE_TINKER = f"""\
import warnings
warnings.simplefilter('always')  # a notebook shows each warning; so does this run
import tinker
sampler = tinker.ServiceClient().create_sampling_client(base_model={DEFAULT_MODEL!r}).result()
tokens = sampler.get_tokenizer().encode('hello world', add_special_tokens=False)
assert tokens, tokens
print('tokens', tokens)
"""

IMPORT_TRANSFORMERS = "import warnings\nwarnings.simplefilter('always')\nimport transformers\n"


def _run(script: str) -> str:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_no_pytorch_notice_without_torch():
    assert "PyTorch was not found" in _run(NO_TORCH + IMPORT_TRANSFORMERS)  # the control
    out = _run(NO_TORCH + USE_TINKER + "import transformers.utils\n"
               "assert not transformers.utils.is_torch_available()\n")
    assert "tokens [" in out
    assert "PyTorch was not found" not in out, out


def test_no_iprogress_warning_in_jupyter_without_ipywidgets():
    pytest.importorskip("IPython")
    assert "IProgress not found" in _run(JUPYTER_WITHOUT_WIDGETS + IMPORT_TRANSFORMERS)  # the control
    out = _run(JUPYTER_WITHOUT_WIDGETS + USE_TINKER)
    assert "tokens [" in out
    assert "IProgress not found" not in out, out


def test_import_prints_nothing():
    assert _run("import tinker\n") == ""
