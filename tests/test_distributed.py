"""A real 2-process DDP run on CPU (gloo), as `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2`.

(diffusers' AutoencoderKL script calls `unwrap_model(vae).encode/decode`, so DDP never all-reduces the
VAE's gradients and the replicas drift apart; this test would catch that.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vaegan.checkpointing import list_checkpoints

WORKER = Path(__file__).parent / "ddp_worker.py"


def _torchrun(out: Path, *overrides: str) -> list:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    (),
    # a loss term with its own parameter (learned log-variance) and gradient accumulation
    ("losses=[{name: gaussian_nll}, {name: kl}, {name: smoothness, weight: 0.1}]", "train.grad_accum=2"),
    # autograd.grad at the decoder's last layer under DDP, and prior samples as extra fakes
    ("adversarial.adaptive=true", "adversarial.fake=both"),
    # first-party plugins: a PatchGAN, the hinge pair, R1's double backward through the DDP-wrapped
    # discriminator (lazy, every 2 steps), and feature matching through the frozen one
    ("discriminator.name=patchgan", "discriminator.options={base_width: 8, n_layers: 2}", "adversarial.name=hinge",
     "losses=[{name: bce}, {name: kl}, {name: feature_matching, weight: 0.5}, {name: r1, options: {every: 2}}]"),
], ids=["default", "learned-logvar-accum", "adaptive-both-fakes", "patchgan-hinge-r1-feature-matching"])
def test_two_processes_end_with_identical_parameters(tmp_path, overrides):
    r0, r1 = _torchrun(tmp_path, *overrides)
    assert r0["world_size"] == r1["world_size"] == 2
    assert {r0["rank"], r1["rank"]} == {0, 1}
    assert "MULTI_CPU" in r0["distributed_type"]
    assert r0["ranks_saw_different_data"], "both ranks got the same shard: not data-parallel"
    for player in ("gen", "disc"):
        assert r0[player].keys() == r1[player].keys()
        for name in r0[player]:
            assert r0[player][name] == r1[player][name], f"{player}.{name} differs between ranks"
    # Only the main process writes logs, images and the final model; the logged losses are rank means.
    assert r0["history"] and not r1["history"]
    assert (tmp_path / "final" / "model.safetensors").is_file()
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
