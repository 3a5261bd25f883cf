"""The code stays readable: no script or module over 600 lines, no function over 80 (tests
included), so that each reads on a screen or two."""
import ast
import glob
import os

from conftest import ROOT


def test_files_and_functions_stay_short():
    long_files, long_functions = [], []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        name = os.path.relpath(path, ROOT)
        text = open(path).read()
        if os.path.dirname(name) == "" and len(text.splitlines()) > 600:
            long_files.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{name}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_files and not long_functions, (long_files, long_functions)
