"""The generation engine on onnxruntime: the model file format, runners, the chunk graph, lanes and how
speeches end. The only part of bot/ that export/ imports."""
