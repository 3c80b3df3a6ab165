"""No config value reaches a shell unquoted (issue 13, part 1).

The test walks config.schema.yaml alongside a tiny config and puts shell metacharacters into
every string key it finds (values of maps, list items, keys of every dataset kind). A value
the validation refuses must be refused with a message naming its key. Every value it accepts
goes into one config; the workflow is dry-run with ``--printshellcmds``, and each printed
command is run by bash with a stub ``diffatlas`` on PATH that records its argv. No canary
file may appear, and each accepted value must arrive as (part of) one argument, intact.

The check runs twice: on the workflow as it is, and on a copy whose schema has every value
``pattern`` removed, so the rules' quoting is tested on its own (a pattern is a second line
of defence, not the only one).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from diffatlas.config import load_schema, validate_config
from diffatlas.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
Path_ = tuple  # a concrete key path into a config: ("models", "shapesworld", "revision")


def hostile(i: int, canary: Path) -> str:
    """A value that runs `touch` three ways when a shell sees it unquoted (or breaks out of
    single quotes), yet stays parseable by bash so an unquoted use really executes."""
    d = str(canary)
    return f"v{i}'x'\"y\"$(touch {d}/c{i}a)`touch {d}/c{i}b`;touch {d}/c{i}c;echo *?[a]&"


def base_config(tmp: Path) -> dict[str, Any]:
    """tiny_config plus one entry of every dataset and prompt-set kind, so every branch of
    the schema has an instance to put values into."""
    cfg = yaml.safe_load((ROOT / "tests" / "workflow" / "tiny_config.yaml").read_text())
    cfg["results"] = str(tmp / "results")
    cfg["models"] = {"shapesworld": {"path": str(tmp / "model")}}
    cfg["datasets"]["folder"] = {"kind": "image_folder", "path": str(tmp / "imgs"), "coarse_labels": {"cat": "animal"}}
    cfg["datasets"]["table"] = {"kind": "manifest", "path": str(tmp / "table.csv")}
    cfg["extract"]["spatial_layers"] = ["mid"]
    cfg["daam"]["prompt_sets"]["listed"] = {"kind": "list", "prompts": ["a red circle"]}
    cfg["daam"]["prompt_sets"]["entanglement"].update(cohyponym=["a square and a circle"], non_cohyponym=["a red square"])
    return cfg


def _is_free_string(schema: dict[str, Any]) -> bool:
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    return "string" in types and "enum" not in schema and "const" not in schema


def string_keys(schema: dict[str, Any], instance: Any, path: Path_ = (), with_schema: bool = False) -> Iterator[Any]:
    """Concrete paths of every free string value under ``schema``, instantiated on ``instance``.

    Properties absent from the instance are still yielded (they would be created); array
    items are yielded as index 0; map values (additionalProperties) for every existing key;
    if/then branches where the instance matches the ``if``.
    """
    import jsonschema

    if _is_free_string(schema):
        yield (path, schema) if with_schema else path
    if "items" in schema and isinstance(schema["items"], dict):
        yield from string_keys(schema["items"], (instance or [None])[0] if isinstance(instance, list) else None, (*path, 0), with_schema)
    inst = instance if isinstance(instance, dict) else {}
    for key, sub in schema.get("properties", {}).items():
        yield from string_keys(sub, inst.get(key), (*path, key), with_schema)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in inst:
            if key not in schema.get("properties", {}):
                yield from string_keys(extra, inst[key], (*path, key), with_schema)
    for branch in schema.get("allOf", []):
        cond = branch.get("if")
        if cond is None or (isinstance(instance, dict) and jsonschema.Draft202012Validator(cond).is_valid(instance)):
            yield from string_keys(branch.get("then", branch), instance, path, with_schema)


#: models.<m>.<key> -> the section key it replaces for that model.
SECTION_OF_OVERRIDE = {"geometry_layer": "geometry.layer"}


def key_name(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def put(cfg: dict[str, Any], path: Path_, value: str) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    node = cfg
    for p, nxt in zip(path[:-1], path[1:]):
        if isinstance(node, dict) and not isinstance(node.get(p), (dict, list)):
            node[p] = [] if isinstance(nxt, int) else {}
        node = node[p]
    last = path[-1]
    if isinstance(last, int):
        if len(node) <= last:
            node.append(value)
        else:
            node[last] = value
    else:
        node[last] = value
    return cfg


def strip_value_patterns(schema: Any) -> Any:
    """The schema without any ``pattern`` on values (propertyNames, i.e. names, keep theirs)."""
    if isinstance(schema, list):
        return [strip_value_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: (v if k == "propertyNames" else strip_value_patterns(v)) for k, v in schema.items() if k != "pattern"}


def workflow_copy(dest: Path, strip: bool) -> Path:
    dest.mkdir(parents=True)
    shutil.copy(ROOT / "Snakefile", dest / "Snakefile")
    shutil.copy(ROOT / "config.yaml", dest / "config.yaml")
    shutil.copytree(ROOT / "rules", dest / "rules")
    (dest / "src").symlink_to(ROOT / "src")
    schema = load_schema(ROOT / "config.schema.yaml")
    if strip:
        schema = strip_value_patterns(schema)
    (dest / "config.schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False, allow_unicode=True))
    return dest


def dry_run(workdir: Path, cfg: dict[str, Any]) -> subprocess.CompletedProcess:
    cfg_path = workdir / "test_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--printshellcmds", "--cores", "1",
           "--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir), "--configfile", str(cfg_path)]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def shell_commands(output: str) -> list[str]:
    prefix = "Shell command: "
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix) and line != prefix + "None"]


STUB = """#!{python}
import json, sys
with open({record!r}, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def run_with_stub(commands: list[str], tmp: Path) -> list[list[str]]:
    """Run every command under bash with a recording ``diffatlas``; return the argv lists."""
    stub_dir, record = tmp / "stub", tmp / "argv.jsonl"
    stub_dir.mkdir()
    (stub_dir / "diffatlas").write_text(STUB.format(python=sys.executable, record=str(record)))
    (stub_dir / "diffatlas").chmod(0o755)
    env = dict(os.environ, PATH=f"{stub_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    for cmd in commands:
        # The log redirection needs its folder (Snakemake makes it before a real run).
        try:
            tokens = shlex.split(cmd)
        except ValueError:
            tokens = []
        for a, b in zip(tokens, tokens[1:]):
            if a == ">":
                (tmp / b).parent.mkdir(parents=True, exist_ok=True)  # relative to the command's cwd
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
        if os.environ.get("H13_DEBUG") and proc.returncode:
            print("FAILED", cmd[:300], proc.stderr[-500:])
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def arrived(value: str, argvs: list[list[str]]) -> bool:
    """``value`` is (part of) one argument as given, or a string inside a JSON argument."""
    for argv in argvs:
        for arg in argv:
            if value in arg:
                return True
            if arg[:1] in "{[":
                try:
                    decoded = json.loads(arg)
                except ValueError:
                    continue
                if any(value in s for s in _strings(decoded)):
                    return True
    return False


def check_workflow(tmp: Path, strip: bool) -> dict[str, list[str]]:
    canary = tmp / "canary"
    canary.mkdir(parents=True)
    workdir = workflow_copy(tmp / "wf", strip)
    schema = load_schema(workdir / "config.schema.yaml")
    base = base_config(tmp)
    validate_config(base, workdir / "config.schema.yaml")  # the base itself is fine

    accepted: dict[str, tuple[Path_, str]] = {}
    refused: list[str] = []
    paths = list(dict.fromkeys(string_keys(schema, base)))
    assert len(paths) > 30, f"the walk found too few string keys: {paths}"
    for i, path in enumerate(paths):
        name = key_name(path)
        tried = None
        for value in (hostile(i, canary), hostile(i, canary) + " {label}"):  # {label}: prompt_template's rule
            try:
                validate_config(put(base, path, value), workdir / "config.schema.yaml")
            except UserError as err:
                tried = str(err)
                continue
            accepted[name] = (path, value)
            break
        else:
            assert name in tried, f"refusal of a bad {name} does not name the key:\n{tried}"
            refused.append(name)

    # All accepted values together; a value the workflow itself refuses (names that must
    # exist elsewhere) is dropped, and the refusal must name it (its key or its value).
    for _ in range(len(accepted)):
        cfg = base
        for path, value in accepted.values():
            cfg = put(cfg, path, value)
        proc = dry_run(workdir, cfg)
        if proc.returncode == 0:
            break
        text = proc.stdout + proc.stderr
        culprits = [n for n, (path, _) in accepted.items()
                    if re.search(rf"v{paths.index(path)}\\\\?'", text) and n.split("[")[0] in text]
        assert culprits, f"dry run failed without naming a key:\n{text[-3000:]}"
        for n in culprits:
            accepted.pop(n)
            refused.append(n)
    else:
        pytest.fail("dry run never succeeded")
    commands = shell_commands(proc.stdout + proc.stderr)
    assert len(commands) > 20, (proc.stdout + proc.stderr)[-3000:]
    argvs = run_with_stub(commands, tmp)
    assert len(argvs) == len(commands), "some printed commands did not reach diffatlas"
    fired = sorted(p.name for p in canary.iterdir())
    assert not fired, f"shell injection: canaries {fired} from keys " + ", ".join(
        n for n, (path, _) in accepted.items() if any(f.startswith(f"c{paths.index(path)}") for f in fired)
    )
    # A per-model override (models.<m>.geometry_layer) replaces its section's key for that model:
    # with both set, the section's value has nowhere to go, and the override is checked instead.
    shadowed = {SECTION_OF_OVERRIDE[n.rsplit(".", 1)[-1]] for n in accepted
                if n.startswith("models.") and n.rsplit(".", 1)[-1] in SECTION_OF_OVERRIDE}
    lost = [n for n, (_, value) in accepted.items() if n not in shadowed and not arrived(value, argvs)]
    assert not lost, f"values of {lost} never reached a command intact"
    return {"accepted": sorted(accepted), "refused": sorted(refused)}


@pytest.mark.workflow
@pytest.mark.parametrize("strip", [False, True], ids=["schema", "quoting-only"])
def test_no_config_value_reaches_a_shell_unquoted(tmp_path, strip):
    seen = check_workflow(tmp_path, strip)
    if not strip:
        # Keys that name things are refused before any job is planned.
        for name in ("models.shapesworld.revision", "extract.layers[0]", "device", "geometry.layer"):
            assert name in seen["refused"], seen
    else:
        assert "models.shapesworld.revision" in seen["accepted"], seen
