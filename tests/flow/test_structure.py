"""The runtime's shape (issue 15): its modules import one another without a cycle, and its
code names nothing of DICOM, HL7 or the node library's protocols."""

import ast
import re
from pathlib import Path

import flow

FLOW = Path(flow.__file__).parent

# Domain words the runtime must not name in code (docstrings may cite them as examples);
# "dicomflow", the product's name, is not one of them.
DOMAIN = re.compile(r"dicom(?!flow)|\bsop|hl7|pacs|pynetdicom|pydicom|patient|stud(y|ies)|"
                    r"modality|accession|dimse|c-echo|c-store|mllp|stow|fhir", re.IGNORECASE)


def _flow_imports(source: str, modules: set[str]) -> set[str]:
    """The modules of flow that ``source`` imports, at any depth: an import inside a function
    or under ``TYPE_CHECKING`` hides a cycle, it does not remove it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
            elif node.module == "flow" or (node.module or "").startswith("flow."):
                base = node.module.removeprefix("flow").lstrip(".")
            else:
                continue
            if base:
                found.add(base.split(".")[0])
            else:
                found.update(a.name if a.name in modules else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update((a.name.split(".") + ["__init__"])[1] for a in node.names
                         if a.name == "flow" or a.name.startswith("flow."))
    return found & modules


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            cycle = visit(imported, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, [])) is not None), None)


def test_flow_modules_import_one_another_without_a_cycle():
    modules = {p.stem for p in FLOW.glob("*.py")}
    graph = {p.stem: _flow_imports(p.read_text(), modules) - {p.stem} for p in FLOW.glob("*.py")}
    assert graph["_supervisor"] >= {"_graph", "_node"}  # the reader sees the imports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_import_reader_sees_imports_in_functions_and_type_checking_blocks():
    source = ("from typing import TYPE_CHECKING\n"
              "from ._log import Logger\n"
              "if TYPE_CHECKING:\n"
              "    from ._supervisor import Runner\n"
              "def f():\n"
              "    from . import _graph\n"
              "    import flow._page\n"
              "    from flow import Node\n")
    modules = {"_log", "_supervisor", "_graph", "_page", "__init__", "_node"}
    assert _flow_imports(source, modules) == {"_log", "_supervisor", "_graph", "_page",
                                              "__init__"}


def test_cycle_finder_names_the_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _domain_words(source: str) -> list[str]:
    """Names and string literals in ``source`` (not docstrings, not comments) that name the
    domain, as ``line: text``."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        texts: list[str] = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts = [] if id(node) in docstrings else [node.value]
        elif isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            texts = [node.name]
        elif isinstance(node, ast.arg):
            texts = [node.arg]
        elif isinstance(node, ast.alias):
            texts = [node.name, node.asname or ""]
        hits += [f"{getattr(node, 'lineno', '?')}: {t}" for t in texts if DOMAIN.search(t)]
    return hits


def test_flow_code_names_nothing_of_dicom_or_hl7():
    found = {p.name: _domain_words(p.read_text()) for p in sorted(FLOW.glob("*.py"))}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_domain_check_sees_code_but_not_docstrings_or_the_product_name():
    source = ('"""Routes DICOM objects."""\n'
              "def send(study_uid):\n"
              '    """One study."""\n'
              '    return "dicomflow_" + "pacs"  # a PACS\n')
    assert sorted(_domain_words(source)) == ["2: study_uid", "4: pacs"]
