"""One-line error reports: ``unifusion.errors.first_line`` is the one formatter (CLI, loaders,
study, encoder)."""

from __future__ import annotations

import pytest

from unifusion.errors import first_line


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ValueError("bad value\nsecond line"), "bad value"),
        (OSError("\n  \n  indented first real line  \nmore"), "indented first real line"),
        (KeyError("model.backbone"), "model.backbone"),  # str() would add quotes
        (KeyError(3), "3"),
        (RuntimeError(""), "RuntimeError"),
        (
            ValueError(
                "Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n"
                "  - Expected a <class 'NoneType'>\n  - width must be divisible by num_heads\n"
                "  - Expected a <class 'NoneType'> again\nGiven value type: <class 'dict'>"
            ),
            "width must be divisible by num_heads",
        ),
        (ValueError("Errors:\n  - Expected a <class 'NoneType'>"), "Errors:"),
    ],
)
def test_first_line(error, line):
    assert first_line(error) == line


def test_first_line_with_type():
    assert first_line(OSError("no such file\ndetails"), with_type=True) == "OSError: no such file"
    assert first_line(OSError(), with_type=True) == "OSError"  # no "OSError: " with nothing after it
