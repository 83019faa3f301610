"""The embedded default's SOPHGO matrix, built for real: every bmodel of models.yaml on all three
chips (F32, F16, BF16, INT8 where declared) passes the cmodel run and our acceptance against the
ONNX reference; model_transform runs once per graph, not once per chip."""
import json

import pytest
import yaml

from buildplan import config
from buildplan.plan import build_plan
from compile.acceptance import ACCEPT
from conftest import REPO, doit, executed

pytestmark = pytest.mark.tpu_mlir
SOPHGO = ("bm1684", "bm1684x", "bm1688")


def test_default_sophgo_matrix_builds_and_validates(tmp_path):
    raw = yaml.safe_load((REPO / "models.yaml").read_text())
    raw["artifacts"] = str(tmp_path / "artifacts")
    cfg = tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    plan = build_plan(config.load(cfg))
    bmodels = [n for n in plan.nodes.values() if n.stage == "bmodel"]
    assert {n.labels["precision"] for n in bmodels} == {"F32", "F16", "BF16", "INT8"}
    assert {n.labels["target"] for n in bmodels} == set(SOPHGO)

    ran = executed(doit(cfg, "-n", "2", *[f"compile:{c}" for c in SOPHGO], timeout=3600))

    graphs = {(n.labels["graph"], n.labels["batch"]) for n in bmodels}
    assert sorted(t for t in ran if t.startswith("transform:")) == sorted(
        f"transform:{n.model}.{n.labels['graph']}.{n.labels['batch']}b" for n in plan.nodes.values()
        if n.stage == "transform")
    assert len(graphs) == 8 and sum(t.startswith("transform:") for t in ran) == 8
    for node in bmodels:
        rec = json.loads((tmp_path / "artifacts" / ".state" / f"{node.id.replace(':', '__')}.json").read_text())
        assert (tmp_path / "artifacts" / node.main_output).stat().st_size > 0
        assert rec["simulated"] and rec["figures"]["tpu_mlir"] and all(s["passed"] for s in rec["figures"]["tpu_mlir"])
        e2e = rec["figures"]["bmodel_vs_onnx"]
        min_cos, max_rel = ACCEPT[node.labels["precision"]]
        if "match" in e2e:  # token ids from the decoding graphs
            assert e2e["match"] == 1.0, node.id
            if "step" in node.labels["graph"]:  # the runtime's whole greedy loop, on the cmodel
                assert rec["figures"]["cmodel_loop_vs_onnx_loop"]["match"] == 1.0, node.id
        else:
            assert e2e["cosine"] >= min_cos and e2e["rel_max_abs"] <= max_rel, (node.id, e2e)
        assert 0 < rec["device_memory"]["device_bytes"] <= node.params["device_memory_mb"] * 2**20
