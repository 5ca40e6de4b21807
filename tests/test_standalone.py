"""The adapter, loss, metrics and CLIP-architecture files stand alone: each, copied
by itself into an empty folder, imports with torch and the standard library only, and works.

The probe runs in a fresh interpreter (-I: no PYTHONPATH, no user site) whose only project path
is that folder, with the installed `mrs_adapter` package blocked, so that an absolute import of
the package fails as a relative one does. It also lists every top-level module the file pulled
in beyond `import torch` and the standard library: that list must be empty.
Negative controls: clip.py (which imports .model, .download, torchvision) fails alone; a file
importing the package absolutely fails; a file importing pillow is caught by the list.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mrs_adapter")

# One interpreter for every case (importing torch once is most of the cost). Each case: its own
# folder first on sys.path, then removed; the cases that must fail run after those that must not.
PROBE = r"""
import importlib, json, sys, traceback
sys.modules["mrs_adapter"] = None  # the installed package: any import of it raises ImportError
import torch, torch.nn.functional
results = {}
for folder, name, check in json.loads(sys.argv[1]):
    sys.path.insert(0, folder)
    before = {loaded.partition(".")[0] for loaded in sys.modules}
    error, extra = None, []
    try:
        module = importlib.import_module(name)
        # what the import itself loaded (running torch code below loads torch's lazy extras)
        after = {loaded.partition(".")[0] for loaded in sys.modules}
        extra = sorted(n for n in after - before if n not in sys.stdlib_module_names and n != name)
        exec(check, {"m": module, "torch": torch})
    except Exception:
        error = traceback.format_exc().strip().splitlines()[-1]
    results[name] = {"error": error, "extra": extra}
    sys.path.remove(folder)
print(json.dumps(results))
"""

MODEL_CHECK = """
cfg = dict(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
           context_length=8, vocab_size=50, transformer_width=64, transformer_heads=1,
           transformer_layers=1)
torch.manual_seed(0)
clip = m.CLIP(**cfg).eval()
rebuilt = m.build_model(clip.state_dict())  # sizes read off the tensors
image = torch.randn(2, 3, 16, 16)
text = torch.tensor([[1, 7, 49, 0, 0], [1, 3, 9, 49, 0]])  # end-of-text: the largest id
assert torch.equal(rebuilt.encode_image(image), clip.encode_image(image))
assert torch.equal(rebuilt.encode_text(text), clip.encode_text(text))
assert rebuilt.encode_text(text).shape == (2, 16)
assert isinstance(rebuilt.transformer.resblocks[0].mlp.gelu, m.QuickGELU)
"""

# A host written here from plain torch: the adapter file needs no CLIP of ours.
ADAPTER_CHECK = """
from torch import nn
class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
    def forward(self, x):
        return self.proj(x)
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)
class Tower(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.width, self.resblocks = d, nn.Sequential(Block(d), Block(d))
host, host.visual = nn.Module(), nn.Module()
host.transformer, host.visual.transformer = Tower(96), Tower(128)
m.add_adapters(host, verbose=False)
trainable = sum(p.numel() for p in host.parameters() if p.requires_grad)
assert trainable == sum(p.numel() for p in m.MRSAdapter(96, 128).parameters())
block = host.transformer.resblocks[1].eval()
assert isinstance(block, m.AdaptedBlock)
assert block.adapter is host.visual.transformer.resblocks[0].adapter  # one adapter, both towers
with torch.no_grad():
    block.adapter.shared_up.bias.fill_(1.0)  # a non-zero adapter, so its term shows
x, b = torch.randn(2, 5, 96), block.block
h = x + b.attn(b.ln_1(x))  # the paper's two residual equations, by hand
expected = h + b.mlp(b.ln_2(h)) + block.adapter(h, "text")
assert torch.equal(block(x), expected)
"""

LOSS_CHECK = """
v = torch.eye(3)
t = v.roll(1, dims=0)  # S(v_i, t_i) = 0 and one wrong pair at 1 per row and per column
assert float(m.max_violation_hinge(v, v)) == 0.0
assert abs(float(m.hmmc_loss(v, t, v, t)) - 6 * 1.2) < 1e-6  # 3 rows + 3 columns of 0.2 - 0 + 1
"""

METRICS_CHECK = """
assert m.recall_at_k(torch.eye(3), torch.arange(3))["mR"] == 100.0
assert m.recall_at_k(torch.zeros(3, 3), torch.arange(3))["i2t_r1"] == 0.0  # ties count against
"""

CHECKS = {"model": MODEL_CHECK, "adapter": ADAPTER_CHECK, "loss": LOSS_CHECK,
          "metrics": METRICS_CHECK}


def copy_alone(root, name: str) -> str:
    folder = root / name
    folder.mkdir()
    shutil.copy(os.path.join(PACKAGE, name + ".py"), folder)
    return str(folder)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """{case: {"error": last traceback line or None, "extra": modules beyond torch + stdlib}}."""
    root = tmp_path_factory.mktemp("standalone")
    cases = [(copy_alone(root, name), name, check) for name, check in CHECKS.items()]
    controls = root / "controls"
    controls.mkdir()
    (controls / "absolute.py").write_text("from mrs_adapter.loss import info_nce\n")
    (controls / "pillow.py").write_text("import PIL.Image\n")
    # pillow before clip, whose torchvision import would load PIL first
    cases += [(str(controls), "pillow", ""), (str(controls), "absolute", ""),
              (copy_alone(root, "clip"), "clip", "")]
    result = subprocess.run([sys.executable, "-I", "-c", PROBE, json.dumps(cases)], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_file_imports_and_works_copied_alone(probed, name):
    assert probed[name]["error"] is None
    assert probed[name]["extra"] == []  # nothing beyond torch and the standard library


def test_probe_catches_package_imports_and_other_dependencies(probed):
    assert probed["clip"]["error"].startswith("ImportError: attempted relative import")
    assert probed["absolute"]["error"].startswith("ModuleNotFoundError: No module named "
                                                  "'mrs_adapter.loss'")
    assert probed["pillow"] == {"error": None, "extra": ["PIL"]}
