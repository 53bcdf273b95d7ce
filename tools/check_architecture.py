"""Read the imports and function sizes of the tngraph package and report the house rules.

    python tools/check_architecture.py          # prints every breach, exits 1 when there is one

The rules (issue 23): no import circles between tngraph modules (imports inside functions count:
hiding a circle in a function does not remove it), no function over 80 lines outside kernels,
tngraph/cli.py at most 300 lines, no name with a leading underscore imported from another
module, and no pass (tngraph/passes) keeping state in module-global containers.  tests/test_architecture.py runs the same checks.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tngraph"
MAX_FUNCTION_LINES = 80
MAX_CLI_LINES = 300


@dataclass
class Report:
    cycles: list[list[str]] = field(default_factory=list)
    long_functions: list[tuple[str, str, int]] = field(default_factory=list)
    private_imports: list[tuple[str, str, str]] = field(default_factory=list)
    pass_state: list[tuple[str, str]] = field(default_factory=list)
    cli_lines: int = 0
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)

    def breaches(self) -> list[str]:
        out = [f"import circle: {' -> '.join(c + [c[0]])}" for c in self.cycles]
        out += [f"{mod}.{fn}: {n} lines (limit {MAX_FUNCTION_LINES})"
                for mod, fn, n in self.long_functions]
        out += [f"{mod} imports private name {name} from {src}"
                for mod, src, name in self.private_imports]
        out += [f"{mod} keeps module-global state in {name} (passes keep state on the graph or the context)"
                for mod, name in self.pass_state]
        if self.cli_lines > MAX_CLI_LINES:
            out.append(f"tngraph/cli.py: {self.cli_lines} lines (limit {MAX_CLI_LINES})")
        return out


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(mod: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.AST, mod: str, is_package: bool, known: set[str]):
    """(target module, imported name or None) for every tngraph import in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tngraph":
                    yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(mod, is_package, node)
            if src.split(".")[0] != "tngraph":
                continue
            for alias in node.names:
                sub = f"{src}.{alias.name}"
                yield (sub, None) if sub in known else (src, alias.name)


def _function_lengths(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            yield node.name, node.end_lineno - first + 1


MUTATORS = {"append", "add", "clear", "extend", "insert", "pop", "popitem", "remove", "setdefault", "update", "__setitem__"}


def _module_state(tree: ast.Module):
    """Module-level containers that a function of the module changes (a pass's hidden state)."""
    containers = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        if isinstance(value, (ast.Dict, ast.List, ast.Set)) or (isinstance(value, ast.Call) and getattr(value.func, "id", "") in ("dict", "list", "set")):
            containers |= {t.id for t in targets if isinstance(t, ast.Name)}
    changed = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                changed |= set(node.names)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in containers:
                changed.add(node.func.value.id)
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                for t in getattr(node, "targets", None) or [node.target]:
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in containers:
                        changed.add(t.value.id)
    return sorted(changed)


def analyse(package: Path = PACKAGE) -> Report:
    files = sorted(package.rglob("*.py"))
    known = {module_name(f, package) for f in files}
    report = Report()
    for f in files:
        mod = module_name(f, package)
        tree = ast.parse(f.read_text(), filename=str(f))
        report.graph.add_node(mod)
        for target, name in _imports(tree, mod, f.name == "__init__.py", known):
            # `import tngraph.x` and `from tngraph import x` both depend on tngraph.x; a package's
            # __init__ is not counted as a dependency of its own submodules' imports of siblings.
            if target in known and target != mod:
                report.graph.add_edge(mod, target)
            if name and name.startswith("_") and not name.startswith("__"):
                report.private_imports.append((mod, target, name))
        if mod.startswith("tngraph.passes."):
            report.pass_state += [(mod, name) for name in _module_state(tree)]
        # a Triton kernel is one launch's program: splitting it into @triton.jit helpers is not a gain
        for fn, n in ([] if mod.startswith("tngraph.kernels.") else _function_lengths(tree)):
            if n > MAX_FUNCTION_LINES:
                report.long_functions.append((mod, fn, n))
    # A package __init__ re-exporting its submodules is not a circle: drop edges into packages
    # whose __init__ only re-exports (every package's own submodules importing the parent).
    graph = report.graph.copy()
    for mod in list(graph.nodes):
        for target in list(graph.successors(mod)):
            if mod.startswith(target + "."):
                graph.remove_edge(mod, target)
    report.cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    report.cli_lines = len((package / "cli.py").read_text().splitlines())
    return report


def main() -> int:
    report = analyse()
    breaches = report.breaches()
    for line in breaches:
        print(line)
    print(f"{len(report.cycles)} import circle(s), {len(report.long_functions)} long function(s), "
          f"{len(report.private_imports)} private import(s), cli.py {report.cli_lines} lines")
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
