"""Packaging: the README's two opening commands are what .ci/run runs; the package installs
whole."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_commands():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)[:2]
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert "python train.py --dataset demo" in blocks[0] and "pytest" in blocks[1]
    for block in blocks:
        for line in block.strip().splitlines():
            assert line in ci, f"README command not in .ci/run: {line}"


def test_package_and_its_merges_file_are_installed_not_only_in_the_checkout(tmp_path):
    """Run from another folder, so the import can only come from the installed package."""
    code = ("import mrs_adapter.methods, mrs_adapter.tokenizer as t; "
            "assert t.tokenize('a')[0, 1] == 320")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert "bpe_simple_vocab_16e6.txt.gz" in setup
