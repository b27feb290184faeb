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
    code = "import sys, baton_paged, baton_paged.entrypoints.cli; print('torch' in sys.modules)"
    assert run_python(code, tmp_path) == "False"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    marker = "<!-- test-command -->"
    assert marker in readme, "README.md must mark its test command"
    command = readme.split(marker, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert command and command in ci


def test_public_api_loads_on_first_use(tmp_path):
    code = (
        "import sys, baton_paged; before = 'torch' in sys.modules;"
        "from baton_paged import LLM, SamplingParams, EngineConfig;"
        "print(before, LLM.__module__, SamplingParams.__module__, EngineConfig.__module__)"
    )
    expected = "False baton_paged.entrypoints.llm baton_paged.sampling_params baton_paged.config"
    assert run_python(code, tmp_path) == expected


def test_every_python_folder_is_a_declared_package():
    """A folder missing from setup.cfg works in an editable install and vanishes from a wheel."""
    config = (REPO / "setup.cfg").read_text().split("packages =", 1)[1].split("package_dir", 1)[0]
    declared = set(config.split())
    roots = {"baton_paged": REPO / "baton_paged"}
    roots |= {f"baton_paged.{name}": REPO / name for name in ("allocator", "attention", "plugins")}
    found = set()
    for package, root in roots.items():
        for init in root.rglob("*.py"):
            relative = init.parent.relative_to(root).parts
            found.add(".".join((package, *relative)))
    assert found <= declared, f"undeclared packages: {sorted(found - declared)}"
    missing_inits = [p for p in found if not _init_file(p, roots).exists()]
    assert not missing_inits, f"folders without __init__.py: {missing_inits}"


def _init_file(package: str, roots: dict) -> Path:
    for prefix, root in sorted(roots.items(), key=lambda item: -len(item[0])):
        if package == prefix or package.startswith(prefix + "."):
            rest = package[len(prefix) :].strip(".").split(".") if package != prefix else []
            return root.joinpath(*rest, "__init__.py")
    raise AssertionError(package)


def test_the_cpu_kernel_sources_ship_with_the_package():
    """The kernels compile from their sources on the user's machine, so every file in each
    package's csrc must be package data, and the libraries must compile from exactly those."""
    import configparser
    import fnmatch

    from baton_paged.attention.cpu_extension import ATTENTION_KERNELS
    from baton_paged.model.decoder_kernels import DECODER_KERNELS

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    shipped = set()
    for package, root in (("attention", REPO / "attention"), ("model", REPO / "baton_paged/model")):
        data = config["options.package_data"][f"baton_paged.{package}"]
        patterns = [p.strip() for p in data.split(",")]
        for path in (root / "csrc").iterdir():
            assert any(fnmatch.fnmatch(f"csrc/{path.name}", p) for p in patterns), path
            shipped.add(path.resolve())
    compiled = {
        path.resolve()
        for library in (ATTENTION_KERNELS, DECODER_KERNELS)
        for path in (*library.sources, *library.headers)
    }
    assert compiled == shipped
