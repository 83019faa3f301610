"""The embedded default's SOPHGO matrix, built for real: every bmodel of models.yaml on all three
chips (F32, F16, BF16, INT8 where declared) passes the cmodel run and our acceptance against the
ONNX reference (a decoder below F32: the token agreement rule); model_transform runs once per
graph, not once per chip; a cell that fails in its pure precision is built mixed."""
import json

import pytest
import yaml

from buildplan import config
from buildplan.plan import build_plan
from compile.acceptance import ACCEPT, TOKEN_AGREEMENT
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
        comparisons = rec["figures"]["tpu_mlir"]  # TPU-MLIR's own; not of token ids under the agreement rule
        assert rec["simulated"] and all(c["passed"] for c in comparisons)
        assert comparisons or "tokens_vs_onnx" in rec["figures"], node.id
        e2e = rec["figures"].get("bmodel_vs_onnx", {})
        min_cos, max_rel = ACCEPT[node.labels["precision"]]
        if "tokens_vs_onnx" in rec["figures"]:  # a decoder below F32: the agreement rule
            tokens = rec["figures"]["tokens_vs_onnx"]
            share = TOKEN_AGREEMENT[node.labels["precision"]]
            assert tokens["identical_sequences"] >= share and tokens.get("next_token_agreement", 1.0) >= share, node.id
        elif "match" in e2e:  # token ids from the decoding graphs
            assert e2e["match"] == 1.0, node.id
            if "step" in node.labels["graph"]:  # the runtime's whole greedy loop, on the cmodel
                assert rec["figures"]["cmodel_loop_vs_onnx_loop"]["match"] == 1.0, node.id
        else:
            assert e2e["cosine"] >= min_cos and e2e["rel_max_abs"] <= max_rel, (node.id, e2e)
        assert 0 < rec["device_memory"]["device_bytes"] <= node.params["device_memory_mb"] * 2**20
    # blip_itm crashes TPU-MLIR in pure INT8 on bm1684x: built mixed, the op that crashes in F32
    itm = json.loads((tmp_path / "artifacts/.state/bmodel__retrieval.blip_itm.bm1684x.INT8.1b.json").read_text())
    table = json.loads((tmp_path / "artifacts/retrieval/BM1684X/blip_itm_bm1684x_int8_1b.bmodel.float_ops.json").read_text())
    assert [step["op"] for step in table["steps"]] and set(table["float_ops"]) == set(itm["float_ops"])
    assert {step["op"] for step in table["steps"]} <= set(itm["float_ops"])
