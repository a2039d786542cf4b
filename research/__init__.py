"""Research code behind the results in docs/results.md, beside the plugin in the repository (not
in the wheel); the plugin never imports it.

- `small_batch_study`, `batch_stats`, `ablations`: the small-batch classification study, the
  batch-statistics recorder and MABN's ablation layers;
- `detection_study`, `detection_report`, `demo`, `run_records`: the detection study and demo on
  Fashion-MNIST canvases, its report and its committed records;
- `paper_setting`, `paper_setting_report`, `recipe`: the paper's geometry (8 micro-batches of 2
  per SGD step) under the authors' solver scaled to a short schedule;
- `benchmarking`, `norm_benchmark`, `maskrcnn_benchmark`, `cuda_benchmarks`, `host_overhead`,
  `health_overhead`, `health_report`: timing, memory and health measurements.

The demo's dataset is `demo_datasets/`. It needs matplotlib on top of the plugin's requirements;
tools/ holds the command lines.
"""
