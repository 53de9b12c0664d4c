"""Every notebook in notebooks/ runs to the end, in quick mode, without Jupyter; the committed ones
carry the outputs of one full run (their figures are in the README).

The code cells run in order in one namespace in a fresh Python process, with
``STN_NOTEBOOK_QUICK=1`` (small subsets, few steps), matplotlib's Agg backend, and
``TRITON_INTERPRET`` removed: on a CPU the notebooks run the plain PyTorch backend (the interpreter
would take hours over a training loop), on a GPU the compiled kernels.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

# What a notebook must print, beyond running without error.
EXPECTED_OUTPUT = {
    "stn_distorted_mnist.ipynb": [
        r"test error, plain CNN: \d+\.\d+%",
        r"test error, CNN \+ spatial transformer: \d+\.\d+%",
    ],
    "deformable_conv.ipynb": [
        r"test error, plain CNN: \d+\.\d+%",
        r"test error, CNN \+ deformable conv: \d+\.\d+%",
    ],
    "deformable_detr.ipynb": [
        r"attention calls routed to stn_triton: 2 ",
        r"parameter gradients, max \|swap on - off\|: \d\.\d\de-1\d",
        r"kept for the backward beyond the inputs: composition \d+\.\d MiB, fused 0\.0 MiB",
    ],
}

# Packages the notebooks import beyond the library's own dependencies.
NOTEBOOK_PACKAGES = ("matplotlib", "mlxtend", "pandas", "transformers")

# Runs the code cells of the notebook at argv[1] in order, in one namespace; a line starting with
# % or ! (IPython magic or shell) is skipped. A traceback names the cell that failed.
RUNNER = r"""
import json, sys
path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    notebook = json.load(f)
namespace = {"__name__": "__main__"}
for index, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] != "code":
        continue
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    exec(compile("\n".join(lines), f"{path} cell {index}", "exec"), namespace)
"""


def test_notebooks_are_valid_and_ran_fully():
    """Each notebook is nbformat 4 JSON; its stored outputs, if any, are those of one full run (not quick
    mode), top to bottom, without errors, and small enough to commit."""
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        assert notebook["nbformat"] == 4, f"{path.name}: nbformat {notebook['nbformat']}, expected 4"
        cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        if all(cell["outputs"] == [] and cell["execution_count"] is None for cell in cells):
            continue  # cleared
        counts = [cell["execution_count"] for cell in cells]
        assert counts == list(range(1, len(cells) + 1)), f"{path.name}: not one run top to bottom: {counts}"
        outputs = [output for cell in cells for output in cell["outputs"]]
        assert not [o for o in outputs if o["output_type"] == "error"], f"{path.name}: stored an error"
        text = "".join("".join(o["text"]) for o in outputs if o["output_type"] == "stream")
        assert "quick mode: True" not in text, f"{path.name}: outputs of a quick-mode run"
        assert path.stat().st_size < 1_000_000, f"{path.name}: {path.stat().st_size:,} bytes of outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path):
    missing = [name for name in NOTEBOOK_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the notebooks need {', '.join(missing)} (pip install {' '.join(missing)})")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"STN_NOTEBOOK_QUICK": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path)],
        cwd=path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    for pattern in EXPECTED_OUTPUT.get(path.name, []):
        assert re.search(pattern, result.stdout), f"{path.name} did not print /{pattern}/:\n{result.stdout[-3000:]}"
