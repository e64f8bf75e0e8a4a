"""W&B offline: run files under the run dir, what is logged, and wandb.finish() also when a run fails."""

import struct
import subprocess
import sys
from pathlib import Path

import pytest

CLI_TINY = [
    "quant=none",
    "dnn.max_epochs=1",
    "bnn.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "eval.mc_samples=2",
    "data.image_size=16",
    "threads=1",  # the test machine is shared: one intra-op thread avoids oversubscription stalls
]


def wandb_records(path: str | Path) -> list:
    """Every protobuf Record of an offline .wandb file (the LevelDB-log framing wandb uses: 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_run_summary(run_dir: Path) -> dict:
    """What the run's offline W&B file holds: config keys, history keys, artifacts, exit code, media files."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    info: dict = {"config": set(), "history": set(), "artifacts": set(), "exit_code": None}
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "config":
            info["config"] |= {i.key for i in r.config.update}
        elif kind == "history":
            info["history"] |= {i.key or "/".join(i.nested_key) for i in r.history.item}
        elif kind == "artifact":
            info["artifacts"].add((r.artifact.name, r.artifact.type))
        elif kind == "exit":
            info["exit_code"] = r.exit.exit_code
    media = files[0].parent / "files" / "media"
    info["images"] = sorted(p.name for p in media.glob("images/**/*.png"))
    info["tables"] = sorted(p.name for p in media.glob("table/*.table.json"))
    return info


def check_wandb_run(run_dir: Path, variants=("dnn", "bnn", "bnn_mean")) -> None:
    """Assert a finished run logged config, every variant's metrics, the table, the plots and results.json."""
    info = wandb_run_summary(run_dir)
    assert info["exit_code"] == 0
    assert {"seed", "bayes", "eval", "data"} <= info["config"]
    for v in variants:
        assert {f"{v}/accuracy", f"{v}/nll", f"{v}/uce", f"{v}/ood/photos/auroc"} <= info["history"], v
    assert any(k.startswith("comparison") for k in info["history"]) and info["tables"]
    assert any(k.startswith("plots/referral") for k in info["history"])
    assert any(n.startswith("referral") for n in info["images"])
    assert ("results", "results") in info["artifacts"]


def _cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qbdl.run", *args], capture_output=True, text=True, timeout=timeout
    )


def test_failing_run_still_finishes_wandb(tmp_path):
    out = tmp_path / "fail"
    proc = _cli(["quant=none", f"dnn.checkpoint={tmp_path / 'missing.safetensors'}", f"hydra.run.dir={out}"])
    assert proc.returncode != 0 and "missing.safetensors" in proc.stdout + proc.stderr
    info = wandb_run_summary(out)
    assert info["exit_code"] == 1  # finished (exit record written), with the failure recorded
    assert "dnn" in info["config"]


@pytest.mark.slow
def test_wandb_run_logs_everything(tmp_path):
    out = tmp_path / "run"
    proc = _cli([*CLI_TINY, f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_wandb_run(out)


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "none"])
def test_other_loggers(tmp_path, logger):
    out = tmp_path / logger
    proc = _cli([*CLI_TINY, f"logger={logger}", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.json").exists() and not (out / "wandb").exists()
    if logger == "csv":
        text = "".join(p.read_text() for p in out.glob("csv/**/metrics.csv"))
        assert "bnn/accuracy" in text and "dnn/accuracy" in text
