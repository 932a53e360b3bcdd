"""The code's structure: no import cycles in trainer/ or fastmath_kernels/, and no engine named outside
trainer/rollout/. Imports inside functions count too: a deferred import still ties two modules."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("trainer", "fastmath_kernels")


def modules():
    """{dotted module name: path} of every .py file in PACKAGES."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def top_level_names(path):
    """Names a module binds at its top level (imports, functions, classes, assignments)."""
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def imported_modules(module, path, known):
    """The modules of `known` that `module` imports anywhere in its file. `from package import name`
    ties it to package.name where that is a module, else to the package that binds the name."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in known:
                    found.add(name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = (module if is_package else module.rsplit(".", 1)[0]).split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known and alias.name in top_level_names(known[target]):
                    found.add(target)
    found.discard(module)
    return found


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_finder_sees_a_cycle_through_a_deferred_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .one import thing\n")
    (tmp_path / "pkg" / "one.py").write_text("def thing():\n    from . import other\n")
    (tmp_path / "pkg" / "other.py").write_text("from pkg import thing\n")
    known = {"pkg": str(tmp_path / "pkg" / "__init__.py"), "pkg.one": str(tmp_path / "pkg" / "one.py"),
             "pkg.other": str(tmp_path / "pkg" / "other.py")}
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    assert graph == {"pkg": {"pkg.one"}, "pkg.one": {"pkg.other"}, "pkg.other": {"pkg"}}
    assert cycles(graph) == [["pkg", "pkg.one", "pkg.other"]]


def test_no_import_cycles_in_the_trainer_or_the_kernels():
    known = modules()
    assert "trainer.rollout.base" in known and "fastmath_kernels.token_logprobs" in known
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    assert "trainer.errors" in graph["trainer.config"]
    assert cycles(graph) == []


def test_no_engine_is_named_outside_the_rollout_package():
    comparison = re.compile(r"""[!=]= ?["'](vllm|hf)["']|in \(["'](vllm|hf)["']""")
    found = []
    for name, path in modules().items():
        if name.startswith("trainer.") and not name.startswith("trainer.rollout"):
            for number, line in enumerate(open(path), 1):
                if comparison.search(line):
                    found.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert found == []
