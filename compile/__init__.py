"""The backends, each one module that declares everything about itself (README: "How to add a
backend"). The core loops over this list and names none of them."""
BACKENDS = ("compile.tpu_mlir", "compile.atc", "compile.ort")
