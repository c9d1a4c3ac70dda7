"""The package under test is the installed one, with its compiled extension."""

import pathlib

import migrate


def test_native_extension_imports():
    from migrate import _native

    assert _native.ffi is not None
    assert _native.lib is not None


def test_cli_lists_commands(capsys):
    from migrate.cli import main

    assert main([]) == 2
    out = capsys.readouterr().out
    assert "check" in out and "bench" in out


def test_version_matches_metadata():
    from importlib.metadata import version

    assert version("migrate") == migrate.__version__
    assert pathlib.Path(migrate.__file__).name == "__init__.py"
