# SPDX-License-Identifier: Apache-2.0
"""`make test` on a fresh machine: the C++ tests' system dependencies are checked (and installed
from Debian's packages when possible) by the Makefile itself, not only by the CI script.

Oracle: the Makefile's own behaviour with GoogleTest hidden (GTEST_HEADER empty) and installing
switched off: one line naming what to install and a failing exit; with it present, nothing happens.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, timeout=60)


def test_test_cpp_depends_on_the_dependency_check():
    out = _make("-n", "test-cpp", "GTEST_HEADER=", "CPP_DEPS_INSTALL=no")
    # A dry run still prints the check's recipe before cmake's: the check comes first.
    text = out.stdout
    assert "libgtest-dev" in text and text.index("libgtest-dev") < text.index("cmake -S .")


def test_missing_gtest_fails_with_one_line_naming_the_packages():
    out = _make("cpp-test-deps", "GTEST_HEADER=", "CPP_DEPS_INSTALL=no")
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("make test-cpp:")]
    assert len(lines) == 1 and "libgtest-dev" in lines[0] and "cmake" in lines[0]


@pytest.mark.skipif(not Path("/usr/include/gtest/gtest.h").exists() or shutil.which("cmake") is None,
                    reason="GoogleTest/CMake not installed here")
def test_present_gtest_is_a_no_op():
    out = _make("cpp-test-deps", "CPP_DEPS_INSTALL=no")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
