"""Importers: torch.export (modules, ExportedPrograms, .pt2), ONNX, and causal language models
for generation. Each returns an ImportedModel: a Relax module with detached parameters and the
signature of every function."""
