"""The project's modules form layers, not a web: leaves (metrics, data loading, BM25) at the bottom, the
policy and the agent above them, the trainers above those, the self-evolution loop on top.

Every project import counts, including those inside functions and under `if __name__ == "__main__"`:
a function-local import hides a tie from the reader but not from Python, and a cycle of them makes the
order in which modules may be read (and changed) undefined. So the import graph must be acyclic, and a
project module is never imported inside a function (that is allowed only to defer a heavy optional
package such as matplotlib or rank_bm25)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_files() -> dict[str, Path]:
    """module name ("eval", "data.prepare") -> file, for every .py at the top level and in data/."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    files.update({f"data.{p.stem}": p for p in (ROOT / "data").glob("*.py")})
    return files


def project_imports(tree: ast.AST, modules: set[str]):
    """(module imported, ast node) for every import of a project module anywhere in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:  # `import eval`, `import data.prepare`
                    yield alias.name, node
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:  # `from data.prepare import load_qa`
                yield node.module, node
            for alias in node.names:  # `from data import prepare`
                if f"{node.module}.{alias.name}" in modules:
                    yield f"{node.module}.{alias.name}", node


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    return {name: {m for m, _ in project_imports(ast.parse(path.read_text(encoding="utf-8")), set(files))} - {name}
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Depth-first search; a grey node met again closes a cycle."""
    colour, stack = dict.fromkeys(graph, "white"), []

    def visit(u):
        colour[u] = "grey"
        stack.append(u)
        for v in sorted(graph[u]):
            if colour[v] == "grey":
                return stack[stack.index(v):] + [v]
            if colour[v] == "white" and (cycle := visit(v)):
                return cycle
        colour[u] = "black"
        stack.pop()
        return None
    for u in sorted(graph):
        if colour[u] == "white" and (cycle := visit(u)):
            return cycle
    return None


def test_the_checker_finds_a_cycle_and_accepts_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"top": {"mid", "leaf"}, "mid": {"leaf"}, "leaf": set()}) is None
    tree = ast.parse("import os\nfrom data.load import x\ndef f():\n    import eval\n    from data import questions\n")
    assert sorted(m for m, _ in project_imports(tree, {"eval", "data.load", "data.questions"})) == \
        ["data.load", "data.questions", "eval"]


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"eval", "model", "search", "rollout", "data.prepare", "data.questions"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_project_module_is_imported_inside_a_function():
    files, bad = project_files(), []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {m} inside {fn.name}()"
                    for m, node in project_imports(fn, set(files))]
    assert not bad, "import these at the top of the module instead:\n" + "\n".join(sorted(set(bad)))


def test_the_readme_lists_the_files_bottom_up():
    """README's file table is the reading order: each file there imports only files listed above it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Files"):readme.index("## Data")]
    order = [f[:-3].replace("/", ".") for f in re.findall(r"^\| `([\w/]+\.py)`", table, re.M)]
    pos, graph = {m: i for i, m in enumerate(order)}, import_graph()
    assert {"metrics", "eval", "evolve"} <= set(pos)
    late = [f"{m} imports {d}, listed below it" for m in order for d in sorted(graph.get(m, ()))
            if pos.get(d, -1) > pos[m]]
    assert not late, "\n".join(late)
