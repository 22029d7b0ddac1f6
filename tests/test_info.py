"""`python -m zokernels.info` when zokernels._C is missing: it names the real cause (the import error, where zokernels
was imported from, a source checkout never built in place, an install without the extension, a module that does
not load) and blames ZOKERNELS_SKIP_EXT only when it is set."""
import os
import subprocess
import sys

from zokernels.backends import PACKAGE_DIR, describe_missing_extension

SIMULATED = ImportError("simulated: undefined symbol _ZN3c104cuda")


def fake_package(root, *, checkout, built=False):
    """A zokernels package directory under `root`: in a source checkout's src/ (pyproject.toml and csrc/ two levels
    up) or in a site-packages; with or without a compiled _C."""
    package = root / ("src" if checkout else "site-packages") / "zokernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if checkout:
        (root / "pyproject.toml").write_text("[project]\nname = 'zokernels'\n")
        (root / "csrc").mkdir()
    if built:
        (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")
    return package


def test_source_checkout_without_a_build_is_named(tmp_path):
    package = fake_package(tmp_path, checkout=True)
    message = describe_missing_extension(SIMULATED, package, environ={})
    assert "ImportError: simulated: undefined symbol" in message
    assert f"imported from {package}" in message and f"a source checkout ({tmp_path})" in message
    assert "never built in place" in message and "pip install" in message
    assert "ZOKERNELS_SKIP_EXT" not in message  # not set: not the cause


def test_install_without_the_extension_names_skip_ext_only_when_set(tmp_path):
    package = fake_package(tmp_path, checkout=False)
    unset = describe_missing_extension(SIMULATED, package, environ={"ZOKERNELS_SKIP_EXT": "0"})
    assert "this install has no extension" in unset and "source checkout" not in unset
    assert "is set in this environment" not in unset
    set_ = describe_missing_extension(SIMULATED, package, environ={"ZOKERNELS_SKIP_EXT": "1"})
    assert "ZOKERNELS_SKIP_EXT=1 is set in this environment" in set_


def test_a_compiled_module_that_does_not_load_is_told_apart(tmp_path):
    package = fake_package(tmp_path, checkout=True, built=True)
    message = describe_missing_extension(SIMULATED, package, environ={})
    assert "_C.cpython-311-x86_64-linux-gnu.so" in message and "did not load" in message
    assert "never built" not in message


def test_info_reports_the_real_cause_when_the_import_fails(tmp_path):
    """The whole program, with `from . import _C` failing (sys.modules entry None), run from a temporary directory
    and without ZOKERNELS_SKIP_EXT in the environment."""
    code = ("import sys; sys.modules['zokernels._C'] = None\n"
            "import runpy; runpy.run_module('zokernels.info', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "ZOKERNELS_SKIP_EXT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr
    cpu = next(line for line in out.stdout.splitlines() if line.strip().startswith("cpu "))
    assert "unavailable" in cpu and "could not be imported (ModuleNotFoundError: import of zokernels._C" in cpu
    assert f"imported from {PACKAGE_DIR}" in cpu and f"(imported from {PACKAGE_DIR})" in out.stdout
    assert "ZOKERNELS_SKIP_EXT" not in cpu

