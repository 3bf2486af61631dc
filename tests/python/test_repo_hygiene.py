"""No training outputs in the repository: checkpoints and Lightning logs are neither
tracked nor able to slip into a commit or a container build context."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Paths a training run or an example leaves behind.
OUTPUTS = [
    "epoch=2-step=96.ckpt",
    "gpu-check/86a9294912b32f2653bf6dcaa510581c/checkpoints/epoch=2-step=96.ckpt",
    "sdk/python/examples/lightning_logs/version_0/hparams.yaml",
    "lightning_logs/version_3/metrics.csv",
    "runs/resnet/checkpoints/last.ckpt",
    "checkpoints/model.pt",
]


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def is_training_output(path):
    parts = path.split("/")
    return path.endswith(".ckpt") or "lightning_logs" in parts or "checkpoints" in parts


def test_no_checkpoints_or_training_logs_are_tracked():
    tracked = [p for p in git("ls-files").splitlines() if is_training_output(p)]
    assert tracked == []


def test_gitignore_keeps_training_outputs_out():
    ignored = git("check-ignore", "--no-index", *OUTPUTS).splitlines()
    assert sorted(ignored) == sorted(OUTPUTS)


def docker_pattern(pattern):
    """A .dockerignore pattern as a regex: Go's filepath.Match plus `**`."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex + r"\Z")


def dockerignored(path, patterns):
    """Docker's rule: a path is out when it or a folder above it matches; the last
    matching pattern wins, `!` patterns bring paths back."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = docker_pattern(pattern.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_training_outputs_out():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    kept = [p for p in OUTPUTS if not dockerignored(p, patterns)]
    assert kept == [], kept
