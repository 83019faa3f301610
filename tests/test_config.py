"""Config validation: every user mistake names the file, the field path and what is allowed."""
import copy
from pathlib import Path

import pytest
import yaml

from buildplan import config

pytestmark = pytest.mark.unit

GOOD = {
    "models": [
        {"name": "ret", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 0},
         "graphs": ["BLIP_text", "blip_itm"],
         "targets": {"ascend310p3": {"graphs": ["BLIP_text"], "batch_sizes": [1, 4]},
                     "bm1684x": {"graphs": ["blip_itm"], "precisions": ["F32", "F16"]}}},
        {"name": "vqa", "task": "vqa", "checkpoint": {"synthetic": "tiny"},
         "targets": {"bm1684": {"graphs": ["blip_vqa_venc"], "precisions": ["F32"]}}},
    ]
}


def mutate(fn):
    raw = copy.deepcopy(GOOD)
    fn(raw)
    return raw


CASES = [
    (lambda r: r.update(extra=1), "extra", "unknown key"),
    (lambda r: r["models"][0].update(colour="red"), "models[0].colour", "unknown key"),
    (lambda r: r["models"][1].update(task="detection"), "models[1].task", "retrieval, captioning, vqa"),
    (lambda r: r["models"][1]["targets"]["bm1684"].update(precisions=["F16"]), "models[1].targets.bm1684.precisions[0]", "F32, INT8"),
    (lambda r: r["models"][0]["targets"].update(bm9999={}), "models[0].targets.bm9999", "unknown chip"),
    (lambda r: r["models"][0]["targets"]["bm1684x"].update(graphs=["BLIP_image"]), "models[0].targets.bm1684x.graphs[0]", "BLIP_text, blip_itm"),
    (lambda r: r["models"][0].update(graphs=["blip_cap"]), "models[0].graphs[0]", "unknown retrieval graph"),
    (lambda r: r["models"][1].update(name="ret"), "models[1].name", "duplicate model name"),
    (lambda r: r["models"][0].update(name="../escape"), "models[0].name", "not a safe artifact name"),
    (lambda r: r["models"][0].update(name="ret\n"), "models[0].name", "not a safe artifact name"),
    (lambda r: r["models"][0]["targets"]["bm1684x"].update(device_memory_mb=0), "models[0].targets.bm1684x.device_memory_mb", "out of range"),
    (lambda r: r["models"][0]["targets"]["bm1684x"].update(device_memory_mb="4G"), "models[0].targets.bm1684x.device_memory_mb", "an integer"),
    (lambda r: r.update(artifacts="/dev/null"), "artifacts", "not a directory"),
    (lambda r: r.update(artifacts="a\0b"), "artifacts", "not a usable path"),
    (lambda r: r.update(artifacts="x" * 300), "artifacts", "not a usable path"),
    (lambda r: r["models"][0].update(checkpoint="ck\0.pth"), "models[0].checkpoint.path", "not a usable path"),
    (lambda r: r.update(toolchains={"tpu_mlir": {"root": "/dev/null"}}), "toolchains.tpu_mlir.root", "not a directory"),
    (lambda r: r["models"][0].update(checkpoint="missing.pth"), "models[0].checkpoint.path", "does not exist"),
    (lambda r: r["models"][0]["targets"]["ascend310p3"].update(batch_sizes=[1, "4"]), "models[0].targets.ascend310p3.batch_sizes[1]", "expected an integer"),
    (lambda r: r["models"][0]["targets"]["ascend310p3"].update(batch_sizes=[1, 1]), "models[0].targets.ascend310p3.batch_sizes[1]", "duplicate batch size"),
    (lambda r: r["models"][0]["targets"]["ascend310p3"].update(precisions=["F16"]), "models[0].targets.ascend310p3.precisions", "unknown key"),
    (lambda r: r["models"][0]["targets"]["ascend310p3"].update(precision_mode="fastest"), "models[0].targets.ascend310p3.precision_mode", "force_fp16"),
    (lambda r: r["models"][0]["targets"]["ascend310p3"].update(extra_flags={"BLIP_text": ["--soc_version=x"]}), "models[0].targets.ascend310p3.extra_flags.BLIP_text[0]", "set by the build itself"),
    (lambda r: r["models"][0]["targets"]["bm1684x"].update(simulate="yes"), "models[0].targets.bm1684x.simulate", "true or false"),
    (lambda r: r["models"][0].update(checkpoint={"synthetic": "huge"}), "models[0].checkpoint.synthetic", "tiny, base"),
    (lambda r: r["models"][0].update(image_size=100), "models[0].image_size", "multiple of the patch size"),
    (lambda r: r.update(models=[]), "models", "non-empty list"),
    (lambda r: r["models"][1]["targets"].update(bm1684=[{"precisions": ["F32"]}, {"precisions": ["INT8", "F32"]}]),
     "models[1].targets.bm1684[1]", "already declared in models[1].targets.bm1684[0]"),
    (lambda r: r["models"][1]["targets"].update(bm1684=[{"precisions": ["F32"]}, {"precisions": ["F16"]}]),
     "models[1].targets.bm1684[1].precisions[0]", "F32, INT8"),
]


