"""Every notebook in notebooks/ runs top to bottom (nbclient, CPU)."""

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# what each notebook must print (its cells assert their own results too)
EXPECTED = {"quickstart.ipynb": ["| dense |", "score: 1.0"],
            "kernels.ipynb": ["| flash_attention |", "| block_sparse_attention |", "| exact_vertical_slash_attention |",
                              "| quantized_decode_attention |"]}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  # the kernel must be this interpreter (the venv's), whatever PATH the caller has
  os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert path.name in EXPECTED, f"add {path.name}'s expected output to EXPECTED"
  for want in EXPECTED[path.name]:
    assert want in text, want
