"""MboxLogger in a tiny Trainer.fit on CPU: metrics, hyperparameters and checkpoint
events reach mboxd. Needs lightning and torch, which the default test environment
does not install (they are large); the test is skipped there, with the reason."""

import pytest

lightning = pytest.importorskip("lightning", reason="lightning is not installed: pip install 'mbox[lightning]'")
torch = pytest.importorskip("torch", reason="torch is not installed")

import mbox  # noqa: E402
from mbox.lightning import MboxLogger  # noqa: E402


class Tiny(lightning.LightningModule):
    def __init__(self, lr=0.01, arch=None):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_trainer_fit_logs_metrics_hyperparameters_and_checkpoints(mboxd, tmp_path):
    client = mbox.Client(mboxd.addr)
    logger = MboxLogger(name="tiny", namespace="lightning", client=client)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = lightning.Trainer(max_epochs=2, logger=logger, log_every_n_steps=1, accelerator="cpu",
                                default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(Tiny(lr=0.05, arch={"layers": [4, 1]}), torch.utils.data.DataLoader(data, batch_size=16))
    exp = logger.experiment
    metrics = exp.metrics()
    assert len(metrics["train_loss"].steps) == 8  # 4 batches x 2 epochs
    assert exp.metadata()["lr"] == 0.05
    assert exp.metadata()["arch"] == {"layers": [4.0, 1.0]}
    names = [e.name for e in exp.events()]
    assert "checkpoint" in names and names[-1] == "run_finished"
    assert exp.events()[-1].metadata == {"status": "success"}
    client.close(timeout=10)