def test_a_chip_takes_several_settings_blocks(tmp_path):
    """The image encoder in several precisions, the text graphs in F32, on one chip."""
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(mutate(lambda r: r["models"][1]["targets"].update(bm1684x=[
        {"graphs": ["blip_vqa_venc"], "precisions": ["F32", "F16", "INT8"]},
        {"graphs": ["blip_vqa_tenc", "blip_vqa_tdec"], "precisions": ["F32"]}]))))
    blocks = [t for t in config.load(path).models[1].targets if t.name == "bm1684x"]
    assert [(t.graphs, t.settings["precisions"]) for t in blocks] == [
        (("blip_vqa_venc",), ("F32", "F16", "INT8")), (("blip_vqa_tenc", "blip_vqa_tdec"), ("F32",))]


@pytest.mark.parametrize("change,field,allowed", CASES, ids=[c[1] for c in CASES])
def test_malformed_config_names_file_field_and_fix(tmp_path, change, field, allowed):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(mutate(change)))
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.field == field
    text = str(err.value)
    assert text.startswith(f"{path.name}: {field}:") or str(path) in text
    assert allowed in text


def test_good_config_and_shipped_files_validate(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    cfg = config.load(path)
    assert [m.name for m in cfg.models] == ["ret", "vqa"]
    assert config.load(Path(__file__).parent.parent / "models.yaml").models


def test_yaml_syntax_error_has_line(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: [unclosed\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "line" in err.value.field


def test_doit_reports_config_error_without_traceback(tmp_path):
    from conftest import doit

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(mutate(lambda r: r["models"][1]["targets"]["bm1684"].update(precisions=["BF16"]))))
    proc = doit(path, "list", check=False)
    assert proc.returncode == 2
    assert "models[1].targets.bm1684.precisions[0]" in proc.stderr and "Traceback" not in proc.stderr


RAW_CASES = {
    "duplicate key": ("models:\n  - name: a\n    name: b\n", "line 3", "duplicate key 'name'"),
    "duplicate chip block": ("models:\n  - name: a\n    task: vqa\n    checkpoint: {synthetic: tiny}\n    targets:\n"
                             "      bm1684x: {precisions: [F32]}\n      bm1684x: {precisions: [F16]}\n",
                             "line 7", "duplicate key 'bm1684x'"),
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)) + "models: *j\n",
                   "line ", "aliases"),
    "deep nesting": ("models: " + "[" * 1000 + "]" * 1000 + "\n", "", "nested"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_malformed_yaml_documents_are_refused_quickly(tmp_path, case, monkeypatch):
    """Duplicate keys silently replaced a block; an alias bomb grew `doit list` to 8 GB; deep
    nesting raised RecursionError. Each is one ConfigError, and a rejected document is not memoised."""
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    text, where, problem = RAW_CASES[case]
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert where in err.value.field and problem in str(err.value), str(err.value)
    assert not list((tmp_path / "cache").glob("parsed-yaml/*.json"))


def test_artifacts_and_checkpoint_paths_that_cannot_be_used(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad, problem in ((str(a_file), "not a directory"), (str(loop / "x"), "not a usable path")):
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump(mutate(lambda r, bad=bad: r.update(artifacts=bad))))
        with pytest.raises(config.ConfigError, match=problem):
            config.load(path)
    path.write_text(yaml.safe_dump(mutate(lambda r: r["models"][0].update(checkpoint=str(loop)))))
    with pytest.raises(config.ConfigError, match="not a usable path") as err:
        config.load(path)
    assert err.value.field == "models[0].checkpoint.path"
