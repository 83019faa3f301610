"""Which chips exist and what each supports. Plain data, shared by validation and the plan."""
from __future__ import annotations

# Precisions TPU-MLIR's model_deploy supports per chip (BM1684 has no F16/BF16 units).
SOPHGO_PRECISIONS: dict[str, tuple[str, ...]] = {
    "bm1684": ("F32", "INT8"),
    "bm1684x": ("F32", "F16", "BF16", "INT8"),
    "bm1688": ("F32", "F16", "BF16", "INT8"),
}

# Device memory a chip's bmodels may use, in MiB: the seed's NPU heap after its memory edit
# (sophon-demo, seed 001 section 3), shared by every bmodel loaded at once. A target's
# `device_memory_mb` overrides it.
SOPHGO_DEVICE_MEMORY_MB: dict[str, int] = {"bm1684": 7615, "bm1684x": 7615, "bm1688": 6328}

# ATC --soc_version values, keyed by our lower-case target name.
ASCEND_SOCS: dict[str, str] = {
    name.lower(): name
    for name in (
        "Ascend310", "Ascend310B1", "Ascend310B4", "Ascend310P1", "Ascend310P3",
        "Ascend910", "Ascend910A", "Ascend910B", "Ascend910B1", "Ascend910B2",
        "Ascend910B3", "Ascend910B4",
    )
}

ATC_PRECISION_MODES = (
    "force_fp16", "allow_fp32_to_fp16", "allow_mix_precision", "must_keep_origin_dtype", "force_fp32",
)


def backend_of(target: str) -> str | None:
    if target in SOPHGO_PRECISIONS:
        return "tpu_mlir"
    if target in ASCEND_SOCS:
        return "atc"
    return None
