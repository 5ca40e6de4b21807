"""The README's two opening commands are what .ci/run runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_commands():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)[:2]
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert "python train.py --dataset demo" in blocks[0] and "pytest" in blocks[1]
    for block in blocks:
        for line in block.strip().splitlines():
            assert line in ci, f"README command not in .ci/run: {line}"
