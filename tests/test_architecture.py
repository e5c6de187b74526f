"""The package's shape (docs/design.md): its modules import only downward, in layers, with no
circle; comments and docstrings say why, not how fast (timings live in docs/benchmarks.md)."""
import ast
import io
import pathlib
import re
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jacext"

# docs/design.md's layers: a module imports only from layers below its own (and from itself).
LAYERS = {
    "_C": 0, "activations": 0, "_checks": 0, "_wrt": 0,
    "_library": 1, "layouts": 1, "_composites": 1, "estimators": 1, "reference": 1, "workspace": 1, "data": 1,
    "planner": 2, "frontend": 2, "generic": 2,
    "_jacobian_ops": 3, "_laplacian_ops": 3, "_flow_ops": 3,
    "ops": 4, "nn": 4, "_route": 4,
    "functional": 5, "laplacian": 6, "spectral": 6, "margin": 6, "flows": 6, "targetprop": 6,
    "explain": 7,
    "__init__": 8, "__main__": 9,
}


def _internal_imports(path: pathlib.Path):
    """The jacext modules that `path` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import a, b / from .a import b
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.level == 0 and node.module and node.module.split(".")[0] == "jacext":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "jacext" and len(parts) > 1:
                    found.add(parts[1])
    return found - {path.stem}


def import_graph():
    return {path.stem: _internal_imports(path) for path in sorted(PACKAGE.glob("*.py"))}


def _cycle(graph):
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target] if target in stack else [node, target]
            if target not in state:
                found = visit(target, stack + [target])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_circle():
    graph = import_graph()
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_only_downward():
    graph = import_graph()
    unknown = sorted(set(graph) - set(LAYERS))
    assert not unknown, f"modules without a layer in LAYERS (and docs/design.md): {unknown}"
    upward = [f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]})"
              for module, targets in graph.items() for target in targets
              if target in LAYERS and LAYERS[target] >= LAYERS[module]]
    assert not upward, "\n".join(upward)


TIMING = re.compile(r"\d\s?(ms|us|µs|ns)\b|\dx? (faster|slower)\b|\dx the time|\b(it|this) was \d")


def _python_prose(path):
    """Comments and docstrings of a Python file."""
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc


def _cpp_prose(path):
    source = path.read_text()
    for match in re.finditer(r"//[^\n]*|/\*.*?\*/", source, re.S):
        yield source.count("\n", 0, match.start()) + 1, match.group()


def test_no_timings_in_comments_or_docstrings():
    hits = []
    for path in sorted(PACKAGE.glob("*.py")):
        hits += [f"{path.relative_to(ROOT)}:{line}: {text.strip()[:100]}" for line, text in _python_prose(path)
                 if TIMING.search(text)]
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            hits += [f"{path.relative_to(ROOT)}:{line}: {text.strip()[:100]}" for line, text in _cpp_prose(path)
                     if TIMING.search(text)]
    assert not hits, "timings belong in docs/benchmarks.md:\n" + "\n".join(hits)


@pytest.mark.parametrize("text", ["# 0.99 -> 0.57 ms", "# 30-40 us a call", "// 2.5x faster", "/* 12 µs */"])
def test_the_timing_pattern_matches_what_it_should(text):
    assert TIMING.search(text)
