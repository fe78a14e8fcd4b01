"""The pretraining command: Min-SNR weights, and --resume gives the uninterrupted run's weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedbip_flower.models.ldm import bundled_model_path
from fedbip_flower.research.pretrain import build_schedulers, main, snr_weights, state_path


def test_snr_weights_cap_clean_timesteps():
    sched = build_schedulers()[0]
    acp = sched.alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    w = snr_weights(sched, t, 5.0)
    snr = acp[t] / (1 - acp[t])
    assert torch.allclose(w[snr > 5], 5.0 / snr[snr > 5])  # clean timesteps down-weighted
    assert torch.allclose(w[snr <= 5], torch.ones(int((snr <= 5).sum())))  # noisy ones keep weight 1
    assert w[0] < 0.05 and abs(float(w[-1]) - 1.0) < 1e-6
    assert torch.all(snr_weights(sched, t, 0.0) == 1.0)


def _args(out, steps):
    tok = str(bundled_model_path())
    return [
        "--output",
        str(out),
        "--per-class",
        "1",
        "--combo-per-class",
        "0",
        "--vae-steps",
        "2",
        "--vae-batch",
        "4",
        "--unet-steps",
        str(steps),
        "--batch",
        "4",
        "--checkpoint-every",
        "2",
        "--tokenizer",
        tok,
        "--hidden",
        "32",
        "--lr",
        "0.01",
        "--warmup",
        "1",
        "--ema",
        "0",
    ]


def _weights(folder, sub):
    return load_file(next((folder / sub).glob("*.safetensors")))


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path):
    main(_args(tmp_path / "full", 4))
    main(_args(tmp_path / "part", 2))
    assert state_path(tmp_path / "part").is_file()
    half = _weights(tmp_path / "part", "unet")
    main(_args(tmp_path / "part", 4) + ["--resume"])
    full, resumed = _weights(tmp_path / "full", "unet"), _weights(tmp_path / "part", "unet")
    # two more steps move the weights; the resumed run lands where the uninterrupted one did
    # (up to float reduction order: a fresh process may pick other kernel blockings)
    assert max((half[k].float() - full[k].float()).abs().max() for k in full) > 1e-2
    for sub in ("unet", "vae", "text_encoder"):
        full, resumed = _weights(tmp_path / "full", sub), _weights(tmp_path / "part", sub)
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.allclose(full[k].float(), resumed[k].float(), rtol=1e-3, atol=1e-4), k
    # a resume with other training arguments is refused, naming the difference
    with pytest.raises(SystemExit, match="lr"):
        main(_args(tmp_path / "part", 6) + ["--resume", "--lr", "0.5"])
    with pytest.raises(SystemExit, match="no training state"):
        main(_args(tmp_path / "none", 4) + ["--resume"])
