"""The Swift package (apps/macos) as far as Linux can check it: every .swift file parses with the
tree-sitter Swift grammar; the package layout, the manifest fields the Swift code reads, the component
names it asks for and the vector files its tests load agree with real files; the macOS workflow runs
what the README says it runs.

No Swift compiler is available here: compiling and running the package is the macOS workflow's job
(.github/workflows/macos.yml).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "apps" / "macos"
SOURCES = PACKAGE / "Sources" / "SUNEdgeKit"
TESTS = PACKAGE / "Tests" / "SUNEdgeKitTests"
RESOURCES = TESTS / "Resources"
WORKFLOW = REPO / ".github" / "workflows" / "macos.yml"

tree_sitter = pytest.importorskip("tree_sitter")
tree_sitter_swift = pytest.importorskip("tree_sitter_swift")


@pytest.fixture(scope="module")
def parser():
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))


def swift_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.swift"))


def text(node, source: bytes) -> str:
    return source[node.start_byte:node.end_byte].decode("utf-8")


def problems(node) -> list:
    """ERROR and MISSING nodes under ``node``."""
    found = [node] if node.type == "ERROR" or node.is_missing else []
    for child in node.children:
        found += problems(child)
    return found


# ---- syntax -------------------------------------------------------------------------------------------------------


def test_the_grammar_finds_syntax_errors(parser):
    broken = b"struct A { let x: Int = \n func f( -> Int { return 1 }"
    assert parser.parse(broken).root_node.has_error
    assert not parser.parse(b"struct A { let x: Int\n func f() async throws -> Int { try await g() } }").root_node.has_error


@pytest.mark.parametrize("path", swift_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_swift_file_parses(parser, path):
    source = path.read_bytes()
    tree = parser.parse(source)
    where = [f"line {n.start_point[0] + 1}: {source.splitlines()[n.start_point[0]].decode()[:100]}"
             for n in problems(tree.root_node)]
    assert not tree.root_node.has_error and not where, where


def test_there_is_swift_to_parse():
    names = {p.relative_to(PACKAGE).as_posix() for p in swift_files()}
    assert {"Package.swift", "Sources/SUNEdgeKit/Pipeline.swift", "Sources/SUNEdgeKit/Tokenizer.swift",
            "Sources/SUNEdgeKit/Noise.swift", "Sources/SUNEdgeKit/Samplers.swift", "Sources/SUNEdgeCLI/SUNEdgeCommand.swift",
            "Sources/SUNEdgeSample/SampleApp.swift", "Tests/SUNEdgeKitTests/EndToEndTests.swift"} <= names
    assert not any(p.name == "main.swift" for p in swift_files())  # the executables use @main


# ---- package layout -----------------------------------------------------------------------------------------------


def test_package_layout_matches_package_swift():
    manifest = (PACKAGE / "Package.swift").read_text()
    tools = re.match(r"// swift-tools-version:\s*(\d+)\.(\d+)", manifest)
    assert tools and (int(tools[1]), int(tools[2])) >= (5, 9)
    assert ".macOS(.v13)" in manifest and '.iOS("16.2")' in manifest
    assert ".package(" not in manifest  # no outside dependencies
    targets = dict(re.findall(r'\.(target|executableTarget|testTarget)\(\s*name:\s*"(\w+)"', manifest)[i][::-1]
                   for i in range(len(re.findall(r'\.(target|executableTarget|testTarget)\(', manifest))))
    assert targets == {"SUNEdgeKit": "target", "SUNEdgeCLI": "executableTarget", "SUNEdgeSample": "executableTarget",
                       "SUNEdgeKitTests": "testTarget"}
    for name, kind in targets.items():
        folder = PACKAGE / ("Tests" if kind == "testTarget" else "Sources") / name
        assert folder.is_dir() and list(folder.glob("*.swift")), folder
    assert sorted(p.name for p in (PACKAGE / "Sources").iterdir()) == sorted(n for n, k in targets.items() if k != "testTarget")
    for resource in re.findall(r'\.copy\("([^"]+)"\)', manifest):
        owner = "SUNEdgeKitTests" if resource == "Resources" else "SUNEdgeKit"
        base = TESTS if owner == "SUNEdgeKitTests" else SOURCES
        assert (base / resource).exists(), resource
    for product in re.findall(r'\.(?:library|executable)\(name: "[^"]+", targets: \["(\w+)"\]\)', manifest):
        assert product in targets


# ---- the manifest fields the Swift code reads ---------------------------------------------------------------------


def swift_structs(parser, path: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """For each struct in ``path``: stored property -> (JSON key from its CodingKeys, declared type)."""
    source = path.read_bytes()
    structs: dict[str, dict[str, tuple[str, str]]] = {}

    def visit(node, enclosing: str | None) -> None:
        if node.type == "class_declaration" and any(c.type == "struct" for c in node.children):
            name = text(node.child_by_field_name("name"), source)
            body = node.child_by_field_name("body")
            properties: dict[str, str] = {}
            keys: dict[str, str] = {}
            for member in body.children:
                if member.type == "property_declaration":
                    declared = text(member, source)
                    if "static" in declared.split("let")[0] or "{" in declared:
                        continue  # static constants and computed properties are not decoded
                    pattern = member.child_by_field_name("name")
                    annotation = next(c for c in member.children if c.type == "type_annotation")
                    properties[text(pattern, source)] = text(annotation, source).lstrip(":").strip()
                elif member.type == "class_declaration" and text(member.child_by_field_name("name"), source) == "CodingKeys":
                    for entry in member.child_by_field_name("body").children:
                        if entry.type != "enum_entry":
                            continue
                        names = [text(c, source) for c in entry.children if c.type == "simple_identifier"]
                        raw = entry.child_by_field_name("raw_value")
                        if raw is not None:
                            keys[names[0]] = text(raw, source).strip('"')
                        else:
                            keys.update({n: n for n in names})
                    visit(member, name)
                else:
                    visit(member, name)
            if keys:
                if "init(from decoder" in text(node, source):  # custom decoding may keep derived properties
                    properties = {p: t for p, t in properties.items() if p in keys}
                assert set(properties) == set(keys), f"{name}: CodingKeys {sorted(keys)} vs properties {sorted(properties)}"
                structs[name] = {p: (keys[p], t) for p, t in properties.items()}
            return
        for child in node.children:
            visit(child, enclosing)

    visit(parser.parse(source).root_node, None)
    return structs


JSON_TYPES = {"String": str, "Int": int, "Double": (int, float), "Bool": bool}


def check_against(structs, type_name: str, value, where: str, used: set[str]) -> None:
    """``value`` (JSON) has every key the Swift type ``type_name`` decodes, with a compatible JSON type."""
    type_name = type_name.strip()
    optional = type_name.endswith("?")
    type_name = type_name.rstrip("?")
    if value is None:
        assert optional, f"{where} is null but the Swift type {type_name} is not optional"
        return
    if type_name in JSON_TYPES:
        assert isinstance(value, JSON_TYPES[type_name]) and not (type_name != "Bool" and isinstance(value, bool)), \
            f"{where}: {value!r} is not a {type_name}"
        return
    dictionary = re.fullmatch(r"\[String:\s*(.+)\]", type_name)
    if dictionary:
        assert isinstance(value, dict), where
        for k, v in value.items():
            check_against(structs, dictionary[1], v, f"{where}.{k}", used)
        return
    array = re.fullmatch(r"\[(.+)\]", type_name)
    if array:
        assert isinstance(value, list), where
        for i, v in enumerate(value):
            check_against(structs, array[1], v, f"{where}[{i}]", used)
        return
    assert type_name in structs, f"{where}: the Swift type {type_name} is not a decoded struct of Manifest.swift"
    assert isinstance(value, dict), f"{where} is not an object"
    for prop, (key, prop_type) in structs[type_name].items():
        used.add(f"{type_name}.{key}")
        if key not in value:
            assert prop_type.endswith("?"), f"{where} has no {key!r}, which {type_name}.{prop} reads"
            continue
        check_against(structs, prop_type, value[key], f"{where}.{key}", used)


def test_every_manifest_field_the_swift_code_reads_exists_in_a_real_manifest(parser):
    structs = swift_structs(parser, SOURCES / "Manifest.swift")
    manifest = json.loads((RESOURCES / "tiny_manifest.json").read_text())
    used: set[str] = set()
    check_against(structs, "BundleManifest", manifest, "manifest", used)
    assert {"BundleManifest.format_version", "BundleManifest.components", "ComponentEntry.sha256",
            "LatentGeometry.scaling_factor", "SchedulerDefaults.spacing", "BaselineDefaults.guidance",
            "TokenizerFiles.vocab", "TensorEntry.shape"} <= used


def test_fields_swift_requires_are_fields_every_manifest_has(parser):
    """A Swift property that is not optional must be a field sun-edge always writes (not one of its optional ones)."""
    from sun_edge.bundle import Manifest

    structs = swift_structs(parser, SOURCES / "Manifest.swift")
    optional_in_python = {"parity", "extra", "adapter", "vae_decoder_tiny"}
    for prop, (key, swift_type) in structs["BundleManifest"].items():
        assert key in Manifest.__dataclass_fields__ or key in ("format", "format_version"), key
        if key in optional_in_python:
            assert swift_type.endswith("?"), f"{key} is optional in sun-edge manifests; BundleManifest.{prop} must be too"


def string_literals(parser, path: Path) -> list[str]:
    source = path.read_bytes()
    out: list[str] = []

    def visit(node) -> None:
        if node.type == "line_string_literal" and not any(c.type == "interpolated_expression" for c in node.children):
            out.append(text(node, source)[1:-1])
        for child in node.children:
            visit(child)

    visit(parser.parse(source).root_node)
    return out


def test_component_names_the_swift_code_asks_for_exist(parser):
    manifest = json.loads((RESOURCES / "tiny_manifest.json").read_text())
    source = (SOURCES / "Pipeline.swift").read_text()
    asked = set(re.findall(r'component\("(\w+)"\)', source)) | set(re.findall(r'model\("(\w+)"', source))
    asked |= set(re.findall(r'requiredComponents = \[([^\]]+)\]', source)[0].replace('"', "").replace(" ", "").split(","))
    assert asked == {"text_encoder", "unet", "vae_decoder"}
    assert asked <= set(manifest["components"])
    literals = set(string_literals(parser, SOURCES / "Manifest.swift"))
    assert {"sun-edge-bundle", "manifest.json", "coreml"} <= literals
    assert manifest["format"] == "sun-edge-bundle" and manifest["target"] == "coreml"
    assert "supportedFormatVersion = 1" in (SOURCES / "Manifest.swift").read_text()
    assert manifest["format_version"] == 1


# ---- vector files -------------------------------------------------------------------------------------------------


def test_vector_file_names_agree(parser):
    loaded = set()
    for path in TESTS.glob("*.swift"):
        literals = set(string_literals(parser, path))  # what the parser sees as string literals
        calls = set(re.findall(r'Vectors\.(?:url|load)\([^)]*?"(\w+\.\w+)"\)', path.read_text()))
        assert calls <= literals
        loaded |= calls
    shipped = {p.name for p in RESOURCES.iterdir()}
    assert loaded, "the Swift tests load no vector files"
    assert loaded <= shipped, loaded - shipped
    reference = json.loads((RESOURCES / "reference.json").read_text())
    assert shipped == loaded | {reference["image_file"]}  # every file is read by a Swift test (the PNG is for people)
    tokens = json.loads((RESOURCES / "tokens.json").read_text())
    for repo_file in (tokens["vocab"], tokens["merges"]):  # the Swift tests read these from the checkout
        assert (REPO / repo_file).is_file(), repo_file
    assert (SOURCES / "Resources" / "clip_text_tables.json").is_file()
    assert 'forResource: "clip_text_tables", withExtension: "json"' in (SOURCES / "TextCleaner.swift").read_text()


def test_text_table_keys_the_swift_code_decodes_exist(parser):
    structs = swift_structs(parser, SOURCES / "TextCleaner.swift")
    tables = json.loads((SOURCES / "Resources" / "clip_text_tables.json").read_text(encoding="utf-8"))
    keys = {key for key, _ in structs["TextTables"].values()}
    assert keys <= set(tables), keys - set(tables)
    assert len(tables["sloppy_windows_1252"]) == 256


# ---- the macOS workflow -------------------------------------------------------------------------------------------


def test_macos_workflow_builds_tests_and_compares_images():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["swift-package"]
    assert job["runs-on"].startswith("macos")
    steps = [s.get("run", "") for s in job["steps"]]
    script = "\n".join(steps)
    assert "swift build" in script and "swift test" in script
    assert "tests/test_coreml_export.py" in script  # its Core ML prediction tests run only on macOS
    assert "sun-edge export --model tiny-random --target coreml --height 64 --width 64" in script
    assert "make_swift_vectors.py --bundle" in script and "--reference-only" in script
    swift_test = next(s for s in job["steps"] if "swift test" in s.get("run", ""))
    assert set(swift_test["env"]) == {"SUN_EDGE_TINY_BUNDLE", "SUN_EDGE_REFERENCE_JSON"}
    end_to_end = (TESTS / "EndToEndTests.swift").read_text()
    assert all(f'environment["{name}"]' in end_to_end for name in swift_test["env"])
    assert 'pip install -q -c constraints-cpu.txt -e ".[dev]"' in script
