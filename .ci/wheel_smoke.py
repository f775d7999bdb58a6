"""Smoke check of a plain (non-editable) install: run from a neutral folder with
PYTHONPATH = the folder the wheel was installed into (argv[1]).

Checks that fastnig and its compiled extension come from that folder (not from
a checkout), that the kernel runs, and that importlib.resources finds the
package data a user's `fastnig demo` needs.
"""
import sys
from importlib import resources
from pathlib import Path

target = Path(sys.argv[1]).resolve()
# The venv may also hold an editable install of the checkout (what `make install` does): its import
# hook sits in front of PYTHONPATH, so take it out to import the wheel's copy.
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]

import fastnig  # noqa: E402
import fastnig.engine._C  # noqa: E402,F401
import torch  # noqa: E402
from fastnig.engine.kernels import accumulate_conductance, accumulate_conductance_ref, cpu_kernel_isa

for module in (fastnig, fastnig.engine._C):
    where = Path(module.__file__).resolve()
    assert target in where.parents, f"{module.__name__} was imported from {where}, not from {target}"
package = resources.files("fastnig")
for name in ("data/collections/cran.tar.gz", "data/collections/med.tar.gz", "data/collections/checksums.json",
             "study/configs/demo.yaml", "study/configs/paper.yaml", "report/reference/paper.json",
             "report/explorer_assets/explorer.html", "report/explorer_assets/explorer.js",
             "report/explorer_assets/explorer.css"):
    assert package.joinpath(name).is_file(), f"{name} is missing from the wheel"
from fastnig.data.packaged import packaged_archive

packaged_archive("cranfield"), packaged_archive("med")  # sha256 against checksums.json

torch.manual_seed(0)
a, g = torch.randn(2, 5, 7, 16), torch.randn(2, 5, 7, 16)
lengths = torch.tensor([7, 4])
out, ref = torch.zeros(2, 16), torch.zeros(2, 16)
accumulate_conductance(a, g, lengths, out)  # the compiled op
accumulate_conductance_ref(a, g, lengths, ref)
torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
print(f"wheel OK: fastnig and fastnig.engine._C from {target}, CPU kernel {cpu_kernel_isa()}, package data found")
