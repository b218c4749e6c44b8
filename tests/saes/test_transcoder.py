"""TopKTranscoder against its formula computed directly (sparsify's parity is in tests/saes/formats)."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes.base import TrainingContext
from saelab.saes.initialization import seeded
from saelab.saes.latents import to_dense
from saelab.saes.transcoder import TopKTranscoder, TopKTranscoderConfig


@pytest.mark.parametrize("transcode, skip", [(True, True), (True, False), (False, True)])
def test_forward_is_the_formula(transcode: bool, skip: bool) -> None:
    with seeded(0):
        tc = TopKTranscoder(TopKTranscoderConfig(d_in=5, n_latents=9, k=2, transcode=transcode,
                                                 skip_connection=skip))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
    x = torch.randn(7, 5)
    pre = torch.relu((x if transcode else x - tc.b_dec) @ tc.W_enc.T + tc.b_enc)
    top = pre.topk(2, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    want = z @ tc.W_dec + tc.b_dec + (x @ tc.W_skip.T if skip else 0)
    out = tc(x)
    torch.testing.assert_close(to_dense(out.latents), z)
    torch.testing.assert_close(out.x_hat, want)
    assert (tc.W_skip is not None) == skip


def test_it_is_loaded_not_trained() -> None:
    tc = TopKTranscoder(TopKTranscoderConfig(d_in=5, n_latents=9, k=2))
    with pytest.raises(ConfigError, match="can be loaded but not trained"):
        tc.check_training(TrainingContext())
