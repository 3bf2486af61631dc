"""Runs a short Lightning training on a GPU with MboxLogger and GPU system metrics,
then prints what reached mboxd. Usage, with mboxd running:

    MBOX_ADDR=localhost:8085 python sdk/python/examples/gpu_check.py

`--accelerator cpu` runs the same without a GPU (no GPU series are then expected).
Lightning's checkpoints go to a temporary folder (removed at the end) unless
`--root-dir` names one: never into the working directory.
"""

import argparse
import re
import tempfile
import time

import lightning
import torch

import mbox
from mbox.lightning import MboxLogger


class Net(lightning.LightningModule):
    def __init__(self, lr=1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1))

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--root-dir", help="where Lightning writes checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mbox-gpu-check-") as scratch:
        run(args, args.root_dir or scratch)


def run(args, root_dir):
    logger = MboxLogger(name="gpu-check", namespace="gpu", system_metrics_interval_s=1.0)
    data = torch.utils.data.TensorDataset(torch.randn(8192, 1024), torch.randn(8192, 1))
    trainer = lightning.Trainer(max_epochs=3, logger=logger, accelerator=args.accelerator, devices=1,
                                log_every_n_steps=5, enable_progress_bar=False, default_root_dir=root_dir)
    started = time.time()
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=256))
    exp = logger.experiment
    metrics = exp.metrics()
    print(f"trained in {time.time() - started:.1f}s; experiment {exp.id}")
    for key in sorted(metrics):
        s = metrics[key]
        print(f"  {key:40s} {len(s.steps):5d} points, last={s.values[-1]!r}")
    print("  metadata:", exp.metadata())
    print("  events:", [(e.name, e.metadata) for e in exp.events()])
    gpu_keys = [k for k in metrics if re.match(r"system/[^/]+/gpu[0-9]+/", k)]  # system/<node>/gpu<i>/...
    if args.accelerator == "gpu":
        assert gpu_keys, "no GPU series reached mboxd (is nvidia-ml-py installed?)"
    print(f"GPU series: {len(gpu_keys)}")
    mbox.close()


if __name__ == "__main__":
    main()
