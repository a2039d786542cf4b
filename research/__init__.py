"""Research code behind the results in docs/results.md; `import mabn_d2` does not import it.

- `data`: the offline Fashion-MNIST datasets (classification arrays, a COCO-format detection set);
- `study`, `stats`, `ablations`: the small-batch classification study, the batch-statistics
  recorder and MABN's ablation layers;
- `detection_study`, `reestimation`, `demo`: the detection study and demo on Fashion-MNIST canvases;
- `benchmarking`, `norm_benchmark`, `maskrcnn_benchmark`: timing and memory measurements.

It needs matplotlib on top of the plugin's requirements; tools/ holds the command lines.
"""
