"""Packaging: the component folders install inside the baton_paged namespace, and only there."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_components_import_from_any_folder(tmp_path):
    code = (
        "import baton_paged.allocator, baton_paged.attention, baton_paged.plugins;"
        "import importlib.util as u;"
        "print([u.find_spec(n) for n in ('allocator', 'attention', 'plugins')])"
    )
    assert run_python(code, tmp_path) == "[None, None, None]"


def test_importing_the_package_does_not_load_torch(tmp_path):
    code = "import sys, baton_paged, baton_paged.cli; print('torch' in sys.modules)"
    assert run_python(code, tmp_path) == "False"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    marker = "<!-- test-command -->"
    assert marker in readme, "README.md must mark its test command"
    command = readme.split(marker, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert command and command in ci
