"""params.yaml has one schema and one source of values: every key is declared once in mfim/params_schema.py, its
value lives in params.yaml alone (configs/paper.yaml is composed from it), and a bad key or value is refused at
stage start in one line that names the key, the value and what is allowed."""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mfim.config import compose, load_params
from mfim.params_schema import SCHEMA, ParamsError, leaf_keys, validate
from tests.defaults import default_params

REPO = Path(__file__).resolve().parents[1]


def _error(params: dict) -> str:
    with pytest.raises(ParamsError) as e:
        validate(params, where="params.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("params.yaml: "), message
    return message


def _set(params: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(params)
    *parents, leaf = dotted.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


# --- (a) the shipped files validate; (e) the schema declares exactly params.yaml's keys ---------------------------


@pytest.mark.parametrize("name", ["params.yaml", "configs/paper.yaml"])
def test_the_shipped_params_files_validate(name):
    load_params(REPO / name)


def test_the_schema_declares_exactly_the_keys_of_params_yaml():
    """A new key is one line in params.yaml and one in the schema; neither can hold a key the other lacks."""
    declared, present = set(leaf_keys(SCHEMA)), set(leaf_keys(default_params()))
    assert declared - present == set() and present - declared == set()
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    assert set(leaf_keys(paper)) == present


def test_configs_paper_yaml_is_params_yaml_plus_the_overlay():
    """configs/paper.yaml is generated (`python -m mfim.config compose`): it must be what the command writes now, and
    the overlay holds only values that differ from params.yaml (a copy of a default there would be a second one)."""
    assert (REPO / "configs" / "paper.yaml").read_text() == compose(REPO / "params.yaml",
                                                                    REPO / "configs" / "paper.overlay.yaml")
    overlay = yaml.safe_load((REPO / "configs" / "paper.overlay.yaml").read_text())
    base = default_params()
    for key in leaf_keys(overlay):
        node_o, node_b = overlay, base
        for part in key.split("."):
            node_o, node_b = node_o[part], node_b[part]
        assert node_o != node_b, f"configs/paper.overlay.yaml repeats params.yaml's value of {key}"


def test_an_overlay_key_params_yaml_lacks_is_refused(tmp_path):
    (tmp_path / "overlay.yaml").write_text("loss:\n  shpe: 2\n")
    with pytest.raises(ParamsError, match="loss.shpe is not a key of params.yaml"):
        compose(REPO / "params.yaml", tmp_path / "overlay.yaml")


# --- (b) every key must be there: no code fallback can hide a missing one -----------------------------------------


@pytest.mark.parametrize("key", leaf_keys(SCHEMA))
def test_each_missing_key_is_named(key):
    params = default_params()
    *parents, leaf = key.split(".")
    node = params
    for p in parents:
        node = node[p]
    del node[leaf]
    message = _error(params)
    assert f"missing key {key} " in message, message


def test_a_missing_group_is_named():
    params = default_params()
    del params["loss"]
    message = _error(params)
    assert "missing group loss " in message and "id, id_views, id_jitter" in message, message


# --- (c) misspelt keys, out-of-range and mistyped values: one line with key, value and what is allowed -------------


def test_a_misspelt_key_names_the_nearest_valid_one():
    message = _error(_set(default_params(), "loss.shpe", 2))
    assert message == "params.yaml: unknown key loss.shpe (value 2); did you mean loss.shape?", message
    message = _error(_set(default_params(), "projct", {}))
    assert "unknown key projct" in message and "did you mean project" in message


@pytest.mark.parametrize("key,value,allowed", [
    ("loss.shape", -5, "a float >= 0"),
    ("train.steps", -1, "an int >= 1"),
    ("train.steps", "ten", "an int >= 1"),
    ("project.threads", -3, "an int >= 0"),
    ("project.device", "gpu", r"a string matching auto|cpu|cuda(:\d+)?|mps"),
    ("train.config", "F", "one of A | B | C | D | E"),
    ("train.betas", [0.9], "a list of 2 a float in [0, 1]"),
    ("train.gpus", 0, "auto or an int >= 1"),
    ("data.resolution", 48, "a power of two in [4, 4096]"),
    ("warmstart.mixing_prob", 1.5, "a float in [0, 1]"),
    ("encoder.style_maps", "yes", "a bool"),
    ("synthesize.eval_identity_offset", -1, "an int >= 0 or null"),
])
def test_a_bad_value_is_one_line_with_key_value_and_what_is_allowed(key, value, allowed):
    message = _error(_set(default_params(), key, value))
    assert message == f"params.yaml: {key} is {value!r}, allowed: {allowed}", message


def test_a_group_that_is_not_a_mapping_is_refused():
    message = _error(_set(default_params(), "loss.id_jitter", 0.1))
    assert "loss.id_jitter is 0.1, expected a group (a mapping of scale, shift, rotate_deg, flip)" in message


def test_load_params_and_override_validate(tmp_path):
    from mfim.config import override

    bad = _set(default_params(), "train.steps", "ten")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match=f"^{tmp_path / 'params.yaml'}: train.steps is 'ten'"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("loss: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    assert override(default_params(), ["loss.shape=2"])["loss"]["shape"] == 2
    with pytest.raises(ParamsError, match="unknown key loss.shpe .*did you mean loss.shape"):
        override(default_params(), ["loss.shpe=2"])


# --- (f) a stage script run directly: the one line, exit status 2, no traceback -----------------------------------


@pytest.mark.parametrize("argv,where", [
    (["pipelines/synthesize.py"], "synthesize"),
    (["pipelines/fit_regressor.py"], "fit_regressor"),
    (["-m", "mfim.launch", "pipelines/train.py"], "launch"),
])
def test_a_stage_run_directly_on_bad_params_prints_one_line_and_exits_2(tmp_path, argv, where):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_set(default_params(), "loss.shpe", 2)))
    script = [str(REPO / argv[0])] if argv[0].endswith(".py") else [*argv[:2], str(REPO / argv[2])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == (f"{where}: params.yaml: unknown key loss.shpe (value 2); did you mean loss.shape?\n")
    assert not (tmp_path / "data").exists()  # refused before any work


# --- (g) MLflow logs validated params only ---------------------------------------------------------------------------


def test_mlflow_never_logs_a_key_the_schema_refuses(tmp_path, monkeypatch):
    from mfim.tracking import start_run

    monkeypatch.chdir(tmp_path)
    params = _set(default_params(), "loss.shpe", 2)
    params["project"]["mlflow"].update(tracking_uri=f"sqlite:///{tmp_path}/t.db", artifact_root=str(tmp_path / "a"))
    with pytest.raises(ParamsError, match="unknown key loss.shpe"):
        with start_run("train", params, groups=["train", "loss"]):
            pass
    assert not (tmp_path / "t.db").exists()  # refused before the store was even opened


# --- (d) no default is defined twice: no value for a params key in mfim/ or pipelines/ ----------------------------

# Reviewed exceptions: (file, what) -> why it is not a second default of a params key.
ALLOWED = {
    ("mfim/models/source_fit.py", "SourceFitConfig.cache_size = CACHE_SIZE"):
        "not a params key: how many fitted sources are kept in memory, not what is computed",
    ("mfim/weights/limits.py", "c.get('style_map_resolutions', ())"):
        "a checkpoint's stored encoder config being bounded, not params (a file without the key has no maps)",
}


def _params_names() -> set[str]:
    """Every key and group name of params.yaml (the last part of each dotted name, and each group on the way)."""
    return {part for key in leaf_keys(SCHEMA) for part in key.split(".")}


# names that hold a params group (or the whole params) in mfim/ and pipelines/
GROUP_VARS = {"params", "p", "tr", "train", "loss", "enc", "group", "ev_cfg", "e", "f", "c", "a", "g", "pg", "cfg",
              "raw_params", "evaluator"}


def _root_name(node: ast.AST) -> str | None:
    """The variable an attribute / subscript / ``.get`` chain starts from: ``params["loss"].get`` -> params."""
    while True:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Attribute):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            node = node.func.value
        else:
            return None


def second_defaults(root: Path) -> list[str]:
    """Every place under ``root``/mfim and ``root``/pipelines that gives a params key a value of its own:
    ``lookup(params, "a.b", default)``, ``<group>.get("key", default)`` on a params group, and a field default in a
    class with ``from_params``."""
    names = _params_names()
    found = []
    for path in sorted([*(root / "mfim").rglob("*.py"), *(root / "pipelines").glob("*.py")]):
        rel = str(path.relative_to(root))
        tree = ast.parse(path.read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "lookup" and (
                    len(n.args) >= 3 or any(k.arg == "default" for k in n.keywords)):
                found.append((rel, n.lineno, ast.unparse(n)))
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("get", "setdefault")
                  and len(n.args) >= 2 and isinstance(n.args[0], ast.Constant) and n.args[0].value in names
                  and _root_name(n.func.value) in GROUP_VARS):
                found.append((rel, n.lineno, ast.unparse(n)))
            elif isinstance(n, ast.ClassDef) and any(isinstance(b, (ast.FunctionDef,)) and b.name == "from_params"
                                                     for b in n.body):
                for stmt in n.body:
                    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
                        found.append((rel, stmt.lineno, f"{n.name}.{stmt.target.id} = {ast.unparse(stmt.value)}"))
    return [f"{rel}:{line}: {text}" for rel, line, text in sorted(found) if (rel, text) not in ALLOWED]


def test_no_params_key_has_a_default_in_code():
    """params.yaml is the one source of values; a `.get("key", default)`, `lookup(..., default)` or a dataclass
    default beside `from_params` is a second one that silently wins when a key goes missing. (On the tree before
    this test existed it reported 271 places.)"""
    assert all(why for why in ALLOWED.values())
    found = second_defaults(REPO)
    assert not found, "a params key with a default in code (params.yaml holds it):\n" + "\n".join(found)


def test_the_scan_finds_each_kind_of_second_default(tmp_path):
    """The scan above is not vacuous: it catches each form it is meant to."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "mfim").mkdir()
    (tmp_path / "mfim" / "x.py").write_text(
        "from dataclasses import dataclass\n"
        "@dataclass\nclass C:\n    steps: int = 600\n    @staticmethod\n    def from_params(g):\n        return C()\n"
        "def f(params, tr):\n"
        "    a = lookup(params, 'train.steps', 600)\n"
        "    b = tr.get('steps', 600)\n"
        "    c = params['loss'].get('shape', 1.0)\n"
        "    d = params.get('train', {})\n"
        "    e = state.get('steps', 0)\n")  # a checkpoint dict, not a params group: not reported
    found = {line.split(": ", 1)[1] for line in second_defaults(tmp_path)}
    assert found == {"C.steps = 600", "lookup(params, 'train.steps', 600)", "tr.get('steps', 600)",
                     "params['loss'].get('shape', 1.0)", "params.get('train', {})"}, found
