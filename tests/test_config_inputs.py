"""What a models.yaml may contain, second pass (issue 23): bytes YAML cannot read, merge keys,
YAML 1.1 number forms, names that clash with the artifacts layout, path spellings, flags with a
newline, and a poisoned parse memo. Each was accepted or raised a traceback before."""
import json
import os

import pytest
import yaml

from buildplan import config
from conftest import doit

pytestmark = pytest.mark.unit

TARGET = "ascend310p3"


def _text(targets: str = "      ascend310p3: {batch_sizes: [1]}\n", name: str = "m", extra: str = "") -> str:
    return (f"{extra}models:\n  - name: {name}\n    task: retrieval\n    checkpoint: {{synthetic: tiny}}\n"
            f"    graphs: [BLIP_text]\n    targets:\n{targets}")


def _load(tmp_path, text: str | bytes):
    path = tmp_path / "models.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return config.load(path)


@pytest.mark.parametrize("raw", [b"models:\n- name: r\x07x\n", b"models: [\xff]\n", b"models:\n- name: a\x00b\n"],
                         ids=["control character", "invalid utf-8", "NUL byte"])
def test_bytes_yaml_cannot_read_are_a_config_error(tmp_path, raw, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    with pytest.raises(config.ConfigError) as err:
        _load(tmp_path, raw)
    assert "not valid YAML" in str(err.value) and "models.yaml" in str(err.value)
    path = tmp_path / "models.yaml"
    proc = doit(path, "list", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "models.yaml" in proc.stderr, proc.stderr


def test_merge_keys_share_settings_and_duplicates_stay_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    shared = ("      bm1684x: &b {batch_sizes: [1, 2], precisions: [F32, F16]}\n"
              "      bm1684: {<<: *b, precisions: [F32]}\n")
    text = _text(shared).replace("graphs: [BLIP_text]", "graphs: [blip_itm]")
    targets = {t.name: t for t in _load(tmp_path, text).models[0].targets}
    assert targets["bm1684"].batch_sizes == (1, 2) and targets["bm1684"].settings["precisions"] == ("F32",)
    assert targets["bm1684x"].settings["precisions"] == ("F32", "F16")
    with pytest.raises(config.ConfigError, match="duplicate key 'precisions'"):
        _load(tmp_path, text.replace("{<<: *b, precisions: [F32]}", "{<<: *b, precisions: [F32], precisions: [F16]}"))


@pytest.mark.parametrize("scalar", ["1_0", "1:0", "0x10", "010", "0b11"])
def test_yaml_11_number_forms_are_not_batch_sizes(tmp_path, scalar, monkeypatch):
    """YAML 1.1 reads 1_0 as 10 and 1:0 as 60; the file is read with YAML 1.2's core rules, where
    these are strings (and so refused) or plain decimals."""
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    text = _text(f"      ascend310p3: {{batch_sizes: [{scalar}]}}\n")
    if scalar == "010":  # YAML 1.2: a decimal with a leading zero
        assert _load(tmp_path, text).models[0].targets[0].batch_sizes == (10,)
        return
    if scalar == "0x10":  # YAML 1.2 keeps hexadecimal
        assert _load(tmp_path, text).models[0].targets[0].batch_sizes == (16,)
        return
    with pytest.raises(config.ConfigError) as err:
        _load(tmp_path, text)
    assert err.value.field == f"models[0].targets.{TARGET}.batch_sizes[0]"


def test_yaml_12_booleans(tmp_path, monkeypatch):
    """`yes`/`no` are strings in YAML 1.2: a boolean setting says so instead of guessing."""
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    text = _text("      bm1684x: {simulate: yes}\n").replace("graphs: [BLIP_text]", "graphs: [blip_itm]")
    with pytest.raises(config.ConfigError, match="true or false"):
        _load(tmp_path, text)
    assert _load(tmp_path, text.replace("yes", "true")).models[0].targets[0].settings["simulate"] is True


@pytest.mark.parametrize("name", ["logs", "checkpoints", "reports"])
def test_model_names_that_clash_with_the_layout(tmp_path, name, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    with pytest.raises(config.ConfigError, match="used by the build") as err:
        _load(tmp_path, _text(name=name))
    assert err.value.field == "models[0].name"


def test_extra_flag_ending_in_a_newline_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    raw = yaml.safe_load(_text())
    raw["models"][0]["targets"][TARGET]["extra_flags"] = {"BLIP_text": ["--op_select_implmode=x\n"]}
    with pytest.raises(config.ConfigError) as err:
        _load(tmp_path, yaml.safe_dump(raw))
    assert err.value.field == f"models[0].targets.{TARGET}.extra_flags.BLIP_text[0]"


@pytest.mark.parametrize("artifacts,problem", [("''", "empty"), (".", "holds models.yaml"), ("..", "holds models.yaml"),
                                               ("/", "holds models.yaml"), ("$HOME/artifacts", "variable")])
def test_artifacts_paths_that_cannot_be_meant(tmp_path, artifacts, problem, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    with pytest.raises(config.ConfigError, match=problem) as err:
        _load(tmp_path, _text(extra=f"artifacts: {artifacts}\n"))
    assert err.value.field == "artifacts"


def test_home_is_expanded_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = _load(tmp_path, _text(extra="artifacts: ~/built\n"))
    assert cfg.artifacts == str(tmp_path / "home" / "built")


def test_read_only_commands_create_no_folder(tmp_path):
    missing = tmp_path / "newdir"
    path = tmp_path / "models.yaml"
    path.write_text(_text(extra=f"artifacts: {missing}\n"))
    for command in (["list"], ["stale"], ["info", "default"]):
        proc = doit(path, *command, check=False)
        assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr  # info: 1 = not up to date
        assert not missing.exists(), command


def test_a_poisoned_parse_memo_never_decides_what_is_declared(tmp_path, monkeypatch):
    """Editing the memo of a models.yaml (keeping its source hash) declared batch sizes the file
    does not; a memo is only ever a faster way to the same answer."""
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    assert _load(tmp_path, _text()).models[0].targets[0].batch_sizes == (1,)
    memos = list((tmp_path / "cache" / "parsed-yaml").glob("*.json"))
    assert len(memos) == 1, "the parse is memoised"
    signature, _, payload = memos[0].read_text().partition("\n")
    memo = json.loads(payload)
    memo["document"]["models"][0]["targets"][TARGET]["batch_sizes"] = [1, 2, 4]
    memos[0].write_text(signature + "\n" + json.dumps(memo))  # the source hash kept, as an attacker would
    os.utime(tmp_path / "models.yaml")
    assert config.load(tmp_path / "models.yaml").models[0].targets[0].batch_sizes == (1,)
