"""Generated gRPC code for the modelbox.ModelStore protocol (scripts/gen_stubs.py)."""
