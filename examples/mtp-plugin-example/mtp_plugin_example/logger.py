"""``csv-metrics``: training metrics as ``OUTPUT_DIR/metrics.csv``, and an lm-eval run's decode
statistics as ``mtp_decode.csv`` beside its per-sample statistics. Opt-in: ``--report-to csv-metrics``
(``report_to=csv-metrics`` in lm-eval's model_args)."""

import csv
from pathlib import Path

from mtp_plugins.hooks import hookimpl

TRAIN_COLUMNS = ["step", "k", "loss", "lr", "grad_norm", "tokens_per_s"]
DECODE_COLUMNS = ["strategy", "k", "tau", "samples", "eff_k", "tokens_per_second"]


class CsvMetrics:
    opt_in = True  # runs only when named by --report-to

    def __init__(self):
        self.path = None

    @hookimpl
    def mtp_train_start(self, config, output_dir, start_step, total_steps):
        self.path = Path(output_dir) / "metrics.csv"
        if start_step == 0 or not self.path.exists():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(TRAIN_COLUMNS)

    @hookimpl
    def mtp_step_end(self, step, metrics):
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([metrics.get(c, "") for c in TRAIN_COLUMNS])

    @hookimpl
    def mtp_generation_finished(self, summary, samples_path):
        path = Path(samples_path).parent / "mtp_decode.csv" if samples_path else Path("mtp_decode.csv")
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(DECODE_COLUMNS)
            writer.writerow([summary.get(c, "") for c in DECODE_COLUMNS])


csv_metrics = CsvMetrics()
