"""The export stages, in build order: each declares its nodes and hands the next one what it made."""
EXPORT_STAGES = ("export.synthetic", "export.stage", "export.simplify", "export.calibration_set")
# What the export stages run on: the "python" toolchain, whose versions are in their fingerprints.
PYTHON_LIBS = ("torch", "transformers", "onnx", "onnxruntime", "onnxsim", "numpy", "pillow")
